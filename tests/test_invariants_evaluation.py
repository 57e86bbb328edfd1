"""Invariants of the evaluation and of the record's headline, on synthetic models, attacks and rows.

- correctness does not depend on the batch size; split accuracies are exact percentages whose seen and
  unseen parts average to the whole;
- robust accuracy counts the defense's predictions on the attack's images, and at ε = 0 equals clean;
- PGD never lowers the loss of a linear (convex) model;
- the robustness rows: one white-box row per ε for a static defense, a non-adaptive (base model, no EOT) and
  an adaptive (defended pipeline, EOT when randomised) row for an inference-time defense, the worst case over
  all attacks at the headline ε;
- the headline is the minimum over every row at the headline ε, separately for non-adaptive and adaptive rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from detection_helpers import detection_section
from vlmdefense.defenses.base import Defense
from vlmdefense.runs.records import Accuracy, RobustEntry
from vlmdefense.units import Epsilon
from vlmdefense.workbench import harness
from vlmdefense.workbench import robustness as robustness_module
from vlmdefense.workbench.attacks import APGD, PGD, WorstCase
from vlmdefense.workbench.data import ImageSet
from vlmdefense.workbench.evaluation import (
    EvalSets,
    PassCounter,
    accuracy,
    batched_correct,
    clean_accuracy,
    robust_accuracy,
    robust_correct,
    split_accuracy,
    time_inference,
)

FAST = settings(max_examples=25, deadline=None)
CLASSES = 4
SHAPE = (3, 4, 4)
SEEN = (0, 1)


def linear_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, CLASSES))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def image_set(seed: int, n: int, name: str = "test") -> ImageSet:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, *SHAPE, generator=generator)
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    return ImageSet(name, images, labels, tuple(str(i) for i in range(CLASSES)))


def sets_for(seed: int, n: int, transfer: int = 5) -> EvalSets:
    return EvalSets(image_set(seed, n), image_set(seed + 1, transfer, "transfer") if transfer else None, SEEN)


@FAST
@given(seed=st.integers(0, 2**16), n=st.integers(0, 20), batch=st.integers(1, 25))
def test_correctness_does_not_depend_on_the_batch_size(seed: int, n: int, batch: int) -> None:
    model = linear_model(seed % 5)
    data = image_set(seed, n)
    got = batched_correct(model, data.images, data.labels, batch)
    with torch.no_grad():
        expected = model(data.images).argmax(dim=-1) == data.labels if n else torch.zeros(0, dtype=torch.bool)
    assert got.dtype == torch.bool and torch.equal(got, expected)
    if n:
        assert accuracy(model(data.images), data.labels) == pytest.approx(100.0 * float(expected.float().mean()))
    else:
        assert accuracy(torch.zeros(0, CLASSES), data.labels) != accuracy(torch.zeros(0, CLASSES), data.labels)


@FAST
@given(st.lists(st.tuples(st.integers(0, CLASSES - 1), st.booleans()), min_size=1, max_size=30))
def test_split_accuracy_is_exact_and_its_parts_average_to_the_whole(rows: list[tuple[int, bool]]) -> None:
    labels = torch.tensor([label for label, _ in rows])
    correct = torch.tensor([ok for _, ok in rows])
    acc = split_accuracy(correct, labels, SEEN, correct[:3])

    def pct(values: list[bool]) -> float | None:
        return round(100.0 * sum(values) / len(values), 2) if values else None

    seen = [ok for label, ok in rows if label in SEEN]
    unseen = [ok for label, ok in rows if label not in SEEN]
    assert acc.all == pct([ok for _, ok in rows])
    assert (acc.seen, acc.unseen, acc.transfer) == (pct(seen), pct(unseen), pct([ok for _, ok in rows[:3]]))
    parts = sum(v * len(part) for v, part in ((acc.seen, seen), (acc.unseen, unseen)) if v is not None)
    assert acc.all == pytest.approx(parts / len(rows), abs=0.01)
    assert split_accuracy(correct, labels, SEEN).transfer is None


def fool_some(every: int) -> Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]:
    """An attack that replaces every ``every``-th image of a batch by a fixed image: it can only fool."""

    def attack(model: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[::every] = 0.5
        return out

    return attack


@FAST
@given(seed=st.integers(0, 2**16), n=st.integers(1, 16), batch=st.integers(1, 20), every=st.integers(1, 4))
def test_robust_accuracy_counts_what_the_defense_predicts_on_the_attack(
    seed: int, n: int, batch: int, every: int
) -> None:
    model = linear_model(seed % 5)
    sets = sets_for(seed, n)
    attack = fool_some(every)
    got = robust_correct(model, model, attack, sets.test, batch)
    expected = []
    for start in range(0, n, batch):
        x, y = sets.test.images[start : start + batch], sets.test.labels[start : start + batch]
        expected.append(model(attack(model, x, y)).argmax(dim=-1) == y)
    assert torch.equal(got, torch.cat(expected))
    robust, seconds = robust_accuracy(model, model, attack, sets, batch)
    assert robust == split_accuracy(
        got, sets.test.labels, SEEN, robust_correct(model, model, attack, sets.transfer, batch)
    )
    assert seconds >= 0
    # the defense predicts, the attack differentiates its target: they are not swapped
    other = linear_model(seed % 5 + 100)
    seen_targets: list[Any] = []

    def spy(target: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen_targets.append(target)
        return x

    robust, _ = robust_accuracy(model, other, spy, sets, batch)
    assert seen_targets and all(t is other for t in seen_targets)
    assert robust == clean_accuracy(model, sets, batch)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 12), norm=st.sampled_from(["linf", "l2"]))
def test_accuracy_at_eps_zero_equals_clean(seed: int, n: int, norm: str) -> None:
    model = linear_model(seed % 5)
    sets = sets_for(seed, n)
    clean = clean_accuracy(model, sets, 4)
    attacks = [PGD(eps=0.0, steps=3, norm=norm), APGD(eps=0.0, steps=3, norm=norm)]  # type: ignore[arg-type]
    for attack in [*attacks, WorstCase(attacks)]:
        robust, _ = robust_accuracy(model, model, attack, sets, 4)
        assert robust == clean
    no_transfer = EvalSets(sets.test, None, SEEN)
    assert clean_accuracy(model, no_transfer).transfer is None
    assert robust_accuracy(model, model, attacks[0], no_transfer)[0] == clean_accuracy(model, no_transfer)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), eps=st.sampled_from([4 / 255, 0.1, 0.5]), steps=st.integers(1, 5))
def test_pgd_never_lowers_the_loss_of_a_linear_model(seed: int, eps: float, steps: int) -> None:
    """The cross-entropy of a linear model is convex in the input and every PGD step (sign step, projection,
    clipping) moves each pixel along its gradient's sign or not at all: the loss of each image never goes down."""
    model = linear_model(seed % 5)
    data = image_set(seed, 12)

    def losses(x: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), data.labels, reduction="none")

    before = losses(data.images)
    adversarial = PGD(eps=eps, steps=steps, random_start=False)(model, data.images, data.labels)
    assert (losses(adversarial) >= before - 1e-5).all()


