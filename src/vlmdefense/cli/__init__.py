"""The ``vlmdefense`` command line: catalog commands, reproduction commands and the site, on one Typer app."""

from __future__ import annotations

from vlmdefense.cli import catalog_commands, open_command, run_commands  # noqa: F401  (they register their commands)
from vlmdefense.cli.common import app
from vlmdefense.site.cli import site_app

app.add_typer(site_app, name="site")

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the ``vlmdefense`` script."""
    app()
