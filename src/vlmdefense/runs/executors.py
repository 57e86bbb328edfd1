"""Where reproductions run: inline (one after another in this process, the default), or as submitit jobs on
this machine's cores (``local``) or a Slurm cluster (``slurm``; job arrays), one job per method × profile.

A job runs exactly what ``vlmdefense run`` runs inline (:func:`vlmdefense.runs.runner.run_one`): the same
papermill execution, the same atomic writes, so a job that dies leaves the previous result in place. Each
submission is written down (:mod:`vlmdefense.runs.submissions`) for ``vlmdefense status`` and ``--resume``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlmdefense.runs.runner import RunOutcome, run_one
from vlmdefense.runs.submissions import (
    JobRecord,
    Submission,
    latest_submission,
    new_submission,
    write_submission,
)

ExecutorName = Literal["local", "slurm", "debug"]
POLL_SECONDS = 1.0


@dataclass(frozen=True)
class Job:
    """One reproduction to run: a method on a profile, with overrides."""

    method: str
    profile: str
    overrides: dict[str, Any] = field(default_factory=dict)
    force: bool = False
    canonical: bool = False


@dataclass(frozen=True)
class ClusterOptions:
    """Resources of one job, from the profile's ``executor`` section and the command line (which wins).

    Attributes:
        cpus: CPU cores per job (also the torch threads of its kernel).
        gpus: GPUs per job.
        mem_gb: memory per job.
        time_min: wall-clock limit per job.
        partition, account, qos: Slurm placement.
        parallel: jobs at once (a Slurm array's parallelism; on this machine, how many run side by side,
            default: the cores divided by ``cpus``).
        requeues: how often a job that is preempted or reaches its time limit is put back in the queue
            (it then runs its notebook again from the start; the previous result stays until it succeeds).
    """

    cpus: int = 1
    gpus: int = 0
    mem_gb: int | None = None
    time_min: int = 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    parallel: int | None = None
    requeues: int = 3

    @classmethod
    def from_sources(cls, profile_section: dict[str, Any] | None, **cli: Any) -> ClusterOptions:
        """The profile's ``executor`` values, then every command-line value that is not ``None``.

        Raises:
            ValueError: an unknown key in the profile's section.
        """
        section = dict(profile_section or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"executor: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        section.update({k: v for k, v in cli.items() if v is not None})
        return cls(**section)

    def local_parallel(self) -> int:
        """Jobs side by side on this machine: ``parallel``, else the usable cores divided by ``cpus``."""
        if self.parallel:
            return max(1, self.parallel)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, cores // max(1, self.cpus))


def run_job(root: str, job: Job, threads: int | None = None) -> RunOutcome:
    """What every submitted job runs: the inline run of one method on one profile."""
    from vlmdefense.workbench.models import THREADS_ENV  # torch is imported by the job, not by the CLI

    if threads:
        os.environ[THREADS_ENV] = str(threads)
    return run_one(
        Path(root), job.method, job.profile, job.overrides, job.force, progress=False, canonical=job.canonical
    )


def shard_jobs(
    methods: Sequence[str],
    profile: dict[str, Any],
    key: str,
    overrides: dict[str, Any] | None = None,
    force: bool = False,
) -> list[Job]:
    """One job per method and per value the profile's ``shards.<key>`` lists (e.g. one per dataset of a
    dataset suite), each with the override ``key: value``; the shards land as variants of the profile.

    Raises:
        ValueError: the profile has no ``shards.<key>`` list.
    """
    values = (profile.get("shards") or {}).get(key)
    if not isinstance(values, list) or not values:
        known = ", ".join(sorted(profile.get("shards") or {})) or "none"
        raise ValueError(
            f"profile {profile.get('name', '?')!r} lists no shards for {key!r} (shards.{key}; known: {known})"
        )
    return [Job(m, str(profile.get("name", "")), {**(overrides or {}), key: v}, force) for m in methods for v in values]


class ReproductionJob:
    """The callable submitit runs (picklable). Its :meth:`checkpoint` makes a job requeueable: when the
    cluster preempts it or its time runs out, submitit calls it and resubmits the same run."""

    def __call__(self, root: str, job: Job, threads: int | None = None) -> RunOutcome:
        return run_job(root, job, threads)

    def checkpoint(self, root: str, job: Job, threads: int | None = None) -> Any:
        """The same run again, from the start of its notebook (papermill cannot resume inside one)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(ReproductionJob(), root, job, threads)


