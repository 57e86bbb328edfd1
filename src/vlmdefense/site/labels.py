"""The words the site uses for catalog values: reproduction status, cost order, assumption and flag labels."""

from __future__ import annotations

from vlmdefense.catalog.schema import Entry, Paradigm, ReproductionStatus

PARADIGM_COLOURS = {
    Paradigm.TRAINING_TIME.value: "#1f77b4",
    Paradigm.TEST_TIME_ADAPTATION.value: "#ff7f0e",
    Paradigm.TRAINING_FREE.value: "#2ca02c",
}
STATUS_LABEL = {
    ReproductionStatus.REPRODUCED: "reproduced",
    ReproductionStatus.PARTIAL: "partial",
    ReproductionStatus.PLANNED: "planned",
    ReproductionStatus.NONE: "not reproduced",
}
COST_ORDER = {"none": 0, "low": 1, "medium": 2, "high": 3}
ASSUMPTION_LABELS: dict[str, tuple[str, str | None]] = {
    "modifies_weights": ("Modifies the model's weights", "weights"),
    "needs_labels": ("Needs labelled data", "labels"),
    "training_data": ("Training data", None),
    "test_time_gradients": ("Computes gradients at inference", "test-time grads"),
    "needs_clean_reference": ("Needs a clean reference (data or the original model's outputs)", "clean ref"),
    "needs_text_encoder": ("Uses the text encoder (class prompts)", None),
    "randomized": ("Randomised prediction", None),
    "inference_time_optimization": ("Optimises per test input", None),
    "non_differentiable": ("Contains a non-differentiable step", None),
}
FLAGS = {
    "randomized": "randomized",
    "inference_time_optimization": "optimizes at inference",
    "non_differentiable": "non-differentiable",
}
SHORT_FLAGS = {"randomized": "random", "inference_time_optimization": "optimizes", "non_differentiable": "non-diff"}


def status(value: ReproductionStatus) -> str:
    """A reproduction status in words."""
    return STATUS_LABEL[value]


def cost_rank(entry: Entry) -> int:
    """The entry's cost level as a sort key (none < low < medium < high)."""
    return COST_ORDER[entry.cost.level.value]


def flags(entry: Entry) -> list[str]:
    """What makes a standard attack insufficient against ``entry``, in words."""
    return [label for key, label in FLAGS.items() if getattr(entry.assumptions, key)]


def short_flags(entry: Entry) -> list[str]:
    """:func:`flags` in a table column's words."""
    return [short for key, short in SHORT_FLAGS.items() if getattr(entry.assumptions, key)]


def assumption_tags(entry: Entry) -> list[str]:
    """The short tags of the assumptions ``entry`` makes (``tag?`` where the sources leave it open)."""
    tags = []
    for key, (_, short) in ASSUMPTION_LABELS.items():
        value = getattr(entry.assumptions, key)
        if short and value is None:
            tags.append(f"{short}?")  # the sources leave it open
        elif short and value:
            tags.append(short)
    return tags
