"""``vlmdefense site build | serve``: build the atlas site with MkDocs (strict) and serve it locally."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from vlmdefense.paths import find_root
from vlmdefense.site.build import ROOT_ENV

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

site_app = typer.Typer(help="Build and serve the atlas site (MkDocs Material).", no_args_is_help=True)

CONFIG_FILE = "mkdocs.yml"


class SiteBuildError(Exception):
    """MkDocs failed, or the strict build met a warning."""


@contextlib.contextmanager
def _data_root(root: Path | None) -> Iterator[None]:
    """Point docs/gen_pages.py at another data root for the duration of a build."""
    if root is None:
        yield
        return
    old = os.environ.get(ROOT_ENV)
    os.environ[ROOT_ENV] = str(Path(root).resolve())
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ROOT_ENV, None)
        else:
            os.environ[ROOT_ENV] = old


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


class _Collect(logging.Handler):
    """Keeps MkDocs' warnings and errors, to report them after a failed build."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.levelname}: {record.getMessage()}")


def build_site(
    config_file: Path,
    site_dir: Path,
    data_root: Path | None = None,
    strict: bool = True,
) -> float:
    """Build the site of ``config_file`` into ``site_dir``.

    Args:
        config_file: The ``mkdocs.yml``.
        site_dir: Output folder (replaced).
        data_root: Repository whose ``catalog/`` and ``reproductions/`` the pages are generated from
            (default: the folder of ``config_file``).
        strict: Fail on any MkDocs warning (a broken link, a missing page).

    Returns:
        The build's wall-clock seconds.

    Raises:
        SiteBuildError: MkDocs aborted; the message lists its warnings.
    """
    from mkdocs.commands.build import build
    from mkdocs.config import load_config
    from mkdocs.exceptions import MkDocsException

    config_file = Path(config_file).resolve()
    start = time.perf_counter()
    collect = _Collect()
    mkdocs_logger = logging.getLogger("mkdocs")
    mkdocs_logger.addHandler(collect)
    try:
        with _data_root(data_root), _cwd(config_file.parent):
            config = load_config(str(config_file), site_dir=str(Path(site_dir).resolve()), strict=strict)
            config.plugins.on_startup(command="build", dirty=False)
            try:
                build(config)
            finally:
                config.plugins.on_shutdown()
    except MkDocsException as exc:
        details = "\n".join(collect.messages)
        raise SiteBuildError(f"{exc}\n{details}".strip()) from exc
    finally:
        mkdocs_logger.removeHandler(collect)
    return time.perf_counter() - start


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def make_server(directory: Path, port: int = 8000, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """An HTTP server of the static ``directory`` on ``host:port`` (``port=0`` picks a free port).

    Raises:
        OSError: the port is taken.
    """
    handler = functools.partial(_QuietHandler, directory=str(directory))
    return ThreadingHTTPServer((host, port), handler)


def find_site_root(start: Path | None = None) -> Path | None:
    """The repository to build: ``$VLMDEFENSE_ROOT``, or the nearest folder above ``start`` (default: the
    working directory) holding ``mkdocs.yml`` and ``catalog/``; ``None`` when there is none."""
    try:
        return find_root(start, (CONFIG_FILE, "catalog"))
    except FileNotFoundError:
        return None


def _root() -> Path:
    root = find_site_root()
    if root is None:
        err.print(f"[bold red]error:[/] no {CONFIG_FILE} and catalog/ above {Path.cwd()}: run from the repository")
        raise typer.Exit(1)
    return root


def _build(out_dir: Path) -> Path:
    root = _root()
    config = root / CONFIG_FILE
    if not config.is_file():
        err.print(f"[bold red]error:[/] {config} not found", highlight=False)
        raise typer.Exit(1)
    target = out_dir if out_dir.is_absolute() else Path.cwd() / out_dir
    try:
        seconds = build_site(config, target, data_root=root)
    except SiteBuildError as exc:
        err.print(f"[bold red]error:[/] site build failed: {exc}", highlight=False, markup=False)
        raise typer.Exit(1) from None
    out.print(f"built the site in {seconds:.1f} s → {target}", highlight=False)
    return target


@site_app.command("build")
def build_command(
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder (replaced).")] = Path("site"),
) -> None:
    """Generate the pages from catalog/ and reproductions/ and build the site (strict)."""
    _build(out_dir)


@site_app.command("serve")
def serve_command(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8000,
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder (replaced).")] = Path("site"),
) -> None:
    """Build the site, then serve it on http://127.0.0.1:PORT/ until Ctrl+C."""
    target = out_dir if out_dir.is_absolute() else Path.cwd() / out_dir
    try:
        server = make_server(target, port)  # the port is checked before the build
    except OSError as exc:
        err.print(f"[bold red]error:[/] cannot serve on port {port}: {exc.strerror} (try --port)", highlight=False)
        raise typer.Exit(1) from None
    try:
        _build(out_dir)
    except typer.Exit:
        server.server_close()
        raise
    host, bound = server.server_address[:2]
    if isinstance(host, bytes):
        host = host.decode()
    out.print(f"Serving VLM Defense Atlas at http://{host}:{bound}/ (Ctrl+C to stop)", highlight=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        out.print("stopped", highlight=False)
    finally:
        server.server_close()
