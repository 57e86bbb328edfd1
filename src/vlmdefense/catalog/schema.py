"""The catalog's schema: pydantic models of a defense entry and of the taxonomy.

These models are the authority; ``catalog/schema.json`` is exported from them
(:func:`entry_json_schema`) and a test fails when the exported file drifts.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vlmdefense.units import EpsilonField, Percent, parse_epsilon  # noqa: F401

ID_PATTERN = r"^[a-z0-9]+(?:-[a-z0-9]+)*$"
# New-style ids are YYMM.NNNN (April 2007 – December 2014) or YYMM.NNNNN (from January 2015), month 01–12;
# old-style ids are archive(.SUBJECT)/YYMMNNN.
ARXIV_PATTERN = (
    r"^((0[7-9]|1[0-4])(0[1-9]|1[0-2])\.\d{4}|(1[5-9]|[2-9]\d)(0[1-9]|1[0-2])\.\d{5}"
    r"|[a-z\-]+(\.[A-Z]{2})?/\d{2}(0[1-9]|1[0-2])\d{3})$"
)
DOI_PATTERN = r"^10\.\d{4,9}/\S+$"
URL_PATTERN = r"^https?://[A-Za-z0-9.-]+\.[A-Za-z]{2,}(:\d+)?(/\S*)?$"

Url = Annotated[str, Field(pattern=URL_PATTERN, description="an http(s) URL")]
MethodId = Annotated[str, Field(pattern=ID_PATTERN, description="lowercase id, words joined by '-'")]
Text = Annotated[str, Field(min_length=1)]


class StrictModel(BaseModel):
    """Base: unknown fields are errors, strings are stripped; booleans and numbers are declared ``strict``
    (``"yes"``, ``1`` or ``"2024"`` are type errors, not silently coerced)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, frozen=True)


class Paradigm(str, Enum):
    """The three paradigms of adversarial defense for vision-language models."""

    TRAINING_TIME = "training-time"
    TEST_TIME_ADAPTATION = "test-time-adaptation"
    TRAINING_FREE = "training-free"


class Norm(str, Enum):
    """Perturbation norm of a threat model."""

    LINF = "linf"
    L2 = "l2"
    L1 = "l1"
    L0 = "l0"
    UNBOUNDED = "unbounded"


class CostLevel(str, Enum):
    """Overall extra cost over the undefended model."""

    NONE = "none"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


class ReproductionStatus(str, Enum):
    """How far this project has reproduced the method."""

    REPRODUCED = "reproduced"
    PARTIAL = "partial"
    PLANNED = "planned"
    NONE = "none"


class Links(StrictModel):
    """Where to read the paper and its code."""

    arxiv: str | None = Field(None, pattern=ARXIV_PATTERN, description="arXiv id, e.g. 2212.07016")
    doi: str | None = Field(None, pattern=DOI_PATTERN, description="DOI, e.g. 10.1109/CVPR.2024.1")
    paper: Url | None = Field(None, description="the published paper (proceedings page)")
    openreview: Url | None = None
    code: Url | None = Field(None, description="official code repository")
    project: Url | None = Field(None, description="project page")


class Assumptions(StrictModel):
    """What the defense needs and changes; the last three flags decide how it must be evaluated."""

    modifies_weights: bool = Field(strict=True, description="the model's weights are changed")
    needs_labels: bool | None = Field(
        strict=True,
        description="labelled data is needed (for training or adaptation); null when the sources do not say",
    )
    training_data: str = Field(description="what data trains it ('none' for training-free)")
    test_time_gradients: bool = Field(strict=True, description="gradients are computed at inference")
    needs_clean_reference: bool | None = Field(
        strict=True,
        description="needs clean data or the original model's clean outputs as a reference; null when the sources "
        "do not say",
    )
    needs_text_encoder: bool = Field(True, strict=True, description="uses the text encoder (class prompts)")
    randomized: bool = Field(strict=True, description="the prediction is random (noise, augmentations)")
    inference_time_optimization: bool = Field(
        strict=True, description="optimises something (input, prompt, weights) per test input"
    )
    non_differentiable: bool = Field(
        strict=True, description="contains a non-differentiable step (e.g. JPEG, quantisation, diffusion sampling)"
    )

    @property
    def needs_adaptive_evaluation(self) -> bool:
        """RobustBench/AutoAttack rule: such defenses are unranked without an adaptive attack."""
        return self.randomized or self.inference_time_optimization or self.non_differentiable


