"""Provenance of a result: code revision, package versions, device, seed, timing."""

from __future__ import annotations

import platform
import subprocess
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from vlmdefense.runs.records import PromptRecord, Provenance

OUTPUTS_PATHSPEC = ":(exclude,glob)reproductions/*/*/**"
PACKAGES = (
    "vlmdefense",
    "torch",
    "torchvision",
    "open_clip_torch",
    "numpy",
    "scikit-learn",
    "torchattacks",
    "papermill",
)


def git_state(root: Path) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the checkout at ``root``; ``(None, None)`` outside git.

    Run outputs (``reproductions/<id>/<profile>/``) do not make the checkout dirty: a run of several
    notebooks rewrites them one after another, and they are what a run produces, not what it reads.
    """
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", OUTPUTS_PATHSPEC],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, bool(status.strip())


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers (and Python's)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def device_description(device: str) -> str:
    """``cuda: NVIDIA H100 ...`` or ``cpu: x86_64, 2 threads``."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return f"cpu: {platform.machine()}, {torch.get_num_threads()} threads"


def now_iso() -> str:
    """The current UTC time, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def provenance(
    root: Path,
    device: str,
    seed: int,
    started: str,
    duration: float,
    templates: PromptRecord | None,
    command: str | None = None,
) -> Provenance:
    """The ``provenance`` block of a result record."""
    commit, dirty = git_state(root)
    return Provenance(
        git_commit=commit,
        dirty=dirty,
        versions=package_versions(),
        device=device_description(device),
        seed=seed,
        started=started,
        duration_seconds=round(duration, 2),
        templates=templates,
        command=command,
    )