def make_executor(kind: ExecutorName, folder: Path, options: ClusterOptions, name: str = "vlmdefense") -> Any:
    """A configured submitit executor (``local``, ``slurm`` or ``debug``) writing its logs to ``folder``."""
    import submitit

    cluster = {"local": "local", "slurm": "slurm", "debug": "debug"}[kind]
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster, slurm_max_num_timeout=options.requeues)
    params: dict[str, Any] = {"timeout_min": options.time_min, "name": name}
    if kind == "slurm":
        params.update(
            cpus_per_task=options.cpus,
            gpus_per_node=options.gpus,
            slurm_array_parallelism=options.parallel or 256,
        )
        if options.mem_gb is not None:
            params["mem_gb"] = options.mem_gb
        for key in ("partition", "account", "qos"):
            if getattr(options, key):
                params[f"slurm_{key}"] = getattr(options, key)
    elif kind == "local" and options.gpus:
        params["gpus_per_node"] = options.gpus
    executor.update_parameters(**params)
    return executor


def _outcome(job: Job, submitted: Any, started: float) -> RunOutcome:
    """The job's own outcome, or ``failed`` with its log when the job itself died."""
    try:
        outcome: RunOutcome = submitted.result()
        return outcome
    except Exception as exc:  # the job process died (killed, timed out, out of memory)
        log = getattr(submitted, "paths", None)
        where = f" (log: {log.stderr})" if log is not None else ""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return RunOutcome(job.method, job.profile, "failed", time.perf_counter() - started, f"{first}{where}")


def run_jobs(
    root: Path,
    jobs: Sequence[Job],
    kind: ExecutorName,
    options: ClusterOptions,
    logs: Path,
    on_done: Callable[[RunOutcome], None] | None = None,
) -> tuple[list[RunOutcome], Submission]:
    """Submit ``jobs`` to the ``kind`` executor, wait for them, and return their outcomes in job order.

    Slurm jobs go in one array; local jobs run ``options.local_parallel()`` at a time, each with its share
    of the cores. The submission (job ids, log paths, states) is written under ``logs`` as it changes.
    """
    submission = new_submission(root, logs, kind, [asdict(j) for j in jobs])
    executor = make_executor(kind, submission.folder, options)
    threads = max(1, options.cpus)
    outcomes: dict[int, RunOutcome] = {}
    started = time.perf_counter()
    if kind == "slurm":
        with executor.batch():
            handles = [executor.submit(ReproductionJob(), str(root), job, threads) for job in jobs]
        pending = dict(enumerate(handles))
        _record(submission, pending, outcomes)
    else:
        pending = {}
        queue = list(enumerate(jobs))
        limit = 1 if kind == "debug" else options.local_parallel()
        while queue or pending:
            while queue and len(pending) < limit:
                index, job = queue.pop(0)
                pending[index] = executor.submit(ReproductionJob(), str(root), job, threads)
                _record(submission, pending, outcomes)
            _collect(jobs, pending, outcomes, started, submission, on_done, block=not queue)
        return [outcomes[i] for i in range(len(jobs))], submission
    while pending:
        _collect(jobs, pending, outcomes, started, submission, on_done, block=True)
    return [outcomes[i] for i in range(len(jobs))], submission


def _collect(
    jobs: Sequence[Job],
    pending: dict[int, Any],
    outcomes: dict[int, RunOutcome],
    started: float,
    submission: Submission,
    on_done: Callable[[RunOutcome], None] | None,
    block: bool,
) -> None:
    """Move finished jobs from ``pending`` to ``outcomes`` (waiting for at least one when ``block``)."""
    while True:
        done = [i for i, handle in pending.items() if handle.done()]
        if done or not block or not pending:
            break
        time.sleep(POLL_SECONDS)
    for index in done:
        outcome = _outcome(jobs[index], pending.pop(index), started)
        outcomes[index] = outcome
        submission.jobs[index] = JobRecord(**{**asdict(submission.jobs[index]), "state": outcome.state})
        if on_done is not None:
            on_done(outcome)
    write_submission(submission)
    if not done and not block:
        time.sleep(POLL_SECONDS)


def _record(submission: Submission, pending: dict[int, Any], outcomes: dict[int, RunOutcome]) -> None:
    """Note job ids and log paths of newly submitted jobs in the submission file."""
    for index, handle in pending.items():
        record = submission.jobs[index]
        if record.job_id is None:
            paths = handle.paths
            submission.jobs[index] = JobRecord(
                **{**asdict(record), "job_id": str(handle.job_id), "state": "submitted", "log": str(paths.stderr)}
            )
    write_submission(submission)


def resume_jobs(root: Path, logs: Path) -> list[Job]:
    """The jobs of the latest submission that did not end ``ok``: failed or never finished, or whose result
    is not up to date now."""
    from vlmdefense.runs.staleness import RunState, run_state

    submission = latest_submission(logs)
    if submission is None:
        return []
    return [
        Job(j.method, j.profile, j.overrides, j.force, j.canonical)
        for j in submission.jobs
        if j.state not in ("ran", "skipped") or run_state(root, j.method, j.profile, j.overrides) is not RunState.OK
    ]
