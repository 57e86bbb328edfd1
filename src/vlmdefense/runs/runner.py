"""Run reproduction notebooks with papermill: merged parameters, provenance, atomic writes, resume.

``reproductions/<id>/<profile>/`` receives the executed notebook ``<id>.ipynb`` and ``result.json``; a run
with overrides is a variant and lands in ``reproductions/<id>/<profile>/variants/<slug>/`` instead, leaving
the canonical record alone (:mod:`vlmdefense.runs.variants`). Notebooks run on the project's Jupyter kernel
when it is installed (``make setup``), else on the kernel their metadata names.

A run is up to date when its result's ``run.input_hash`` equals the hash of its inputs (the notebook's
source, the merged parameters, the library code it depends on and the library version: see
:mod:`vlmdefense.runs.staleness`); such runs are skipped unless forced. A failed run keeps its executed
notebook (with the traceback) and is recorded as ``failed``; the others go on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat

from vlmdefense.fileio import atomic_write_json
from vlmdefense.problems import Problem, display_path
from vlmdefense.runs.checkpoint_records import CHECKPOINTS_DIR, check_checkpoint_file
from vlmdefense.runs.jupyter import kernel_metadata, runner_kernel
from vlmdefense.runs.profiles import is_suite_profile, load_profiles, method_parameters
from vlmdefense.runs.provenance import now_iso, provenance
from vlmdefense.runs.records import RESULT_FILE, Result, RunStatus, check_result_file
from vlmdefense.runs.staleness import (
    REPRODUCTIONS,
    RunState,
    input_hash,
    notebook_path,
    run_inputs,
    run_state,
)
from vlmdefense.runs.variants import (
    VARIANTS,
    override_args,
    read_variant,
    record_dir,
    variant_result_files,
    write_variant_file,
)
from vlmdefense.workbench.progress import PROGRESS_ENV

logger = logging.getLogger(__name__)

TEMPLATE = "_template"


@dataclass
class RunOutcome:
    """What happened to one requested run."""

    method: str
    profile: str
    state: str  # ran, skipped, failed
    seconds: float
    message: str = ""
    variant: str | None = None  # the variant's slug, for a run with overrides


def _failure_record(
    method: str, profile: str, params: dict[str, Any], run: dict[str, Any], started: str, seconds: float, root: Path
) -> dict[str, Any]:
    device = str(params.get("device", "cpu"))
    return {
        "method": method,
        "profile": profile,
        "status": RunStatus.FAILED.value,
        "parameters": params,
        "provenance": provenance(
            root, device, int(params.get("seed", 0)), started, seconds, None, "vlmdefense run"
        ).model_dump(mode="json"),
        "run": run,
    }


def _relative_metadata(executed: Path, root: Path, source: Path, kernel: str | None = None) -> None:
    """Keep machine paths out of the executed notebook (papermill records absolute input/output paths) and
    name the kernel it ran on, so that Jupyter opens it without asking for one."""
    notebook = nbformat.read(str(executed), as_version=4)
    meta = notebook.metadata.get("papermill", {})
    meta["input_path"] = str(source.relative_to(root))
    meta["output_path"] = str(executed.relative_to(root))
    if kernel is not None:
        notebook.metadata["kernelspec"] = kernel_metadata(kernel)
    notebook.metadata.setdefault("language_info", {"name": "python"})
    nbformat.write(notebook, str(executed))


def _short_error(exc: BaseException) -> str:
    name = getattr(exc, "ename", type(exc).__name__)
    value = getattr(exc, "evalue", str(exc))
    return f"{name}: {value}".strip()[:2000]


def run_one(
    root: Path,
    method: str,
    profile: str,
    overrides: dict[str, Any] | None = None,
    force: bool = False,
    progress: bool = True,
    kernel_name: str | None = None,
    canonical: bool = False,
) -> RunOutcome:
    """Execute one notebook for one profile (skipped when up to date, unless ``force``).

    With ``overrides`` the run is a variant, written under ``variants/<slug>/`` beside the canonical record,
    unless ``canonical`` asks for it to be the profile's record (a new evaluation that needs, say, a local
    ``data_root``). ``kernel_name`` defaults to the project's kernel when installed, else the notebook's own.
    """
    import papermill

    root = Path(root).resolve()
    source = notebook_path(root, method)
    if not source.is_file():
        return RunOutcome(method, profile, "failed", 0.0, f"notebook {source.relative_to(root)} not found")
    profiles = load_profiles(root)
    if profile not in profiles:
        return RunOutcome(method, profile, "failed", 0.0, f"unknown profile {profile!r}")
    if is_suite_profile(profiles[profile]):
        message = f"profile {profile!r} is a zero-shot suite for checkpoints: use vlmdefense evaluate"
        return RunOutcome(method, profile, "failed", 0.0, message)
    params = method_parameters(profiles[profile], method, overrides)
    inputs = run_inputs(root, method, params)
    target = record_dir(root, method, profile, overrides, canonical)
    variant = None if canonical or not overrides else target.name
    result_file = target / RESULT_FILE
    if not force and run_state(root, method, profile, overrides, canonical=canonical) is RunState.OK:
        return RunOutcome(method, profile, "skipped", 0.0, "up to date", variant)
    target.mkdir(parents=True, exist_ok=True)
    if variant is not None:
        write_variant_file(target, method, profile, overrides or {})
    kernel = kernel_name or runner_kernel()
    executed = target / f"{method}.ipynb"
    started = now_iso()
    start = time.perf_counter()
    run_info = {
        "input_hash": input_hash(inputs),
        "inputs": inputs,
        "notebook": str(source.relative_to(root)),
        "executed_notebook": str(executed.relative_to(root)),
        "runner": f"papermill {papermill.__version__}, kernel {kernel or 'of the notebook'}",
    }
    with tempfile.TemporaryDirectory(prefix=f".{method}-", dir=target) as scratch:
        scratch_nb = Path(scratch) / executed.name
        # The notebook writes result.json (atomically) under its final name; the previous record stays in
        # place until then, so an interrupted run loses nothing. A fresh record differs from it (its
        # provenance carries the start time and duration).
        previous = result_file.read_bytes() if result_file.is_file() else None
        command = f"vlmdefense run {method} --profile {profile}"
        if overrides:
            command += " " + override_args(overrides) + (" --canonical" if canonical else "")
        batch_env = {
            "VLMDEFENSE_COMMAND": command,
            PROGRESS_ENV: "0",  # a batch run: no progress bars in the executed notebook, which is a page to read
        }
        env_backup = {name: os.environ.get(name) for name in batch_env}
        os.environ.update(batch_env)
        try:
            papermill.execute_notebook(
                str(source),
                str(scratch_nb),
                parameters={
                    "profile": profile,
                    "overrides": overrides or {},
                    "result_path": str(result_file.relative_to(root)),  # relative: no machine path in the notebook
                },
                cwd=str(root),
                progress_bar=progress,
                kernel_name=kernel,
                log_output=False,
            )
            if not result_file.is_file() or result_file.read_bytes() == previous:
                raise RuntimeError(f"the notebook did not write {result_file.relative_to(root)}")
            record = json.loads(result_file.read_text(encoding="utf-8"))
            record["run"] = run_info
            Result.model_validate(record)
        except Exception as exc:
            seconds = time.perf_counter() - start
            message = _short_error(exc)
            logger.debug("run %s/%s failed:\n%s", method, profile, traceback.format_exc())
            if scratch_nb.is_file():
                shutil.move(str(scratch_nb), executed)
                _relative_metadata(executed, root, source, kernel)
            atomic_write_json(
                result_file,
                _failure_record(method, profile, params, {**run_info, "error": message}, started, seconds, root),
            )
            return RunOutcome(method, profile, "failed", seconds, message, variant)
        finally:
            for name, value in env_backup.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        shutil.move(str(scratch_nb), executed)
        _relative_metadata(executed, root, source, kernel)
        atomic_write_json(result_file, record)
    return RunOutcome(method, profile, "ran", time.perf_counter() - start, "", variant)


def run_many(
    root: Path,
    methods: list[str],
    profile: str,
    overrides: dict[str, Any] | None = None,
    force: bool = False,
    on_done: Callable[[RunOutcome], None] | None = None,
    progress: bool = True,
    canonical: bool = False,
) -> list[RunOutcome]:
    """Run several notebooks one after another; a failure does not stop the rest."""
    outcomes = []
    for method in methods:
        outcome = run_one(root, method, profile, overrides, force, progress=progress, canonical=canonical)
        outcomes.append(outcome)
        if on_done is not None:
            on_done(outcome)
    return outcomes


def result_files(root: Path, variants: bool = True) -> list[Path]:
    """Every ``reproductions/<method>/<profile>/result.json`` and, unless ``variants`` is false, every
    variant's ``reproductions/<method>/<profile>/variants/<slug>/result.json``."""
    canonical = sorted((Path(root) / REPRODUCTIONS).glob(f"*/*/{RESULT_FILE}"))
    return canonical + (variant_result_files(root) if variants else [])


