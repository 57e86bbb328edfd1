"""The ``vlmdefense`` command line: validate, list, show, new and bibtex (more in later modules)."""

from __future__ import annotations

import csv
import io
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from vlmdefense import __version__
from vlmdefense.catalog.bibtex import bibtex
from vlmdefense.catalog.scaffold import ScaffoldError, new_entry, new_notebook
from vlmdefense.catalog.schema import Entry, Paradigm, schema_text
from vlmdefense.catalog.validation import Catalog, load_catalog
from vlmdefense.fileio import atomic_write_text
from vlmdefense.problems import ProblemsError
from vlmdefense.site.cli import site_app

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
    """Output formats of ``list``."""

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


@app.command()
def validate(
    catalog_dir: Annotated[Path, typer.Argument(help="Catalog directory.")] = Path("catalog"),
) -> None:
    """Check every catalog file against the schema and the taxonomy, and every result file beside it
    (reproductions/*/*/result.json: schema, provenance, known method and profile); report all problems."""
    catalog, problems = load_catalog(catalog_dir)
    results = 0
    root = catalog_dir.resolve().parent
    if catalog is not None and (root / "reproductions" / "profiles.yaml").is_file():
        from vlmdefense.runs.runner import check_results, result_files

        results = len(result_files(root))
        try:
            problems = problems + check_results(root, set(catalog.items) | {BASELINE})
        except ProblemsError as exc:
            problems = problems + exc.problems
    for problem in problems:
        out.print(str(problem), highlight=False, markup=False)
    if problems:
        files = len({p.path for p in problems})
        fail(f"{len(problems)} problem(s) in {files} file(s)")
    assert catalog is not None
    counts = {p.value: 0 for p in Paradigm}
    for entry in catalog.entries:
        counts[entry.paradigm.value] += 1
    detail = ", ".join(f"{n} {name}" for name, n in counts.items())
    tail = f"; {results} result file(s) ok" if results else ""
    out.print(f"catalog ok: {len(catalog.entries)} entries ({detail}){tail}", highlight=False)


def _flags(entry: Entry) -> str:
    a = entry.assumptions
    names = [
        ("randomized", a.randomized),
        ("optimizes", a.inference_time_optimization),
        ("non-diff", a.non_differentiable),
    ]
    return ",".join(name for name, on in names if on)


def _reported_text(entry: Entry) -> str:
    return "; ".join(
        f"{r.model} | {r.dataset} | {r.attack} | {r.norm.value} {r.eps.display} | "
        f"clean {r.clean if r.clean is not None else '-'} / robust "
        f"{r.robust if r.robust is not None else '-'} | {r.source}"
        for r in entry.reported
    )


CSV_COLUMNS = [
    "id",
    "name",
    "paradigm",
    "family",
    "title",
    "authors",
    "year",
    "venue",
    "arxiv",
    "doi",
    "code",
    "modifies_weights",
    "needs_labels",
    "test_time_gradients",
    "randomized",
    "inference_time_optimization",
    "non_differentiable",
    "cost_level",
    "training_cost",
    "inference_cost",
    "threat_model",
    "reported",
    "reproduction",
    "related",
    "sources",
]


def _csv_row(entry: Entry) -> list[str]:
    a = entry.assumptions
    threat = (
        f"{'/'.join(n.value for n in entry.threat_model.norms)} "
        + ", ".join(e.display for e in entry.threat_model.eps)
        + f" ({', '.join(entry.threat_model.attacks)})"
    )
    return [
        entry.id,
        entry.name,
        entry.paradigm.value,
        entry.family,
        entry.title,
        "; ".join(entry.authors),
        str(entry.year),
        entry.venue,
        entry.links.arxiv or "",
        entry.links.doi or "",
        entry.links.code or "",
        str(a.modifies_weights).lower(),
        "not stated" if a.needs_labels is None else str(a.needs_labels).lower(),
        str(a.test_time_gradients).lower(),
        str(a.randomized).lower(),
        str(a.inference_time_optimization).lower(),
        str(a.non_differentiable).lower(),
        entry.cost.level.value,
        entry.cost.training,
        entry.cost.inference,
        threat,
        _reported_text(entry),
        entry.reproduction.status.value,
        " ".join(entry.related),
        " ".join(entry.sources),
    ]


