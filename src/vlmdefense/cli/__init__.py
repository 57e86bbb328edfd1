"""The ``vlmdefense`` command line: catalog commands, reproduction commands and the site, on one Typer app."""

from __future__ import annotations

from vlmdefense.cli import (  # noqa: F401  (they register their commands)
    audit_command,
    catalog_commands,
    evaluate_command,
    open_command,
    run_commands,
)
from vlmdefense.cli.common import app
from vlmdefense.site.cli import site_app

app.add_typer(site_app, name="site")

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the ``vlmdefense`` script."""
    app()
