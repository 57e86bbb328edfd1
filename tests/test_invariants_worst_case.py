"""Invariants of the per-example worst case that the purification defenses report (JPEG, DiffPure, DiffPure-VLM,
CLIPure, DiffCAP): an image is robust only when it survives every (surface, attack) run, so the worst case is
never above any run, equals the share of images no run fooled, and the record's adaptive headline takes it only
when it is lower and at the headline's ε. Synthetic model and attacks: each attack fools a known set of images.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmdefense.defenses.training_free.worst_case import per_example_worst, surface_worst_case, with_worst_case_row
from vlmdefense.runs.records import Accuracy, Headline, Result, RunStatus
from vlmdefense.units import Epsilon
from vlmdefense.workbench.attacks import WorstCase
from vlmdefense.workbench.data import ImageSet
from vlmdefense.workbench.evaluation import EvalSets

CLASSES = 4
SEEN = (0, 1)


def model(x: torch.Tensor) -> torch.Tensor:
    """Logits whose argmax is the label stored in channel 0, shifted by one when channel 1 is marked (> 0.5)."""
    label = (x[:, 0, 0, 0] * 10).round().long()
    predicted = torch.where(x[:, 1, 0, 0] > 0.5, (label + 1) % CLASSES, label)
    return torch.nn.functional.one_hot(predicted, CLASSES).float()


def images_for(labels: list[int], offset: int = 0) -> ImageSet:
    """Images that carry their label (channel 0) and a unique id (channel 2)."""
    n = len(labels)
    x = torch.zeros(n, 3, 1, 1)
    x[:, 0, 0, 0] = torch.tensor(labels, dtype=torch.float32) / 10
    x[:, 2, 0, 0] = (torch.arange(n, dtype=torch.float32) + offset) / 100
    return ImageSet("synthetic", x, torch.tensor(labels), tuple(str(c) for c in range(CLASSES)))


class Fooling:
    """An attack that marks exactly the images whose id is in ``fooled`` (and only those)."""

    def __init__(self, name: str, fooled: set[int]) -> None:
        self.name = name
        self.fooled = fooled
        self.targets: list[object] = []

    def __call__(self, target: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.targets.append(target)
        ids = (x[:, 2, 0, 0] * 100).round().long().tolist()
        out = x.clone()
        for row, image_id in enumerate(ids):
            if image_id in self.fooled:
                out[row, 1, 0, 0] = 1.0
        return out


def pct(count: int, n: int) -> float:
    return round(100.0 * count / n, 2)


labels_st = st.lists(st.integers(0, CLASSES - 1), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), labels=labels_st, transfer=st.lists(st.integers(0, CLASSES - 1), min_size=1, max_size=6))
def test_the_worst_case_counts_only_images_that_survive_every_run(
    data: st.DataObject, labels: list[int], transfer: list[int]
) -> None:
    n, m = len(labels), len(transfer)
    sets = EvalSets(images_for(labels), images_for(transfer, offset=50), SEEN)
    ids = list(range(n)) + list(range(50, 50 + m))
    runs_fooled = data.draw(st.lists(st.sets(st.sampled_from(ids)), min_size=1, max_size=3))
    surfaces = [lambda x, k=k: model(x) for k in range(len(runs_fooled))]  # one distinct surface per run
    runs = {f"run{k}": (surfaces[k], Fooling(f"A{k}", fooled)) for k, fooled in enumerate(runs_fooled)}
    out = per_example_worst(model, runs, sets, batch_size=data.draw(st.integers(1, 5)))
    for surface, attack in runs.values():  # each attack differentiated its own surface, on test and transfer
        assert attack.targets and all(target is surface for target in attack.targets)
    assert 0 <= out["seconds"] < 60
    union = set().union(*runs_fooled)
    worst: Accuracy = out["worst"]
    assert worst.all == pct(sum(i not in union for i in range(n)), n)
    assert worst.transfer == pct(sum(50 + i not in union for i in range(m)), m)
    seen = [i for i in range(n) if labels[i] in SEEN]
    assert worst.seen == (pct(sum(i not in union for i in seen), len(seen)) if seen else None)
    for name, fooled in zip(runs, runs_fooled, strict=True):
        single: Accuracy = out["per_surface"][name]
        assert single.all == pct(sum(i not in fooled for i in range(n)), n)
        assert worst.all is not None and single.all is not None and worst.all <= single.all
        assert worst.transfer is not None and single.transfer is not None and worst.transfer <= single.transfer
    assert out["attack"] == ", ".join(dict.fromkeys(f"A{k}" for k in range(len(runs_fooled))))


def test_one_attack_through_each_surface_and_no_runs() -> None:
    sets = EvalSets(images_for([0, 1, 2, 3]), None, SEEN)
    attack = WorstCase([Fooling("A", {0, 1})])
    out = surface_worst_case(model, {"identity": model, "approx": model}, sets, attack, 2)
    assert set(out["per_surface"]) == {"identity", "approx"} and out["worst"].all == 50.0
    assert out["worst"].transfer is None and out["attack"] == "A"
    with pytest.raises(ValueError, match="no attack runs"):
        per_example_worst(model, {}, sets, 2)


def record(robust_adaptive: float | None, eps: str = "8/255") -> Result:
    headline = Headline(eps=Epsilon.parse(eps), clean=90.0, robust=40.0, robust_adaptive=robust_adaptive)
    return Result(method="m", profile="smoke", status=RunStatus.OK, clean=Accuracy(all=90.0), headline=headline)


@pytest.mark.parametrize(
    ("current", "worst", "eps", "expected"),
    [
        (30.0, 20.0, "8/255", 20.0),  # lower: taken
        (30.0, 35.0, "8/255", 30.0),  # higher: the headline stays
        (None, 35.0, "8/255", 35.0),  # no adaptive row yet: taken
        (30.0, 20.0, "4/255", 30.0),  # another ε: the headline stays
    ],
)
def test_the_worst_case_row_lowers_the_adaptive_headline_only_when_lower_at_its_eps(
    current: float | None, worst: float, eps: str, expected: float
) -> None:
    outcome = {
        "per_surface": {"identity": Accuracy(all=50.0), "approx": Accuracy(all=60.0)},
        "worst": Accuracy(all=worst),
        "seconds": 1.234,
        "attack": "worst(PGD-10, APGD-CE-10)",
    }
    out = with_worst_case_row(record(current), Epsilon.parse(eps), outcome, steps=10)
    row = out.robust[-1]
    assert row.attack == "worst(PGD-10, APGD-CE-10; through identity, approx)"
    assert row.adaptive and row.target == "defended-pipeline" and row.steps == 10 and row.seconds == 1.23
    assert row.eps.display == eps and row.acc.all == worst
    assert out.headline is not None and out.headline.robust_adaptive == expected
    assert out.headline.robust == 40.0  # the non-adaptive headline is not touched


class Drawing(Fooling):
    """A fooling attack that also notes the first random number it draws in each run (a random start would)."""

    def __init__(self) -> None:
        super().__init__("Draw", set())
        self.draws: list[float] = []

    def __call__(self, target: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.draws.append(torch.rand(1).item())
        return super().__call__(target, x, y)


def first_draw(seed: int) -> float:
    """The first number torch draws after ``torch.manual_seed(seed)``."""
    return torch.rand(1, generator=torch.Generator().manual_seed(seed)).item()


@pytest.mark.parametrize("seed", [None, 5])
def test_every_surface_is_attacked_from_the_same_seed(seed: int | None) -> None:
    """Each run is repeatable alone and no surface inherits another's random state; the default seed is 0."""
    sets = EvalSets(images_for([0, 1, 2]), None, SEEN)
    attack = Drawing()
    surfaces = {"a": model, "b": lambda x: model(x), "c": lambda x: model(x)}
    if seed is None:
        surface_worst_case(model, surfaces, sets, attack, batch_size=8)  # type: ignore[arg-type]
    else:
        surface_worst_case(model, surfaces, sets, attack, batch_size=8, seed=seed)  # type: ignore[arg-type]
    assert attack.draws == [first_draw(0 if seed is None else seed)] * 3


def test_per_example_worst_defaults_to_seed_0_names_nameless_attacks_by_run_and_needs_a_run() -> None:
    sets = EvalSets(images_for([0, 1]), None, SEEN)
    attack = Drawing()
    del attack.name  # an attack without a name is reported under its run's name
    outcome = per_example_worst(model, {"jpeg-q50": (model, attack)}, sets, batch_size=4)
    assert attack.draws == [first_draw(0)] and outcome["attack"] == "jpeg-q50"
    with pytest.raises(ValueError, match=r"^per_example_worst: no attack runs$"):
        per_example_worst(model, {}, sets, batch_size=4)