class Cost(StrictModel):
    """What the defense costs over the undefended model."""

    training: str = Field(description="what is trained and how much, as the paper states it")
    inference: str = Field(description="extra work per image at inference")
    extra_forward_passes: float | None = Field(None, ge=0, strict=True, description="per image, at inference")
    extra_backward_passes: float | None = Field(None, ge=0, strict=True, description="per image, at inference")
    relative_latency: float | None = Field(None, gt=0, strict=True, description="inference time ÷ undefended")
    level: CostLevel


class ThreatModel(StrictModel):
    """The attacks the paper defends against and evaluates with."""

    norms: list[Norm] = Field(min_length=1)
    eps: list[EpsilonField] = Field(
        default_factory=list, description="budgets: '1/255', '4/255' or floats; empty when the paper does not say"
    )
    attacks: list[Text] = Field(
        default_factory=list, description="e.g. PGD-10, APGD-CE, AutoAttack, CW; empty when the paper does not say"
    )
    adaptive_attacks_evaluated: bool = Field(
        False,
        strict=True,
        description=(
            "for defenses that act at inference: the paper attacks the whole defended pipeline (an adaptive "
            "attack); a white-box attack on a fine-tuned model is the standard evaluation and leaves this false"
        ),
    )


class Targets(StrictModel):
    """Which models and tasks the defense is for."""

    models: list[Text] = Field(min_length=1, description="e.g. CLIP ViT-B/32, LLaVA-1.5")
    tasks: list[Text] = Field(min_length=1, description="e.g. zero-shot classification, VQA")


class Reported(StrictModel):
    """One number the paper reports, with its exact setting."""

    setting: Text = Field(description="what the numbers average over, in the paper's words")
    model: Text
    dataset: Text = Field(description="dataset or average over datasets")
    attack: Text = Field(description="attack and steps, e.g. 'PGD-100'")
    norm: Norm = Norm.LINF
    eps: EpsilonField
    samples: int | None = Field(None, gt=0, strict=True, description="test images per dataset, if stated")
    clean: Percent | None = Field(None, strict=True)
    robust: Percent | None = Field(None, strict=True)
    source: Text = Field(description="table or figure of the paper, e.g. 'Table 1'")

    @model_validator(mode="after")
    def _has_a_number(self) -> Reported:
        if self.clean is None and self.robust is None:
            raise ValueError("give at least one of clean or robust")
        return self


class Checkpoint(StrictModel):
    """Robust weights the authors released, as their own pages state."""

    model: Text = Field(description="the backbone the weights are for, e.g. CLIP ViT-L/14")
    url: Url = Field(description="where the weights are downloaded (model hub page or release asset)")
    setting: Text | None = Field(None, description="how they were trained, e.g. 'ImageNet, l_inf eps 4/255'")
    hub_id: str | None = Field(
        None,
        pattern=r"^hf-hub:[\w.-]+/[\w.-]+$",
        description="open_clip model id for the weights, e.g. hf-hub:owner/name, when open_clip can load them",
    )
    source: Url = Field(description="the page that states the release (README, paper, model card)")
    reported_as: Text | None = Field(
        None,
        description="the `model` of this entry's reported rows that these weights produced, so that the leaderboard "
        "puts the paper's numbers beside an evaluation of them",
    )


class Reproduction(StrictModel):
    """This project's reproduction of the method."""

    notebook: str | None = Field(None, description="path from the repository root, e.g. notebooks/tecoa.ipynb")
    status: ReproductionStatus = ReproductionStatus.NONE
    deviations: list[Text] = Field(default_factory=list, description="differences from the paper")

    @model_validator(mode="after")
    def _notebook_for_status(self) -> Reproduction:
        if self.status in {ReproductionStatus.REPRODUCED, ReproductionStatus.PARTIAL} and not self.notebook:
            raise ValueError(f"status {self.status.value!r} needs a notebook")
        return self