def test_time_inference_counts_per_image() -> None:
    model = linear_model(0)
    images = image_set(0, 7).images
    timing = time_inference(model, images, batch_size=3)
    assert (timing.forward_passes, timing.backward_passes) == (1.0, 0.0) and timing.seconds_per_image >= 0


def test_time_inference_predicts_every_image_once_and_reads_the_counter_per_image() -> None:
    images = image_set(0, 7).images
    counter = PassCounter(forward=99, backward=99, images=99)  # left over from an earlier phase: reset
    batches: list[int] = []

    def predict(x: torch.Tensor) -> torch.Tensor:
        batches.append(len(x))
        counter.forward += 3 * len(x)  # e.g. three views per image
        counter.backward += len(x)
        counter.images += len(x)
        return x.flatten(1)[:, :CLASSES]

    timing = time_inference(predict, images, counter, batch_size=3)
    assert batches == [3, 3, 1]
    assert (timing.forward_passes, timing.backward_passes) == (3.0, 1.0)


# ---------------------------------------------------------------------------------------------------------
# The robustness rows, with robust_accuracy replaced by a recorder.


class FakeDefense(Defense):
    """A defense whose kind and randomness the test chooses; predict and the attack surface are distinct."""

    def __init__(self, kind: str, randomized: bool) -> None:
        super().__init__()
        self.kind = kind  # type: ignore[misc]
        self.randomized = randomized  # type: ignore[misc]
        self.surface = linear_model(2)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)[:, :CLASSES]

    def attack_surface(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.surface


def fake_context(attacks: list[dict[str, Any]], eps: list[str], headline: str, eot: int = 4) -> SimpleNamespace:
    params = {
        "sweep_attack": {"name": "pgd", "steps": 3},
        "attacks": attacks,
        "eps": eps,
        "headline_eps": headline,
        "seed": 7,
        "batch_size": 8,
        "eot_samples": eot,
    }
    return SimpleNamespace(
        params=params,
        eps=[Epsilon.parse(e) for e in eps],
        headline=Epsilon.parse(headline),
        base=linear_model(1),
        sets=sets_for(0, 4),
    )


@pytest.mark.parametrize(
    ("kind", "randomized"), [("static", False), ("static", True), ("inference", False), ("inference", True)]
)
def test_robustness_rows_attack_the_right_target_with_the_right_attack(
    monkeypatch: pytest.MonkeyPatch, kind: str, randomized: bool
) -> None:
    calls: list[tuple[Any, Any, Any]] = []

    def recorder(predict: Any, target: Any, attack: Any, sets: Any, batch_size: int, desc: str) -> Any:
        assert batch_size == 8 and sets is ctx.sets and desc
        calls.append((predict, target, attack))
        return Accuracy(all=float(len(calls)), seen=None), 0.123

    monkeypatch.setattr(robustness_module, "robust_accuracy", recorder)
    attacks = [{"name": "pgd", "steps": 3}, {"name": "apgd", "steps": 5, "norm": "linf"}]
    ctx = fake_context(attacks, ["1/255", "4/255"], "4/255")
    defense = FakeDefense(kind, randomized)
    rows = robustness_module.robustness(ctx, defense)  # type: ignore[arg-type]

    targets = ["defended-model"] if kind == "static" else ["base-model", "defended-pipeline"]
    per_setting = len(targets)
    assert len(rows) == 3 * per_setting == len(calls)
    expected_eps = [e for e in ("1/255", "4/255", "4/255") for _ in targets]
    assert [r.eps.display for r in rows] == expected_eps
    assert [r.target for r in rows] == targets * 3
    assert [r.acc.all for r in rows] == [float(i) for i in range(1, len(rows) + 1)]
    eot = 4 if (kind == "inference" and randomized) else 1
    for row, (predict, target, attack) in zip(rows, calls, strict=True):
        assert predict == defense.predict  # the defense always predicts
        assert row.adaptive == (row.target == "defended-pipeline")
        expected_target = {
            "defended-model": defense.predict,
            "base-model": ctx.base,
            "defended-pipeline": defense.surface,
        }[row.target]
        assert target == expected_target
        members = attack.attacks if isinstance(attack, WorstCase) else [attack]
        assert all(m.eps == row.eps.value for m in members)
        assert all(m.eot_samples == (eot if row.adaptive else 1) for m in members)
        assert row.seconds == 0.12 and row.norm == "linf"
    sweep, worst = rows[: 2 * per_setting], rows[2 * per_setting :]
    assert all(r.attack.startswith("PGD-3") and r.steps == 3 for r in sweep)
    suffix = f"+EOT-{eot}" if eot > 1 else ""
    for row in worst:
        expected = "worst(PGD-3, APGD-CE-5)" if not row.adaptive else f"worst(PGD-3{suffix}, APGD-CE-5{suffix})"
        assert row.attack == expected and row.steps == 5


def test_robustness_adds_no_worst_case_row_when_the_sweep_attack_is_the_only_attack(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(robustness_module, "robust_accuracy", lambda *a, **k: (Accuracy(all=50.0), 0.0))
    ctx = fake_context([{"name": "pgd", "steps": 3}], ["1/255", "8/255"], "8/255")
    rows = robustness_module.robustness(ctx, FakeDefense("static", False))  # type: ignore[arg-type]
    assert [(r.eps.display, r.attack) for r in rows] == [("1/255", "PGD-3"), ("8/255", "PGD-3")]
    ctx = fake_context([{"name": "apgd", "steps": 2}], ["8/255"], "8/255")
    rows = robustness_module.robustness(ctx, FakeDefense("static", False))  # type: ignore[arg-type]
    assert [r.attack for r in rows] == ["PGD-3", "APGD-CE-2"]


def test_robustness_defaults_and_norms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``eot_samples`` an adaptive attack draws once; an L2 attack's rows say ``l2``."""
    attacks_seen: list[Any] = []

    def recorder(predict: Any, target: Any, attack: Any, *args: Any, **kwargs: Any) -> Any:
        attacks_seen.append(attack)
        return Accuracy(all=1.0), 0.0

    monkeypatch.setattr(robustness_module, "robust_accuracy", recorder)
    ctx = fake_context([{"name": "pgd", "steps": 3}], ["0.5"], "0.5")
    ctx.params["sweep_attack"] = {"name": "pgd", "steps": 3, "norm": "l2"}
    del ctx.params["eot_samples"]
    rows = robustness_module.robustness(ctx, FakeDefense("inference", True))  # type: ignore[arg-type]
    assert [r.norm for r in rows[:2]] == ["l2", "l2"] and attacks_seen[0].norm == "l2"
    assert all(a.eot_samples == 1 for a in attacks_seen)
    assert [r.norm for r in rows[2:]] == ["linf", "linf"]  # the headline attack list: PGD under L∞


def test_each_row_reseeds_so_attacks_are_repeatable(monkeypatch: pytest.MonkeyPatch) -> None:
    draws: list[float] = []

    def recorder(*args: Any, **kwargs: Any) -> Any:
        draws.append(float(torch.rand(1)))
        return Accuracy(all=1.0), 0.0

    monkeypatch.setattr(robustness_module, "robust_accuracy", recorder)
    ctx = fake_context([{"name": "pgd", "steps": 3}], ["1/255", "2/255"], "2/255")
    robustness_module.robustness(ctx, FakeDefense("inference", True))  # type: ignore[arg-type]
    torch.manual_seed(7)
    assert draws == [float(torch.rand(1))] * 4
    draws.clear()
    del ctx.params["seed"]  # a profile without a seed runs with seed 0
    robustness_module.robustness(ctx, FakeDefense("inference", True))  # type: ignore[arg-type]
    torch.manual_seed(0)
    assert draws == [float(torch.rand(1))] * 4


def test_a_row_names_an_attack_without_a_name_by_its_class(monkeypatch: pytest.MonkeyPatch) -> None:
    class Nameless:
        def __call__(self, model: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x

    monkeypatch.setattr(robustness_module, "robust_accuracy", lambda *args, **kwargs: (Accuracy(all=1.0), 0.0))
    monkeypatch.setattr(robustness_module, "make_attack", lambda *args, **kwargs: Nameless())
    ctx = fake_context([{"name": "pgd", "steps": 3}], ["1/255"], "1/255")
    rows = robustness_module.robustness(ctx, FakeDefense("static", False))  # type: ignore[arg-type]
    assert [(r.attack, r.norm) for r in rows] == [("Nameless", "linf")]


# ---------------------------------------------------------------------------------------------------------
# The headline of harness.evaluate, on synthetic rows.

EPS_CHOICES = ["1/255", "4/255", "8/255"]
row_strategy = st.builds(
    lambda eps, adaptive, value: RobustEntry(
        attack="synthetic",
        eps=Epsilon.parse(eps),
        steps=1,
        adaptive=adaptive,
        target="defended-pipeline" if adaptive else "base-model",
        acc=Accuracy(all=value),
    ),
    st.sampled_from(EPS_CHOICES),
    st.booleans(),
    st.one_of(st.none(), st.floats(0, 100, allow_nan=False).map(lambda v: round(v, 3))),
)


def evaluate_with_rows(
    monkeypatch: pytest.MonkeyPatch,
    rows: list[RobustEntry],
    headline: str,
    clean: float,
    audit_values: Sequence[float | None] = (),
    timing: tuple[float, float, float] = (0.001, 1.0, 0.0),
    calls: dict[str, tuple[Any, ...]] | None = None,
    defense: Defense | None = None,
    **context: Any,
) -> Any:
    """``harness.evaluate`` on a context whose measurements are given: clean accuracy, the robust rows, the
    robust accuracies the audit's checks reached at the headline ε, the inference timing and any context
    attribute (``context``). Each stand-in notes the arguments it was called with in ``calls``."""
    from vlmdefense.runs.records import Audit, AuditCheck, AuditStatus, Provenance
    from vlmdefense.workbench.evaluation import Timing

    checks = [
        AuditCheck(id=f"check-{i}", title="t", status=AuditStatus.PASS, detail="d", robust=value)
        for i, value in enumerate(audit_values)
    ]
    calls = {} if calls is None else calls

    def recorded(name: str, value: Any) -> Callable[..., Any]:
        def stand_in(*args: Any, **kwargs: Any) -> Any:
            calls[name] = (*args, *kwargs.values())
            return value

        return stand_in

    monkeypatch.setattr(harness, "run_audit", recorded("run_audit", Audit(checks=checks, images=3, tolerance="none")))
    monkeypatch.setattr(harness, "clean_accuracy", recorded("clean_accuracy", Accuracy(all=clean)))
    monkeypatch.setattr(harness, "robustness", recorded("robustness", list(rows)))
    monkeypatch.setattr(harness, "time_inference", recorded("time_inference", Timing(*timing)))
    monkeypatch.setattr(harness, "_reported", recorded("_reported", []))
    stored = Provenance(
        git_commit=None, dirty=None, versions={}, device="cpu", seed=0, started="now", duration_seconds=0.0
    )
    monkeypatch.setattr(harness, "provenance", recorded("provenance", stored))
    prompts = SimpleNamespace(
        seen_classes=SEEN, as_dict=lambda: {"classnames": ["a"], "templates": ["{name}"], "seen_classes": [0]}
    )
    ctx = SimpleNamespace(
        method="synthetic",
        profile="quick",
        params={"batch_size": 4, "model": {"name": "m", "pretrained": None}, "seed": 0},
        sets=sets_for(0, 3),
        headline=Epsilon.parse(headline),
        clip=SimpleNamespace(pretrained=None),
        model_card=None,
        prompts=prompts,
        train_seconds=0.0,
        findings={},
        detection={},
        root=Path("."),
        device="cpu",
        started="now",
        start_time=0.0,
    )
    for key, value in context.items():
        setattr(ctx, key, value)
    return harness.evaluate(ctx, defense or FakeDefense("inference", False))  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(row_strategy, max_size=8),
    headline=st.sampled_from(EPS_CHOICES),
    clean=st.floats(0, 100),
    audit_values=st.lists(st.one_of(st.none(), st.floats(0, 100).map(lambda v: round(v, 2))), max_size=4),
)
def test_the_headline_is_the_minimum_over_every_row_at_its_eps_and_every_audit_check(
    rows: list[RobustEntry], headline: str, clean: float, audit_values: list[float | None]
) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        result = evaluate_with_rows(monkeypatch, rows, headline, clean, audit_values)
    value = Epsilon.parse(headline).value
    found = [v for v in audit_values if v is not None]
    for adaptive, got in ((False, result.headline.robust), (True, result.headline.robust_adaptive)):
        at = [r.acc.all for r in rows if r.eps.value == value and r.adaptive == adaptive and r.acc.all is not None]
        # the defense acts at inference, so the audit lowers the adaptive (final) worst case
        candidates = at + (found if adaptive and at else [])
        assert got == (round(min(candidates), 2) if at else None)
        assert all(got is not None and got <= a + 0.005 for a in candidates)  # never above any row or check
        lowered = adaptive and at and found and min(found) < round(min(at), 2)
        assert bool(lowered) == bool(adaptive and result.headline.lowered_by)
    assert result.worst_robust(0.5) is None and result.robust_at(0.5) == []
    assert result.headline.eps == Epsilon.parse(headline) and result.headline.clean == clean
    assert result.robust == rows and result.clean == Accuracy(all=clean)


def test_the_headline_ignores_rows_at_other_eps_and_the_other_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    def row(eps: str, adaptive: bool, value: float) -> RobustEntry:
        return RobustEntry(
            attack="a", eps=Epsilon.parse(eps), steps=1, adaptive=adaptive, target="t", acc=Accuracy(all=value)
        )

    rows = [row("8/255", False, 40.0), row("8/255", False, 30.0), row("8/255", True, 20.0), row("4/255", False, 5.0)]
    result = evaluate_with_rows(monkeypatch, rows, "8/255", 90.0)
    assert (result.headline.robust, result.headline.robust_adaptive, result.headline.clean) == (30.0, 20.0, 90.0)
    result = evaluate_with_rows(monkeypatch, rows[:2], "8/255", 90.0)
    assert (result.headline.robust, result.headline.robust_adaptive) == (30.0, None)


def test_the_record_says_what_the_context_and_the_measurements_said(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every part of the record other than the headline: identity, parameters, model, data, cost (rounded as
    stored), findings and detection sections passed through unchanged."""
    from vlmdefense.runs.records import Cost, RunStatus

    section = detection_section()
    params = {"batch_size": 4, "model": {"name": "m", "pretrained": None}, "seed": 3, "eps": ["8/255"]}
    result = evaluate_with_rows(
        monkeypatch,
        [],
        "8/255",
        90.0,
        timing=(0.00123456789, 2.3456, 1.4567),
        params=params,
        train_seconds=12.3456,
        findings={"note": 1},
        detection={"deployed": section},
        model_card={"recipe_key": "k", "sha256": "h", "train_seconds": 1.0, "metrics": {"a": 1.0}, "parameters": 7},
    )
    assert (result.method, result.profile, result.status) == ("synthetic", "quick", RunStatus.OK)
    assert result.parameters == params
    assert result.cost == Cost(
        train_seconds=12.35, inference_seconds_per_image=0.001235, forward_passes=2.35, backward_passes=1.46
    )
    assert result.findings == {"note": 1} and result.detection == {"deployed": section}
    assert result.model is not None and result.model.name == "m" and result.model.pretrained is None
    assert result.model.card is not None and result.model.card.sha256 == "h" and result.model.card.parameters == 7
    assert (result.model.card.recipe_key, result.model.card.metrics) == ("k", {"a": 1.0})
    assert result.dataset is not None
    assert (result.dataset.test, result.dataset.test_images) == ("test", 3)
    assert (result.dataset.transfer, result.dataset.transfer_images) == ("transfer", 5)
    assert result.dataset.seen_classes == list(SEEN)
    assert result.reported == [] and result.provenance is not None and result.audit is not None


def test_evaluate_gives_each_measurement_the_run_s_own_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Which predictor, sets, batch size, context and rows each measurement receives, what provenance is told, and
    that a static defense's audit lowers the non-adaptive headline."""
    from vlmdefense.runs.records import PromptRecord

    calls: dict[str, tuple[Any, ...]] = {}
    defense = FakeDefense("static", False)
    rows = [
        RobustEntry(
            attack="PGD",
            eps=Epsilon.parse("8/255"),
            steps=1,
            adaptive=False,
            target="defended-model",
            acc=Accuracy(all=40.0),
        )
    ]
    monkeypatch.setenv("VLMDEFENSE_COMMAND", "vlmdefense run synthetic")
    params = {"batch_size": 5, "model": {"name": "m", "pretrained": "openai"}, "seed": 3}
    result = evaluate_with_rows(
        monkeypatch,
        rows,
        "8/255",
        90.0,
        [25.0],
        calls=calls,
        defense=defense,
        params=params,
        clip=SimpleNamespace(pretrained="weights/openai.pt"),
        start_time=time.perf_counter(),
    )
    ctx = calls["robustness"][0]
    assert calls["robustness"] == (ctx, defense)
    assert calls["clean_accuracy"] == (defense.predict, ctx.sets, 5)
    assert calls["run_audit"] == (ctx, defense, Accuracy(all=90.0), rows)
    assert calls["time_inference"] == (defense.predict, ctx.sets.test.images, defense.counter, 5)
    assert calls["_reported"] == ("synthetic", ctx.root)
    root, device, seed, started, duration, prompts, command = calls["provenance"]
    assert (root, device, seed, started, command) == (ctx.root, "cpu", 3, "now", "vlmdefense run synthetic")
    assert 0 <= duration < 60 and prompts == PromptRecord.model_validate(ctx.prompts.as_dict())
    headline = result.headline
    assert (headline.robust, headline.robust_adaptive, headline.lowered_by) == (25.0, None, ["check-0"])
    assert result.model.pretrained == "weights/openai.pt"  # the weights the run loaded, for a named tag


def test_a_run_without_audit_seed_transfer_or_weights_records_each_absence(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, tuple[Any, ...]] = {}
    params = {"batch_size": 4, "model": {"name": "m", "pretrained": ""}, "audit": False}
    sets = EvalSets(image_set(0, 3), None, SEEN)
    result = evaluate_with_rows(
        monkeypatch,
        [],
        "8/255",
        90.0,
        [1.0],
        calls=calls,
        params=params,
        sets=sets,
        clip=SimpleNamespace(pretrained="random"),
    )
    assert result.audit is None and "run_audit" not in calls
    assert calls["provenance"][2] == 0  # no seed in the profile: seed 0
    assert result.dataset is not None and (result.dataset.transfer, result.dataset.transfer_images) == (None, 0)
    assert result.model is not None and result.model.pretrained == ""  # no weights were named: none recorded


def test_a_parameter_the_record_cannot_hold_fails_before_any_attack(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, tuple[Any, ...]] = {}
    params = {"batch_size": 4, "model": {"name": "m", "pretrained": None}, "callback": object()}
    with pytest.raises(TypeError, match="not JSON serializable"):
        evaluate_with_rows(monkeypatch, [], "8/255", 90.0, calls=calls, params=params)
    assert calls == {}


# ---------------------------------------------------------------------------------------------------------
# Timing, splits without seen classes, and the zero-shot classifier.


def test_seconds_per_image_are_the_elapsed_time_over_the_images() -> None:
    import time as clock

    def slow(x: torch.Tensor) -> torch.Tensor:
        clock.sleep(0.02)
        return x.flatten(1)[:, :CLASSES]

    for n in (1, 5):
        images = image_set(0, n).images
        started = clock.perf_counter()
        timing = time_inference(slow, images, batch_size=2)
        elapsed = clock.perf_counter() - started
        batches = (n + 1) // 2
        assert 0.02 * batches / n <= timing.seconds_per_image <= elapsed / n
    sets = sets_for(0, 4)
    started = clock.perf_counter()
    _, seconds = robust_accuracy(slow, slow, lambda model, x, y: x, sets, batch_size=8)
    assert 0.04 <= seconds <= clock.perf_counter() - started  # one batch of test and one of transfer images


def test_without_seen_classes_there_is_no_seen_or_unseen_split() -> None:
    accuracy = split_accuracy(torch.tensor([True, False]), torch.tensor([0, 1]), [])
    assert (accuracy.all, accuracy.seen, accuracy.unseen, accuracy.transfer) == (50.0, None, None, None)


class FakeClip:
    """A LoadedClip stand-in: text embeddings from a table, images embedded by their first pixels."""

    def __init__(self, table: dict[str, list[float]], logit_scale: float) -> None:
        self.table = table
        self.model = nn.Linear(2, 2)
        self.model.logit_scale = nn.Parameter(torch.tensor(logit_scale).log())  # type: ignore[assignment]

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.tensor([self.table[t] for t in texts]), dim=-1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(images.flatten(1)[:, :2], dim=-1)


def test_the_zero_shot_classifier_ensembles_prompts_and_scales_cosines() -> None:
    from vlmdefense.workbench.evaluation import ZeroShotClassifier, text_classifier_weights

    table = {"a 0": [1.0, 0.0], "b 0": [1.0, 1.0], "a 1": [0.0, 1.0], "b 1": [0.0, 3.0]}
    prompts = SimpleNamespace(classnames=["zero", "one"], prompts=lambda i: [f"a {i}", f"b {i}"])
    clip = FakeClip(table, logit_scale=10.0)
    mean = (torch.tensor([1.0, 0.0]) + torch.tensor([1.0, 1.0]) / 2**0.5) / 2
    expected = torch.stack([mean / mean.norm(), torch.tensor([0.0, 1.0])])
    weights = text_classifier_weights(clip, prompts)  # type: ignore[arg-type]
    assert torch.allclose(weights, expected, atol=1e-6)
    classifier = ZeroShotClassifier(clip, prompts)  # type: ignore[arg-type]
    assert classifier.clip is clip and classifier.prompts is prompts and classifier.logit_scale == pytest.approx(10.0)
    assert any(p is clip.model.weight for p in classifier.parameters())  # the CLIP's weights are registered
    images = torch.tensor([[[[3.0]], [[4.0]]]])  # one 2-pixel image: unit embedding (0.6, 0.8)
    assert torch.allclose(classifier(images), 10.0 * torch.tensor([0.6, 0.8]) @ expected.T, atol=1e-5)
    tuned = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert torch.equal(ZeroShotClassifier(clip, prompts, tuned).text_weights, tuned)  # type: ignore[arg-type]
