"""The result record (``reproductions/<id>/<profile>/result.json``): its schema, reading and checks."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import Field, JsonValue

from vlmdefense.catalog.schema import Reported
from vlmdefense.problems import Problem, display_path
from vlmdefense.runs.detection import DetectionSection
from vlmdefense.runs.record_base import Record, json_line, parse_record_file
from vlmdefense.units import Epsilon, Percent

RESULT_FILE = "result.json"
RESULT_SCHEMA_FILE = "result.schema.json"


class RunStatus(str, Enum):
    """Outcome of a reproduction run."""

    OK = "ok"
    FAILED = "failed"


class Accuracy(Record):
    """Accuracy in percent on the test split (all / seen / unseen classes) and the transfer set."""

    all: Percent | None
    seen: Percent | None = None
    unseen: Percent | None = None
    transfer: Percent | None = None

    def as_dict(self) -> dict[str, float | None]:
        """Plain values (for findings)."""
        return self.model_dump()


class RobustEntry(Record):
    """Robust accuracy under one (attack, ε, adaptive) setting."""

    attack: str
    norm: str = "linf"
    eps: Epsilon
    steps: int = Field(ge=0)
    adaptive: bool
    target: str = Field(description="what the attack differentiated: base-model, defended-model or defended-pipeline")
    acc: Accuracy
    seconds: float | None = None


class Cost(Record):
    """Measured cost of the defense."""

    train_seconds: float = Field(ge=0)
    inference_seconds_per_image: float = Field(ge=0)
    forward_passes: float = Field(ge=0, description="forward passes of the image tower per image at inference")
    backward_passes: float = Field(ge=0, description="backward passes per image at inference")


class ModelCardSummary(Record):
    """What identifies a checkpoint trained by the project (the small CLIP): its recipe, file and quality."""

    recipe_key: str
    sha256: str
    train_seconds: float = Field(ge=0)
    metrics: dict[str, float] = Field(default_factory=dict)
    parameters: int = Field(ge=0, description="number of model parameters")


class ModelRef(Record):
    """The model as open_clip names it."""

    name: str
    pretrained: str | None = None
    card: ModelCardSummary | None = None


class DatasetInfo(Record):
    """The evaluation data of a run."""

    test: str
    test_images: int = Field(ge=0)
    transfer: str | None = None
    transfer_images: int = Field(0, ge=0)
    seen_classes: list[int] = Field(default_factory=list, description="classes a training-time defense may tune on")


class Headline(Record):
    """The numbers a page shows first: clean accuracy and the worst case over all attacks at the headline ε."""

    eps: Epsilon
    clean: Percent | None
    robust: Percent | None = Field(description="worst case of the non-adaptive (or white-box) attacks")
    robust_adaptive: Percent | None = Field(None, description="worst case of the adaptive attacks, if any")
    lowered_by: list[str] = Field(
        default_factory=list,
        description="audit checks that found a lower robust accuracy than the recorded attacks; the worst-case "
        "number (robust_adaptive for inference-time defenses, robust otherwise) took their value",
    )


class AuditStatus(str, Enum):
    """Outcome of one evaluation check."""

    PASS = "pass"
    FLAG = "flag"
    SKIP = "skip"


class AuditCheck(Record):
    """One sanity check of the record's own evaluation, with the numbers behind its verdict."""

    id: str = Field(description="e.g. eps-zero, monotonic, unbounded, convergence, black-box, transfer")
    title: str
    status: AuditStatus
    detail: str = Field(description="what was measured and why it passed or flagged; the reason for a skip")
    numbers: dict[str, JsonValue] = Field(default_factory=dict)
    robust: Percent | None = Field(
        None, description="robust accuracy (all test images) at the headline ε that the check's own attack reached"
    )
    seconds: float | None = None


class Audit(Record):
    """The evaluation audit of a result: every check, and the tolerance it allowed for noise."""

    checks: list[AuditCheck]
    images: int = Field(ge=0, description="test images the checks ran on")
    tolerance: str = Field(description="how much a number may move before a check flags, in words")

    def flags(self) -> list[AuditCheck]:
        """The checks that flagged."""
        return [c for c in self.checks if c.status is AuditStatus.FLAG]

    def check(self, check_id: str) -> AuditCheck | None:
        """The check with ``check_id``, if it ran."""
        return next((c for c in self.checks if c.id == check_id), None)


class PromptRecord(Record):
    """The class names and prompt templates a run used (template drift changes zero-shot numbers)."""

    classnames: list[str]
    templates: list[str]
    seen_classes: list[int]