@app.command("list")
def list_(
    paradigm: Annotated[Paradigm | None, typer.Option(help="Only this paradigm.")] = None,
    family: Annotated[str | None, typer.Option(help="Only this family.")] = None,
    fmt: Annotated[OutputFormat, typer.Option("--format", "-f", help="Output format.")] = OutputFormat.table,
    catalog_dir: CatalogOption = Path("catalog"),
) -> None:
    """List the catalog's defenses."""
    catalog = open_catalog(catalog_dir)
    families = {f.id for info in catalog.taxonomy.paradigms for f in info.families}
    if family is not None and family not in families:
        fail(f"unknown family {family!r} (one of: {', '.join(sorted(families))})", code=2)
    entries = [
        e
        for e in catalog.entries
        if (paradigm is None or e.paradigm == paradigm) and (family is None or e.family == family)
    ]
    if fmt is OutputFormat.json:
        payload = [
            {**e.model_dump(mode="json"), "needs_adaptive_evaluation": e.needs_adaptive_evaluation} for e in entries
        ]
        sys.stdout.write(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
        return
    if fmt is OutputFormat.csv:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        writer.writerows(_csv_row(e) for e in entries)
        sys.stdout.write(buffer.getvalue())
        return
    table = Table(title=f"{len(entries)} defenses", show_lines=False)
    for column in ("id", "name", "paradigm", "family", "venue", "cost", "flags", "repro"):
        table.add_column(column, overflow="fold")
    for e in entries:
        table.add_row(
            e.id,
            e.name,
            e.paradigm.value,
            e.family,
            e.venue,
            e.cost.level.value,
            _flags(e),
            e.reproduction.status.value,
        )
    out.print(table)


@app.command()
def show(
    method_id: Annotated[str, typer.Argument(metavar="ID", help="Method id.")],
    catalog_dir: CatalogOption = Path("catalog"),
) -> None:
    """Show one defense in full."""
    catalog = open_catalog(catalog_dir)
    try:
        entry = catalog.get(method_id)
    except KeyError as exc:
        fail(str(exc.args[0]))
    out.print(f"[bold]{entry.name}[/] — {entry.title}", highlight=False)
    out.print(f"{', '.join(entry.authors)}. {entry.venue}.", highlight=False, markup=False)
    out.print(f"{entry.paradigm.value} / {entry.family}", highlight=False)
    links = {k: v for k, v in entry.links.model_dump().items() if v}
    for key, value in links.items():
        out.print(f"  {key}: {value}", highlight=False, markup=False)
    out.print("\n[bold]Summary[/]")
    out.print(entry.summary, markup=False)
    out.print("\n[bold]Mechanism[/]")
    out.print(entry.mechanism, markup=False)
    out.print("\n[bold]Assumptions and cost[/]")
    for key, value in entry.assumptions.model_dump(mode="json").items():
        out.print(f"  {key}: {value}", highlight=False, markup=False)
    for key, value in entry.cost.model_dump(mode="json").items():
        if value is not None:
            out.print(f"  cost.{key}: {value}", highlight=False, markup=False)
    if entry.needs_adaptive_evaluation:
        out.print("  [yellow]needs adaptive evaluation before it is ranked[/]")
    if entry.reported:
        table = Table(title="Reported by the paper")
        for column in ("model", "dataset", "attack", "ε", "clean", "robust", "source"):
            table.add_column(column, overflow="fold")
        for r in entry.reported:
            table.add_row(
                r.model,
                r.dataset,
                r.attack,
                f"{r.norm.value} {r.eps.display}",
                "-" if r.clean is None else f"{r.clean:g}",
                "-" if r.robust is None else f"{r.robust:g}",
                r.source,
            )
        out.print(table)
    out.print(f"\nreproduction: {entry.reproduction.status.value}", highlight=False)
    if entry.related:
        out.print(f"related: {', '.join(entry.related)}", highlight=False)


@app.command("bibtex")
def bibtex_(
    method_ids: Annotated[
        list[str] | None, typer.Argument(metavar="[ID...]", help="Method ids (default: all).")
    ] = None,
    catalog_dir: CatalogOption = Path("catalog"),
) -> None:
    """Print BibTeX records for the given methods (all when none is given)."""
    catalog = open_catalog(catalog_dir)
    try:
        entries = [catalog.get(i) for i in method_ids] if method_ids else catalog.entries
    except KeyError as exc:
        fail(str(exc.args[0]))
    sys.stdout.write("\n".join(bibtex(e) for e in entries))


@app.command()
def new(
    method_id: Annotated[str, typer.Argument(metavar="ID", help="New method id, e.g. my-defense.")],
    paradigm: Annotated[Paradigm, typer.Option(help="Paradigm (the entry's folder).")],
    family: Annotated[str, typer.Option(help="Family of that paradigm (see catalog/taxonomy.yaml).")],
    notebook: Annotated[
        bool, typer.Option("--notebook/--no-notebook", help="Also create notebooks/ID.ipynb from the template.")
    ] = True,
    catalog_dir: CatalogOption = Path("catalog"),
) -> None:
    """Scaffold a commented catalog entry (and its notebook) whose TODOs fail validation until filled."""
    notebooks = catalog_dir.resolve().parent / "notebooks"
    if notebook and (notebooks / f"{method_id}.ipynb").exists():
        fail(f"notebook {notebooks / f'{method_id}.ipynb'} exists already")
    if notebook and not (notebooks / "_template.ipynb").is_file():
        fail(f"notebook template {notebooks / '_template.ipynb'} not found (use --no-notebook for the YAML alone)")
    try:
        path = new_entry(catalog_dir, method_id, paradigm.value, family)
        made = [path]
        if notebook:
            made.append(new_notebook(catalog_dir.resolve().parent, method_id))
    except (ScaffoldError, ProblemsError) as exc:
        fail(str(exc))
    for item in made:
        out.print(f"created {item}", highlight=False)
    out.print(
        "next: fill in every TODO of the YAML and the notebook, run `vlmdefense validate`, "
        f"then `vlmdefense check {method_id}`",
        highlight=False,
    )


@app.command()
def schema(
    write: Annotated[
        bool,
        typer.Option("--write", help="Write CATALOG/schema.json and CATALOG/result.schema.json instead of printing."),
    ] = False,
    result: Annotated[bool, typer.Option("--result", help="Print the schema of result.json instead.")] = False,
    catalog_dir: CatalogOption = Path("catalog"),
) -> None:
    """Print (or write) the JSON Schemas of a catalog entry and of a result record, exported from the pydantic
    models."""
    from vlmdefense.runs.records import RESULT_SCHEMA_FILE, result_schema_text

    if write:
        for name, text in (("schema.json", schema_text()), (RESULT_SCHEMA_FILE, result_schema_text())):
            target = catalog_dir / name
            atomic_write_text(target, text)
            out.print(f"wrote {target}", highlight=False)
    else:
        sys.stdout.write(result_schema_text() if result else schema_text())


def _repo_root() -> Path:
    from vlmdefense.paths import find_root

    try:
        return find_root()
    except FileNotFoundError as exc:
        fail(str(exc))


@app.command()
def run(
    method_ids: Annotated[list[str] | None, typer.Argument(metavar="[ID...]", help="Methods to run.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Run every notebook.")] = False,
    profile: Annotated[str, typer.Option("--profile", help="Profile of reproductions/profiles.yaml.")] = "smoke",
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="KEY=VALUE override (YAML value); repeatable.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rerun even when up to date.")] = False,
) -> None:
    """Execute reproduction notebooks with papermill into reproductions/ID/PROFILE/."""
    from vlmdefense.runs.profiles import load_profiles, parse_overrides
    from vlmdefense.runs.runner import available_methods, run_many

    root = _repo_root()
    if all_ == bool(method_ids):
        fail("give method ids or --all (not both)", code=2)
    try:
        overrides = parse_overrides(param or [])
        profiles = load_profiles(root)
    except (ValueError, ProblemsError) as exc:
        fail(str(exc), code=2)
    if profile not in profiles:
        fail(f"unknown profile {profile!r} (one of: {', '.join(profiles)})", code=2)
    known = available_methods(root)
    methods = known if all_ else list(method_ids or [])
    for method in methods:
        if method not in known:
            from vlmdefense.catalog.validation import unknown_id_message

            fail(unknown_id_message(method, known).replace("in the catalog", "with a notebook"))

    def report(outcome) -> None:
        style = {"ran": "green", "skipped": "dim", "failed": "bold red"}[outcome.state]
        extra = f" — {outcome.message}" if outcome.message else ""
        out.print(
            f"[{style}]{outcome.state:>7}[/] {outcome.method} ({outcome.profile}, {outcome.seconds:.0f} s){extra}",
            highlight=False,
        )

    outcomes = run_many(root, methods, profile, overrides, force, on_done=report, progress=sys.stderr.isatty())
    counts = {state: sum(o.state == state for o in outcomes) for state in ("ran", "skipped", "failed")}
    total = sum(o.seconds for o in outcomes)
    out.print(
        f"{counts['ran']} ran, {counts['skipped']} up to date, {counts['failed']} failed ({total:.0f} s)",
        highlight=False,
    )
    if counts["failed"]:
        raise typer.Exit(1)


