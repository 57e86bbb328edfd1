"""The record of a checkpoint evaluation (``reproductions/checkpoints/<slug>/<profile>/result.json``): a model
as released (or a user's own weights) evaluated zero-shot on every dataset of a profile's suite, per dataset and
averaged, as the papers' tables are laid out."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from vlmdefense.catalog.schema import Reported
from vlmdefense.problems import Problem, display_path
from vlmdefense.runs.record_base import Record, json_line, parse_record_file
from vlmdefense.runs.records import RESULT_FILE, Audit, Provenance, RobustEntry, RunStatus
from vlmdefense.units import Epsilon, Percent

CHECKPOINTS_DIR = "checkpoints"


class Weights(Record):
    """Which weights were evaluated, and their fingerprint."""

    model: str = Field(description="open_clip model name (ViT-B-32) or hub name (hf-hub:owner/repo)")
    pretrained: str | None = Field(None, description="open_clip pretrained tag or the weights file as given")
    visual: str | None = Field(None, description="a state_dict of the image tower only, loaded over the model")
    sha256: dict[str, str] = Field(
        default_factory=dict, description="sha256 of each weights file read (file name → digest)"
    )
    catalog_entry: str | None = Field(None, description="the catalog entry that released these weights, if known")


class DatasetScore(Record):
    """One dataset of the suite: clean accuracy, every attack row and the worst case per ε."""

    dataset: str
    images: int = Field(ge=0, description="test images evaluated (a seeded sample of the split)")
    split_size: int = Field(ge=0, description="images in the whole split")
    classes: int = Field(ge=0)
    clean: Percent | None
    robust: list[RobustEntry] = Field(default_factory=list)
    worst: dict[str, Percent | None] = Field(
        default_factory=dict, description="per-example worst case over the attacks, keyed by ε ('4/255')"
    )
    audit: Audit | None = None


class SuiteAverage(Record):
    """The average over the suite's datasets at one ε (each dataset weighs the same)."""

    eps: Epsilon
    clean: Percent | None
    robust: Percent | None
    datasets: int = Field(ge=0)


class CheckpointResult(Record):
    """A checkpoint evaluated under a profile's zero-shot suite."""

    kind: Literal["checkpoint"] = "checkpoint"
    slug: str
    profile: str
    status: RunStatus
    parameters: dict[str, Any] = Field(default_factory=dict)
    weights: Weights
    datasets: list[DatasetScore]
    averages: list[SuiteAverage]
    headline_eps: Epsilon
    reported: list[Reported] = Field(default_factory=list, description="the paper's numbers for these weights")
    provenance: Provenance

    def average_at(self, eps: float) -> SuiteAverage | None:
        """The suite average at ``eps``, if it was evaluated."""
        return next((a for a in self.averages if abs(a.eps.value - eps) < 1e-9), None)

    def flags(self) -> list[str]:
        """``dataset: check`` for every audit check that flagged."""
        return [f"{d.dataset}: {c.id}" for d in self.datasets if d.audit is not None for c in d.audit.flags()]


def slugify(text: str) -> str:
    """A folder name for a model: lower case, runs of other characters as one hyphen."""
    slug = re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.")
    return slug or "checkpoint"


def checkpoint_result_path(root: Path, slug: str, profile: str) -> Path:
    """``root/reproductions/checkpoints/<slug>/<profile>/result.json``."""
    return Path(root) / "reproductions" / CHECKPOINTS_DIR / slug / profile / RESULT_FILE


def check_checkpoint_file(path: Path) -> list[Problem]:
    """Every problem of a checkpoint record: JSON, schema, and the folder it must sit in."""
    result, text, problems = parse_record_file(path, CheckpointResult)
    if result is None:
        return problems
    parts = Path(path).resolve().parts
    if len(parts) >= 3 and (parts[-3], parts[-2]) != (result.slug, result.profile):
        return [
            Problem(
                display_path(Path(path)),
                json_line(text, "slug"),
                "slug",
                f"file belongs in reproductions/{CHECKPOINTS_DIR}/{result.slug}/{result.profile}/{RESULT_FILE}",
            )
        ]
    return []


def read_checkpoint_result(path: Path) -> CheckpointResult:
    """Read and validate a checkpoint record.

    Raises:
        ValueError: with ``path:line: field: message`` lines when the file is invalid.
    """
    problems = check_checkpoint_file(path)
    if problems:
        raise ValueError("\n".join(str(p) for p in problems))
    return CheckpointResult.model_validate_json(Path(path).read_text(encoding="utf-8"))


def checkpoint_results(root: Path) -> list[CheckpointResult]:
    """Every valid checkpoint record under ``reproductions/checkpoints/`` (sorted by slug, then profile)."""
    folder = Path(root) / "reproductions" / CHECKPOINTS_DIR
    found = []
    for path in sorted(folder.glob(f"*/*/{RESULT_FILE}")):
        try:
            found.append(read_checkpoint_result(path))
        except ValueError:
            continue
    return found