class Provenance(Record):
    """How the numbers were produced."""

    git_commit: str | None
    dirty: bool | None
    versions: dict[str, str]
    device: str
    seed: int
    started: str
    duration_seconds: float = Field(ge=0)
    templates: PromptRecord | None = None
    command: str | None = None


class RunInfo(Record):
    """Added by the runner: what was executed and the hash that decides whether the record is stale."""

    input_hash: str
    inputs: dict[str, str] | None = Field(
        None, description="digest of each input (notebook, parameters, code, version): what changed when stale"
    )
    notebook: str
    executed_notebook: str
    runner: str = "papermill"
    error: str | None = None


class Result(Record):
    """A reproduction's result record."""

    method: str
    profile: str
    status: RunStatus
    parameters: dict[str, Any] = Field(default_factory=dict)
    model: ModelRef | None = None
    dataset: DatasetInfo | None = None
    clean: Accuracy | None = None
    robust: list[RobustEntry] = Field(default_factory=list)
    cost: Cost | None = None
    headline: Headline | None = None
    reported: list[Reported] = Field(default_factory=list, description="the paper's numbers, from the catalog")
    findings: dict[str, JsonValue] = Field(default_factory=dict, description="method-specific measurements")
    audit: Audit | None = Field(None, description="sanity checks of this result's own evaluation")
    detection: dict[str, DetectionSection] = Field(
        default_factory=dict,
        description="a detector's operating point and detection of each attack, by variant (detection defenses)",
    )
    provenance: Provenance | None = None
    run: RunInfo | None = None

    def robust_at(self, eps: float, adaptive: bool | None = None) -> list[RobustEntry]:
        """Robust entries at ``eps`` (and of one kind of attack, when ``adaptive`` is given)."""
        return [
            r for r in self.robust if abs(r.eps.value - eps) < 1e-9 and (adaptive is None or r.adaptive == adaptive)
        ]

    def worst_robust(self, eps: float, adaptive: bool | None = None) -> float | None:
        """Lowest robust accuracy (all test images) at ``eps`` over the recorded attacks."""
        values = [r.acc.all for r in self.robust_at(eps, adaptive) if r.acc.all is not None]
        return min(values) if values else None


def result_json_schema() -> dict[str, Any]:
    """JSON Schema of ``result.json``, exported beside the catalog's (``catalog/result.schema.json``)."""
    schema = Result.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "VLM Defense Atlas reproduction result"
    return schema


def result_schema_text() -> str:
    """:func:`result_json_schema` as the committed file's text."""
    return json.dumps(result_json_schema(), indent=2, ensure_ascii=False) + "\n"


def result_path(root: Path, method: str, profile: str) -> Path:
    """``root/reproductions/<method>/<profile>/result.json``."""
    return Path(root) / "reproductions" / method / profile / RESULT_FILE


def read_result(path: Path) -> Result:
    """Read and validate one result file.

    Raises:
        ValueError: with a ``path:line: field: message`` text when the file is invalid.
    """
    problems = check_result_file(path)
    if problems:
        raise ValueError("\n".join(str(p) for p in problems))
    return Result.model_validate_json(Path(path).read_text(encoding="utf-8"))


def check_result_file(
    path: Path, known_methods: set[str] | None = None, known_profiles: set[str] | None = None
) -> list[Problem]:
    """All problems of a result file: JSON, schema, provenance present, method and profile known,
    and the file's place (``reproductions/<method>/<profile>/result.json``)."""
    shown = display_path(Path(path))
    result, text, problems = parse_record_file(path, Result)
    if result is None:
        return problems
    problems = []
    if result.provenance is None:
        problems.append(Problem(shown, 1, "provenance", "provenance missing: a result must say how it was produced"))
    if result.status is RunStatus.OK and result.clean is None:
        problems.append(Problem(shown, json_line(text, "status"), "clean", "an ok result needs clean accuracy"))
    if known_methods is not None and result.method not in known_methods:
        problems.append(Problem(shown, json_line(text, "method"), "method", f"unknown method {result.method!r}"))
    if known_profiles is not None and result.profile not in known_profiles:
        problems.append(Problem(shown, json_line(text, "profile"), "profile", f"unknown profile {result.profile!r}"))
    parts = Path(path).resolve().parts
    if len(parts) >= 3 and (parts[-3], parts[-2]) != (result.method, result.profile):
        problems.append(
            Problem(
                shown,
                json_line(text, "method"),
                "method",
                f"file belongs in reproductions/{result.method}/{result.profile}/{RESULT_FILE}",
            )
        )
    return problems