@app.command()
def status(
    profile: Annotated[list[str] | None, typer.Option("--profile", help="Profiles to show (default: all).")] = None,
) -> None:
    """Show every method × profile as ok / stale / failed / missing."""
    from vlmdefense.runs.profiles import load_profiles
    from vlmdefense.runs.runner import available_methods, run_state

    root = _repo_root()
    names = profile or list(load_profiles(root))
    colours = {"ok": "green", "stale": "yellow", "failed": "red", "missing": "dim"}
    table = Table(title="reproductions")
    table.add_column("method")
    for name in names:
        table.add_column(name)
    for method in available_methods(root):
        states = [run_state(root, method, name).value for name in names]
        table.add_row(method, *(f"[{colours[s]}]{s}[/]" for s in states))
    out.print(table)


@app.command()
def check(
    method_id: Annotated[str, typer.Argument(metavar="ID", help="Method id.")],
    profile: Annotated[str, typer.Option("--profile", help="Profile to run the notebook with.")] = "smoke",
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="KEY=VALUE override (YAML value); repeatable.")
    ] = None,
) -> None:
    """Validate one entry, run its notebook, build its page; say in one screen what is missing."""
    from vlmdefense.runs.check import check_method
    from vlmdefense.runs.profiles import parse_overrides

    root = _repo_root()
    try:
        overrides = parse_overrides(param or [])
    except ValueError as exc:
        fail(str(exc), code=2)
    report = check_method(root, method_id, profile, overrides, progress=sys.stderr.isatty())
    marks = {True: "[green]✓[/]", False: "[bold red]✗[/]", None: "[dim]·[/]"}
    for step in report.steps:
        out.print(f"{marks[step.ok]} {step.name:<9} {step.detail}", highlight=False)
        for line in step.problems:
            out.print(f"    {line}", highlight=False, markup=False)
    if report.missing:
        out.print("\nstill missing (not required by the schema, expected by reviewers):", highlight=False)
        for line in report.missing:
            out.print(f"  - {line}", highlight=False, markup=False)
    if not report.ok:
        raise typer.Exit(1)


model_app = typer.Typer(help="The small CLIP of the smoke profile.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command("train")
def model_train(
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Folder for model.pt and card.json (default: cache).")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Override the recipe's epochs.")] = None,
    seed: Annotated[int | None, typer.Option(help="Override the recipe's seed.")] = None,
) -> None:
    """Train the small CLIP by its recipe and write the checkpoint and its card."""
    from dataclasses import replace

    from vlmdefense.workbench.models import Recipe, write_small_clip

    recipe = Recipe()
    if epochs is not None:
        recipe = replace(recipe, epochs=epochs)
    if seed is not None:
        recipe = replace(recipe, seed=seed)
    path, card = write_small_clip(recipe, out_dir, progress=sys.stderr.isatty())
    out.print(f"wrote {path}", highlight=False)
    out.print(
        f"zero-shot test accuracy {card['metrics']['zero_shot_test_accuracy']:.1f} %, "
        f"trained in {card['train_seconds']:.0f} s, sha256 {card['sha256'][:12]}",
        highlight=False,
    )


app.add_typer(site_app, name="site")


def main() -> None:
    """Entry point of the ``vlmdefense`` script."""
    app()


if __name__ == "__main__":
    main()