class Entry(StrictModel):
    """One adversarial defense of vision-language models."""

    id: MethodId
    name: Text = Field(description="short name or acronym, e.g. TeCoA")
    title: Text = Field(description="the paper's title as published")
    authors: list[Text] = Field(min_length=1, description="as listed in the paper")
    year: int = Field(ge=2015, le=2100, strict=True)
    venue: Text = Field(description="as published, e.g. 'ICLR 2023'; 'arXiv' when unpublished")
    links: Links
    paradigm: Paradigm
    family: MethodId
    summary: Text = Field(description="what it does, in our own words")
    mechanism: Text = Field(description="how it works, in our own words")
    assumptions: Assumptions
    cost: Cost
    threat_model: ThreatModel
    targets: Targets
    reported: list[Reported] = Field(default_factory=list)
    not_reported_reason: Text | None = Field(
        None, description="why no number is recorded in 'reported' (e.g. no table in any primary source)"
    )
    checkpoints: list[Checkpoint] = Field(
        default_factory=list, description="robust weights the authors released; empty when none were found"
    )
    sources: list[Url] = Field(min_length=1, description="every URL the facts were checked against")
    reproduction: Reproduction = Field(default_factory=Reproduction)
    limitations: list[Text] = Field(default_factory=list)
    related: list[MethodId] = Field(default_factory=list, description="ids of related entries")

    @field_validator("related")
    @classmethod
    def _no_repeats(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("lists an id more than once")
        return value

    @model_validator(mode="after")
    def _reported_or_reason(self) -> Entry:
        if self.reported and self.not_reported_reason:
            raise ValueError("has reported numbers and a not_reported_reason: keep one")
        if not self.reported and not self.not_reported_reason:
            raise ValueError(
                "no reported numbers: add a row to 'reported' (the paper's table, with its setting) or say why "
                "there is none in 'not_reported_reason'"
            )
        return self

    @model_validator(mode="after")
    def _checkpoints_name_reported_models(self) -> Entry:
        models = {r.model for r in self.reported}
        for checkpoint in self.checkpoints:
            if checkpoint.reported_as is not None and checkpoint.reported_as not in models:
                raise ValueError(
                    f"checkpoint {checkpoint.url}: reported_as {checkpoint.reported_as!r} is not the model of any "
                    f"reported row (one of: {', '.join(sorted(models)) or 'none'})"
                )
        return self

    @property
    def needs_adaptive_evaluation(self) -> bool:
        """Whether this entry is unranked until an adaptive attack evaluated it."""
        return self.assumptions.needs_adaptive_evaluation


class Family(StrictModel):
    """A family of methods within a paradigm."""

    id: MethodId
    name: Text
    description: Text


class ParadigmInfo(StrictModel):
    """A paradigm of the taxonomy with its families."""

    id: Paradigm
    name: Text
    description: Text
    families: list[Family] = Field(min_length=1)


class Taxonomy(StrictModel):
    """``catalog/taxonomy.yaml``: paradigms → families."""

    paradigms: list[ParadigmInfo] = Field(min_length=1)

    def families_of(self, paradigm: Paradigm | str) -> dict[str, Family]:
        """The families of ``paradigm`` by id."""
        key = Paradigm(paradigm)
        for info in self.paradigms:
            if info.id == key:
                return {f.id: f for f in info.families}
        return {}

    def paradigm_of_family(self, family: str) -> Paradigm | None:
        """The paradigm a family id belongs to, if any."""
        for info in self.paradigms:
            if any(f.id == family for f in info.families):
                return info.id
        return None

    def paradigm(self, paradigm: Paradigm | str) -> ParadigmInfo:
        """The paradigm's description."""
        key = Paradigm(paradigm)
        return next(info for info in self.paradigms if info.id == key)


def entry_json_schema() -> dict[str, Any]:
    """JSON Schema of a catalog entry (the content of ``catalog/schema.json``)."""
    schema = Entry.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://vlmdefense.github.io/atlas/schema.json"
    return schema


def schema_text() -> str:
    """The exact text of ``catalog/schema.json``."""
    return json.dumps(entry_json_schema(), indent=2, ensure_ascii=False) + "\n"
