"""``vlmdefense evaluate``: any open_clip-loadable checkpoint under a zero-shot suite profile."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from vlmdefense.cli.common import app, fail, out, repo_root, run_setup


@app.command()
def evaluate(
    model: Annotated[
        str, typer.Option("--model", help="open_clip model name (ViT-B-32) or hub name (hf-hub:org/repo).")
    ],
    pretrained: Annotated[
        str | None, typer.Option("--pretrained", help="open_clip pretrained tag (openai) or a weights file.")
    ] = None,
    visual: Annotated[
        Path | None,
        typer.Option(
            "--visual", help="A state_dict of the image tower only (as FARE and TeCoA release), loaded over it."
        ),
    ] = None,
    profile: Annotated[str, typer.Option("--profile", help="A profile with a zero-shot suite.")] = "zeroshot",
    slug: Annotated[
        str | None, typer.Option("--slug", help="Folder name of the record (default: from the model).")
    ] = None,
    data_root: Annotated[
        Path | None, typer.Option("--data-root", help="Where the suite's datasets are (default: the profile's).")
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option("-p", "--param", help="KEY=VALUE on top of the profile (repeatable).")
    ] = None,
) -> None:
    """Evaluate a checkpoint zero-shot on every dataset of PROFILE's suite, with the profile's attacks and audit,
    and write reproductions/checkpoints/SLUG/PROFILE/result.json (the weights' sha256 in it)."""
    from vlmdefense.fileio import atomic_write_json
    from vlmdefense.runs.checkpoint_records import checkpoint_result_path, slugify
    from vlmdefense.runs.profiles import is_suite_profile
    from vlmdefense.workbench.checkpoint_eval import CheckpointSpec, evaluate_checkpoint

    root = repo_root()
    profiles, overrides = run_setup(root, profile, param)
    if not is_suite_profile(profiles[profile]):
        suites = [name for name, body in profiles.items() if is_suite_profile(body)]
        fail(f"profile {profile!r} has no zero-shot suite (one of: {', '.join(suites)})", code=2)
    spec = CheckpointSpec(model, pretrained, visual)
    name = slug or slugify("-".join(p for p in (model, spec.shown_pretrained, visual.name if visual else None) if p))
    try:
        result = evaluate_checkpoint(spec, profile, name, root, overrides, data_root)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        fail(str(exc))
    path = checkpoint_result_path(root, name, profile)
    atomic_write_json(path, result.model_dump(mode="json"))
    table = Table(title=f"{name} on {profile}")
    table.add_column("dataset")
    for column in ("images", "clean"):
        table.add_column(column, justify="right")
    budgets = [a.eps.display for a in result.averages]
    for budget in budgets:
        table.add_column(f"robust {budget}", justify="right")
    for score in result.datasets:
        table.add_row(score.dataset, str(score.images), _pct(score.clean), *[_pct(score.worst.get(b)) for b in budgets])
    averages = {a.eps.display: a for a in result.averages}
    clean = result.averages[0].clean if result.averages else None
    table.add_row("average", "", _pct(clean), *[_pct(averages[b].robust) for b in budgets], style="bold")
    out.print(table)
    flags = result.flags()
    if flags:
        out.print(f"[bold red]audit flags:[/] {', '.join(flags)}")
    out.print(f"wrote {path.relative_to(root)}")


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"
