"""``vlmdefense audit``: the evaluation checks of a result record."""

from __future__ import annotations

import csv
import json
import sys
from typing import Annotated

import typer
from rich.table import Table

from vlmdefense.cli.common import OutputFormat, app, fail, out, repo_root


@app.command()
def audit(
    method_id: Annotated[str, typer.Argument(metavar="ID", help="Method id (or baseline).")],
    profile: Annotated[str, typer.Option("--profile", help="Profile of the result.")] = "smoke",
    fmt: Annotated[OutputFormat, typer.Option("--format", help="table, json or csv.")] = OutputFormat.table,
    flags_only: Annotated[bool, typer.Option("--flags", help="Only the checks that flagged.")] = False,
) -> None:
    """Print the evaluation audit of reproductions/ID/PROFILE/result.json: each check, its verdict and numbers.
    Exits with 1 when a check flagged (so scripts can gate on it)."""
    from vlmdefense.runs.records import AuditStatus, read_result, result_path
    from vlmdefense.workbench.audit_report import lowered_note

    path = result_path(repo_root(), method_id, profile)
    if not path.is_file():
        fail(
            f"no {profile} result for {method_id!r} ({path.relative_to(repo_root())}): run `vlmdefense run {method_id}`"
        )
    try:
        result = read_result(path)
    except ValueError as exc:
        fail(str(exc))
    if result.audit is None:
        fail(f"{method_id} ({profile}) has no evaluation audit: rerun it with `vlmdefense run {method_id} --force`")
    checks = [c for c in result.audit.checks if not flags_only or c.status is AuditStatus.FLAG]
    if fmt is OutputFormat.json:
        out.print_json(json.dumps([c.model_dump(mode="json") for c in checks]))
    elif fmt is OutputFormat.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["check", "status", "robust", "seconds", "detail"])
        for c in checks:
            writer.writerow(
                [
                    c.id,
                    c.status.value,
                    "" if c.robust is None else c.robust,
                    "" if c.seconds is None else c.seconds,
                    c.detail,
                ]
            )
    else:
        table = Table(title=f"evaluation audit: {method_id} ({profile}, {result.audit.images} test images)")
        for column in ("check", "verdict", "robust at headline", "what was measured"):
            table.add_column(column, overflow="fold")
        style = {AuditStatus.PASS: "green", AuditStatus.FLAG: "bold red", AuditStatus.SKIP: "dim"}
        for c in checks:
            robust = "–" if c.robust is None else f"{c.robust:.2f} %"
            table.add_row(c.id, f"[{style[c.status]}]{c.status.value}[/]", robust, c.detail)
        out.print(table)
        out.print(f"tolerance: {result.audit.tolerance}", highlight=False)
        note = lowered_note(result)
        if note:
            out.print(note.replace("`", ""), highlight=False)
    if result.audit.flags():
        raise typer.Exit(1)
