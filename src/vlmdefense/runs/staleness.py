"""Whether a result is what today's code would produce: the inputs of a run (notebook source, merged
parameters, the library code it depends on, the library version), their hash, and the state of every
method × profile that ``vlmdefense status`` shows, and of every variant (a run with overrides, recorded
apart: :mod:`vlmdefense.runs.variants`). The canonical record's state never looks at a variant.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import nbformat

from vlmdefense import __version__
from vlmdefense.runs.code_digest import PACKAGE_DIR, library_digest
from vlmdefense.runs.profiles import load_profiles, method_parameters
from vlmdefense.runs.records import RESULT_FILE, RunStatus
from vlmdefense.runs.variants import read_variant, record_dir, variant_folders

NOTEBOOKS = "notebooks"
REPRODUCTIONS = "reproductions"


class RunState(str, Enum):
    """State of one (method, profile) pair, as ``vlmdefense status`` shows it."""

    OK = "ok"
    STALE = "stale"
    FAILED = "failed"
    MISSING = "missing"


@dataclass(frozen=True)
class StateReport:
    """The state of one method × profile and, when stale, which inputs changed."""

    method: str
    profile: str
    state: RunState
    changed: list[str] = field(default_factory=list)
    variant: str | None = None
    overrides: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain values (``vlmdefense status --format json``); ``variant`` is ``None`` for the canonical record."""
        out: dict[str, Any] = {
            "method": self.method,
            "profile": self.profile,
            "state": self.state.value,
            "changed": self.changed,
            "variant": self.variant,
        }
        if self.variant is not None:
            out["overrides"] = self.overrides
        return out


def notebook_path(root: Path, method: str) -> Path:
    """``notebooks/<method>.ipynb``."""
    return Path(root) / NOTEBOOKS / f"{method}.ipynb"


def output_dir(root: Path, method: str, profile: str) -> Path:
    """``reproductions/<method>/<profile>/``."""
    return Path(root) / REPRODUCTIONS / method / profile


def available_methods(root: Path) -> list[str]:
    """Methods with a notebook (the template excluded), baseline first."""
    names = sorted(p.stem for p in (Path(root) / NOTEBOOKS).glob("*.ipynb") if not p.stem.startswith("_"))
    return sorted(names, key=lambda n: (n != "baseline", n))


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def notebook_source_digest(path: Path) -> str:
    """Hash of the cells' sources only: outputs and execution counts do not make a run stale."""
    notebook = nbformat.read(str(path), as_version=4)
    return _digest([(cell.cell_type, cell.source) for cell in notebook.cells])


def run_inputs(root: Path, method: str, parameters: dict[str, Any], package_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    """Digest of each input of a run: ``notebook``, ``parameters``, ``code`` (the library modules the
    notebook and the method's defense import, transitively) and ``version`` (the library's)."""
    notebook = notebook_path(root, method)
    return {
        "notebook": notebook_source_digest(notebook),
        "parameters": _digest(parameters),
        "code": library_digest(notebook, method, package_dir)[:20],
        "version": __version__,
    }


def input_hash(inputs: dict[str, str]) -> str:
    """The one hash of a run's inputs that decides whether its result is up to date."""
    return _digest(inputs)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _report(
    root: Path,
    method: str,
    profile: str,
    overrides: dict[str, Any] | None,
    record_file: Path,
    package_dir: Path,
    variant: str | None = None,
) -> StateReport:
    def report(state: RunState, changed: list[str] | None = None) -> StateReport:
        return StateReport(method, profile, state, changed or [], variant, overrides if variant else None)

    record = _read_json(record_file)
    if record is None:
        return report(RunState.MISSING)
    if record.get("status") != RunStatus.OK.value:
        return report(RunState.FAILED)
    if not notebook_path(root, method).is_file():
        return report(RunState.STALE, ["notebook"])
    profiles = load_profiles(root)
    if profile not in profiles:
        return report(RunState.STALE, ["profile"])
    params = method_parameters(profiles[profile], method, overrides)
    inputs = run_inputs(root, method, params, package_dir)
    run = record.get("run") or {}
    if run.get("input_hash") == input_hash(inputs):
        return report(RunState.OK)
    stored = run.get("inputs") or {}
    changed = [name for name, value in inputs.items() if stored.get(name) != value] if stored else ["unrecorded"]
    return report(RunState.STALE, changed)


def state_report(
    root: Path,
    method: str,
    profile: str,
    overrides: dict[str, Any] | None = None,
    package_dir: Path = PACKAGE_DIR,
    *,
    canonical: bool = False,
) -> StateReport:
    """ok / stale / failed / missing for one method and profile, with the inputs that changed when stale
    (``notebook`` also when it is gone; ``unrecorded`` for a record written before inputs were recorded).

    Without overrides (or with ``canonical``) this is the canonical record's state; with overrides it is the
    state of their variant's record (``missing`` until that variant has run)."""
    folder = record_dir(root, method, profile, overrides, canonical)
    variant = None if canonical or not overrides else folder.name
    return _report(root, method, profile, overrides, folder / RESULT_FILE, package_dir, variant)


def run_state(
    root: Path,
    method: str,
    profile: str,
    overrides: dict[str, Any] | None = None,
    package_dir: Path = PACKAGE_DIR,
    *,
    canonical: bool = False,
) -> RunState:
    """ok / stale / failed / missing for one method and profile (or its variant, with overrides)."""
    return state_report(root, method, profile, overrides, package_dir, canonical=canonical).state


def variant_reports(
    root: Path, profiles: list[str] | None = None, package_dir: Path = PACKAGE_DIR
) -> list[StateReport]:
    """The state of every variant under ``reproductions/`` (of ``profiles`` only, when given), sorted by
    method, profile and slug; a folder without a readable ``variant.json`` is reported as failed."""
    reports = []
    for folder in variant_folders(root):
        method, profile = folder.parents[2].name, folder.parents[1].name
        if profiles is not None and profile not in profiles:
            continue
        found = read_variant(folder)
        if found is None:
            reports.append(StateReport(method, profile, RunState.FAILED, ["variant.json"], folder.name, {}))
            continue
        reports.append(_report(root, method, profile, found.overrides, found.result_file, package_dir, found.slug))
    return reports
