"""Reproduction commands: run, status, check, and the small CLIP's ``model train``."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Annotated, cast

import typer
from rich.table import Table

from vlmdefense.cli.common import OutputFormat, app, fail, out, repo_root, require_notebooks, run_setup
from vlmdefense.runs.submissions import EXECUTORS


@app.command()
def run(
    method_ids: Annotated[list[str] | None, typer.Argument(metavar="[ID...]", help="Methods to run.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Run every notebook.")] = False,
    profile: Annotated[str, typer.Option("--profile", help="Profile of reproductions/profiles.yaml.")] = "smoke",
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="KEY=VALUE override (YAML value); repeatable.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rerun even when up to date.")] = False,
    canonical: Annotated[
        bool,
        typer.Option("--canonical", help="Record a run with overrides as the profile's record, not as a variant."),
    ] = False,
    executor: Annotated[
        str, typer.Option("--executor", help="inline (one after another here), local (submitit jobs), slurm.")
    ] = "inline",
    resume: Annotated[
        bool, typer.Option("--resume", help="Resubmit the jobs of the last submission that did not end ok.")
    ] = False,
    parallel: Annotated[int | None, typer.Option(help="Jobs at once (default: cores / cpus; Slurm: 256).")] = None,
    cpus: Annotated[int | None, typer.Option(help="CPU cores (and torch threads) per job.")] = None,
    gpus: Annotated[int | None, typer.Option(help="GPUs per job.")] = None,
    mem_gb: Annotated[int | None, typer.Option("--mem-gb", help="Memory per job (Slurm).")] = None,
    time_min: Annotated[int | None, typer.Option("--time", help="Minutes per job before it is stopped.")] = None,
    partition: Annotated[str | None, typer.Option(help="Slurm partition.")] = None,
    account: Annotated[str | None, typer.Option(help="Slurm account.")] = None,
    qos: Annotated[str | None, typer.Option(help="Slurm QOS.")] = None,
    requeues: Annotated[
        int | None, typer.Option(help="Times a preempted or timed-out job is requeued (default 3).")
    ] = None,
    shard_by: Annotated[
        str | None,
        typer.Option("--shard-by", help="One job per value of the profile's shards.KEY list (e.g. dataset)."),
    ] = None,
) -> None:
    """Execute reproduction notebooks with papermill into reproductions/ID/PROFILE/; a run with overrides
    (-p) is a variant and lands in reproductions/ID/PROFILE/variants/SLUG/, beside the canonical record."""
    from vlmdefense.runs.runner import RunOutcome, run_many
    from vlmdefense.runs.variants import record_dir

    root = repo_root()
    if executor not in EXECUTORS:
        fail(f"unknown executor {executor!r} (one of: {', '.join(EXECUTORS)})", code=2)
    if resume and (all_ or method_ids):
        fail("--resume resubmits the last submission: give no method ids and no --all", code=2)
    if not resume and all_ == bool(method_ids):
        fail("give method ids or --all (not both)", code=2)
    profiles, overrides = run_setup(root, profile, param)
    known = require_notebooks(root, list(method_ids or []))
    methods = known if all_ else list(method_ids or [])

    def report(outcome: RunOutcome) -> None:
        style = {"ran": "green", "skipped": "dim", "failed": "bold red"}[outcome.state]
        extra = f" — {outcome.message}" if outcome.message else ""
        where = f", variant {outcome.variant}" if outcome.variant else ""
        out.print(
            f"[{style}]{outcome.state:>7}[/] {outcome.method} ({outcome.profile}{where}, {outcome.seconds:.0f} s)"
            f"{extra}",
            highlight=False,
        )
        if outcome.variant:
            folder = record_dir(root, outcome.method, outcome.profile, overrides)
            out.print(f"        in {folder.relative_to(root)}/ (the canonical record is untouched)", highlight=False)

    if shard_by and executor == "inline":
        fail("--shard-by submits one job per shard: use --executor local or slurm", code=2)
    if executor == "inline" and not resume:
        outcomes = run_many(
            root, methods, profile, overrides, force, on_done=report, progress=sys.stderr.isatty(), canonical=canonical
        )
    else:
        from vlmdefense.runs.executors import ClusterOptions, ExecutorName, Job, resume_jobs, run_jobs, shard_jobs
        from vlmdefense.runs.submissions import logs_dir

        logs = logs_dir(root)
        if resume:
            jobs = resume_jobs(root, logs)
        elif shard_by:
            try:
                jobs = shard_jobs(methods, profiles[profile], shard_by, overrides, force)
            except ValueError as exc:
                fail(f"reproductions/profiles.yaml: {exc}", code=2)
        else:
            jobs = [Job(m, profile, overrides, force, canonical) for m in methods]
        if not jobs:
            out.print("nothing to resume: every job of the last submission is ok", highlight=False)
            return
        try:
            options = ClusterOptions.from_sources(
                profiles[profile].get("executor"),
                **dict(parallel=parallel, cpus=cpus, gpus=gpus, mem_gb=mem_gb, time_min=time_min),
                **dict(partition=partition, account=account, qos=qos, requeues=requeues),
            )
        except (TypeError, ValueError) as exc:
            fail(f"reproductions/profiles.yaml: {profile}.{exc}", code=2)
        kind = cast(ExecutorName, "local" if executor == "inline" else executor)
        outcomes, submission = run_jobs(root, jobs, kind, options, logs, on_done=report)
        out.print(f"jobs and logs: {submission.folder.relative_to(root)}/", highlight=False)
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
    format_: Annotated[
        OutputFormat,
        typer.Option("--format", "-f", help="table, json (one object per method × profile, then per variant) or csv."),
    ] = OutputFormat.table,
) -> None:
    """Show every method × profile as ok / stale / failed / missing (a stale result names the inputs that
    changed: notebook, parameters, code, version), then every variant (a run with overrides) apart."""
    from vlmdefense.runs.profiles import notebook_profiles
    from vlmdefense.runs.staleness import available_methods, state_report, variant_reports

    root = repo_root()
    names = profile or list(notebook_profiles(root))
    reports = [state_report(root, method, name) for method in available_methods(root) for name in names]
    variants = variant_reports(root, names)
    if format_ is OutputFormat.json:
        sys.stdout.write(json.dumps([r.as_dict() for r in reports + variants], indent=2) + "\n")
        return
    if format_ is OutputFormat.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["method", "profile", "state", "changed", "variant"])
        writer.writerows([r.method, r.profile, r.state.value, " ".join(r.changed), r.variant or ""] for r in reports)
        writer.writerows([r.method, r.profile, r.state.value, " ".join(r.changed), r.variant] for r in variants)
        return
    colours = {"ok": "green", "stale": "yellow", "failed": "red", "missing": "dim"}

    def shown(state: str, changed: list[str]) -> str:
        why = f" ({', '.join(changed)})" if changed else ""
        return f"[{colours[state]}]{state}[/]{why}"

    table = Table(title="reproductions")
    table.add_column("method")
    for name in names:
        table.add_column(name)
    for method in available_methods(root):
        table.add_row(method, *[shown(r.state.value, r.changed) for r in reports if r.method == method])
    out.print(table)
    if variants:
        from vlmdefense.runs.variants import override_args

        extra = Table(title="variants (runs with overrides, under reproductions/ID/PROFILE/variants/; not on the site)")
        for column in ("method", "profile", "variant", "overrides", "state"):
            extra.add_column(column)
        for r in variants:
            extra.add_row(
                r.method, r.profile, r.variant, override_args(r.overrides or {}), shown(r.state.value, r.changed)
            )
        out.print(extra)
    _print_last_submission(root)


def _print_last_submission(root: Path) -> None:
    """The jobs of the last submission to an executor (ids, states, logs), if there was one."""
    from vlmdefense.runs.submissions import latest_submission, logs_dir

    submission = latest_submission(logs_dir(root))
    if submission is None:
        return
    jobs = Table(title=f"last submission ({submission.executor}, {submission.folder.relative_to(root)}/)")
    for column in ("method", "profile", "job", "state", "log"):
        jobs.add_column(column)
    for j in submission.jobs:
        log = str(Path(j.log).relative_to(root)) if j.log and Path(j.log).is_relative_to(root) else (j.log or "")
        jobs.add_row(j.method, j.profile, j.job_id or "", j.state, log)
    out.print(jobs)


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

    root = repo_root()
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