def _check_variant(path: Path, known_methods: set[str], profiles: set[str]) -> list[Problem]:
    """A variant's problems: those of any result file, its place judged as a variant's (the record's method
    and profile name the folders above ``variants/``), and the ``variant.json`` beside it."""
    problems = check_result_file(path, known_methods, profiles)
    problems = [p for p in problems if not p.message.startswith("file belongs in reproductions/")]
    if problems:
        return problems
    data = json.loads(path.read_text(encoding="utf-8"))
    method, profile = path.parents[3].name, path.parents[2].name
    shown = display_path(path)
    if (data.get("method"), data.get("profile")) != (method, profile):
        where = f"reproductions/{data.get('method')}/{data.get('profile')}/{VARIANTS}/{path.parent.name}/"
        return [Problem(shown, 1, "method", f"variant belongs in {where}")]
    if read_variant(path.parent) is None:
        return [Problem(shown, 1, "-", "no readable variant.json beside this variant (it keeps its overrides)")]
    return []


def check_results(root: Path, known_methods: set[str]) -> list[Any]:
    """Problems of every result file (schema, provenance, method, profile, place), variants included: each is
    checked in its own place and never taken for a canonical record."""
    profiles = set(load_profiles(root))
    problems = []
    for path in result_files(root, variants=False):
        problems += check_result_file(path, known_methods, profiles)
    for path in sorted((Path(root) / "reproductions" / CHECKPOINTS_DIR).glob(f"*/*/{RESULT_FILE}")):
        problems += check_checkpoint_file(path)
    for path in variant_result_files(root):
        problems += _check_variant(path, known_methods, profiles)
    return problems
