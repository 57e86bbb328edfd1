"""Run reproduction notebooks with papermill: merged parameters, provenance, atomic writes, resume.

``reproductions/<id>/<profile>/`` receives the executed notebook ``<id>.ipynb`` and ``result.json``.
A run is up to date when its result's ``run.input_hash`` equals the hash of its inputs (the notebook's
source, the merged parameters, the library code it depends on and the library version: see
:mod:`vlmdefense.runs.staleness`); such runs are skipped unless forced. A failed run
keeps its executed notebook (with the traceback) and is recorded as ``failed``; the others go on.
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
from vlmdefense.runs.profiles import load_profiles, method_parameters
from vlmdefense.runs.provenance import now_iso, provenance
from vlmdefense.runs.records import RESULT_FILE, Result, RunStatus, check_result_file
from vlmdefense.runs.staleness import (
    REPRODUCTIONS,
    RunState,
    input_hash,
    notebook_path,
    output_dir,
    run_inputs,
    run_state,
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


def _relative_metadata(executed: Path, root: Path, source: Path) -> None:
    """Keep machine paths out of the executed notebook: papermill records absolute input/output paths."""
    notebook = nbformat.read(str(executed), as_version=4)
    meta = notebook.metadata.get("papermill", {})
    meta["input_path"] = str(source.relative_to(root))
    meta["output_path"] = str(executed.relative_to(root))
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
) -> RunOutcome:
    """Execute one notebook for one profile (skipped when up to date, unless ``force``)."""
    import papermill

    root = Path(root).resolve()
    source = notebook_path(root, method)
    if not source.is_file():
        return RunOutcome(method, profile, "failed", 0.0, f"notebook {source.relative_to(root)} not found")
    profiles = load_profiles(root)
    if profile not in profiles:
        return RunOutcome(method, profile, "failed", 0.0, f"unknown profile {profile!r}")
    params = method_parameters(profiles[profile], method, overrides)
    inputs = run_inputs(root, method, params)
    target = output_dir(root, method, profile)
    result_file = target / RESULT_FILE
    if not force and run_state(root, method, profile, overrides) is RunState.OK:
        return RunOutcome(method, profile, "skipped", 0.0, "up to date")
    target.mkdir(parents=True, exist_ok=True)
    executed = target / f"{method}.ipynb"
    started = now_iso()
    start = time.perf_counter()
    run_info = {
        "input_hash": input_hash(inputs),
        "inputs": inputs,
        "notebook": str(source.relative_to(root)),
        "executed_notebook": str(executed.relative_to(root)),
        "runner": f"papermill {papermill.__version__}",
    }
    with tempfile.TemporaryDirectory(prefix=f".{method}-", dir=target) as scratch:
        scratch_nb = Path(scratch) / executed.name
        # The notebook writes result.json (atomically) under its final name; the previous record stays in
        # place until then, so an interrupted run loses nothing. A fresh record differs from it (its
        # provenance carries the start time and duration).
        previous = result_file.read_bytes() if result_file.is_file() else None
        batch_env = {
            "VLMDEFENSE_COMMAND": f"vlmdefense run {method} --profile {profile}",
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
                kernel_name=kernel_name,
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
                _relative_metadata(executed, root, source)
            atomic_write_json(
                result_file,
                _failure_record(method, profile, params, {**run_info, "error": message}, started, seconds, root),
            )
            return RunOutcome(method, profile, "failed", seconds, message)
        finally:
            for name, value in env_backup.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        shutil.move(str(scratch_nb), executed)
        _relative_metadata(executed, root, source)
        atomic_write_json(result_file, record)
    return RunOutcome(method, profile, "ran", time.perf_counter() - start)


def run_many(
    root: Path,
    methods: list[str],
    profile: str,
    overrides: dict[str, Any] | None = None,
    force: bool = False,
    on_done: Callable[[RunOutcome], None] | None = None,
    progress: bool = True,
) -> list[RunOutcome]:
    """Run several notebooks one after another; a failure does not stop the rest."""
    outcomes = []
    for method in methods:
        outcome = run_one(root, method, profile, overrides, force, progress=progress)
        outcomes.append(outcome)
        if on_done is not None:
            on_done(outcome)
    return outcomes


def result_files(root: Path) -> list[Path]:
    """Every ``reproductions/<method>/<profile>/result.json``."""
    return sorted((Path(root) / REPRODUCTIONS).glob(f"*/*/{RESULT_FILE}"))


def check_results(root: Path, known_methods: set[str]) -> list[Any]:
    """Problems of every result file (schema, provenance, method, profile, place)."""
    profiles = set(load_profiles(root))
    problems = []
    for path in result_files(root):
        problems += check_result_file(path, known_methods, profiles)
    return problems
