"""The record of a submission of jobs (``logs/jobs/<id>/submission.json``): which method × profile ran as
which job, where its log is and how it ended; ``vlmdefense status`` shows the latest one and
``vlmdefense run --resume`` resubmits what did not end ``ok``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vlmdefense.fileio import atomic_write_json

LOGS = Path("logs") / "jobs"
#: ``inline`` runs in this process; the others submit jobs through submitit.
EXECUTORS: tuple[str, ...] = ("inline", "local", "slurm", "debug")
SUBMISSION_FILE = "submission.json"
LATEST_FILE = "latest.json"


@dataclass(frozen=True)
class JobRecord:
    """One job of a submission; ``state`` is ``pending``, ``submitted``, ``ran``, ``skipped`` or ``failed``."""

    method: str
    profile: str
    overrides: dict[str, Any] = field(default_factory=dict)
    force: bool = False
    canonical: bool = False
    job_id: str | None = None
    state: str = "pending"
    log: str | None = None


@dataclass
class Submission:
    """A set of jobs submitted together to one executor."""

    id: str
    executor: str
    folder: Path
    jobs: list[JobRecord]

    def as_dict(self) -> dict[str, Any]:
        """JSON form (the folder relative to the repository when possible)."""
        return {"id": self.id, "executor": self.executor, "jobs": [asdict(j) for j in self.jobs]}


def logs_dir(root: Path) -> Path:
    """``<root>/logs/jobs``."""
    return Path(root) / LOGS


def new_submission(root: Path, logs: Path, executor: str, jobs: list[dict[str, Any]]) -> Submission:
    """A fresh submission folder ``logs/<timestamp>-<executor>/`` with every job ``pending``."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    folder = Path(logs) / f"{stamp}-{executor}"
    folder.mkdir(parents=True, exist_ok=True)
    submission = Submission(stamp, executor, folder, [JobRecord(**job) for job in jobs])
    write_submission(submission)
    return submission


def write_submission(submission: Submission) -> None:
    """Write the submission file and point ``latest.json`` at it (both atomically)."""
    atomic_write_json(submission.folder / SUBMISSION_FILE, submission.as_dict())
    atomic_write_json(submission.folder.parent / LATEST_FILE, {"folder": submission.folder.name})


def latest_submission(logs: Path) -> Submission | None:
    """The most recent submission under ``logs``, if any (``None`` when none or unreadable)."""
    try:
        folder = Path(logs) / json.loads((Path(logs) / LATEST_FILE).read_text(encoding="utf-8"))["folder"]
        data = json.loads((folder / SUBMISSION_FILE).read_text(encoding="utf-8"))
        return Submission(data["id"], data["executor"], folder, [JobRecord(**j) for j in data["jobs"]])
    except (OSError, ValueError, KeyError, TypeError):
        return None
