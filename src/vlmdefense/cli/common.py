"""What every ``vlmdefense`` command shares: the Typer app, the consoles, errors, the repository root."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from vlmdefense import __version__
from vlmdefense.catalog.validation import Catalog, load_catalog

app = typer.Typer(
    help="VLM Defense Atlas: browse, validate and reproduce adversarial defenses of VLMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

CatalogOption = Annotated[Path, typer.Option("--catalog", "-c", help="Catalog directory.", show_default=True)]


BASELINE = "baseline"


class OutputFormat(str, Enum):
    """Output formats of ``list`` and ``status``."""

    table = "table"
    json = "json"
    csv = "csv"


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one ``error:`` line to stderr and exit."""
    err.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        out.print(f"vlmdefense {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """VLM Defense Atlas."""


def open_catalog(root: Path) -> Catalog:
    """Load the catalog for browsing: invalid files are skipped with a warning on stderr."""
    catalog, problems = load_catalog(root)
    if catalog is None:
        fail(str(problems[0]) if problems else f"cannot load catalog {root}")
    if problems:
        err.print(
            f"warning: {len(problems)} problem(s) in {root}; run `vlmdefense validate` for details",
            highlight=False,
        )
    return catalog


def repo_root() -> Path:
    from vlmdefense.paths import find_root

    try:
        return find_root()
    except FileNotFoundError as exc:
        fail(str(exc))


def run_setup(root: Path, profile: str, param: list[str] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The profiles of ``root`` and the ``-p KEY=VALUE`` overrides; exits 2 on a bad override, an invalid
    profiles file or an unknown ``profile``."""
    from vlmdefense.problems import ProblemsError
    from vlmdefense.runs.profiles import load_profiles, parse_overrides

    try:
        overrides = parse_overrides(param or [])
        profiles = load_profiles(root)
    except (ValueError, ProblemsError) as exc:
        fail(str(exc), code=2)
    if profile not in profiles:
        fail(f"unknown profile {profile!r} (one of: {', '.join(profiles)})", code=2)
    return profiles, overrides


def require_notebooks(root: Path, methods: list[str]) -> list[str]:
    """``methods`` when each has a notebook (exits with a did-you-mean otherwise); every method's known list."""
    from vlmdefense.catalog.validation import unknown_id_message
    from vlmdefense.runs.staleness import available_methods

    known = available_methods(root)
    for method in methods:
        if method not in known:
            fail(unknown_id_message(method, known).replace("in the catalog", "with a notebook"))
    return known
