"""The audit's verdicts from numbers alone, its gradient check and reference attacks on toy models (fast;
also the tests ``make mutation`` runs against the audit's rules)."""

from __future__ import annotations

import pytest
import torch

from vlmdefense.runs.records import Accuracy, AuditCheck, AuditStatus, Headline, RobustEntry
from vlmdefense.units import Epsilon
from vlmdefense.workbench.audit import AuditSettings
from vlmdefense.workbench.audit_gradients import gradient_check, margin_loss
from vlmdefense.workbench.audit_rules import (
    lowered_headline,
    monotonicity,
    one_image,
    sweep_points,
    tolerance,
    tolerance_words,
)
from vlmdefense.workbench.reference_attacks import AutoAttackSuite, Square


def row(eps: str, value: float, adaptive: bool = False, attack: str = "PGD-10") -> RobustEntry:
    target = "defended-pipeline" if adaptive else "defended-model"
    return RobustEntry(
        attack=attack, eps=Epsilon.parse(eps), steps=10, adaptive=adaptive, target=target, acc=Accuracy(all=value)
    )


def test_a_curve_that_rises_with_eps_is_flagged_and_bounds_the_headline() -> None:
    # CLIPure's smoke curve before the audit: 1.7 % at 8/255, about 25 % at 16/255
    rows = [row("4/255", 9.0, True), row("8/255", 1.67, True), row("16/255", 25.0, True)]
    check = monotonicity(rows, 77.5, Epsilon.parse("16/255"), True, n=360, randomized=False)
    assert check.status is AuditStatus.FLAG
    assert check.numbers["rises"] == [
        {"attack": "adaptive", "from_eps": "8/255", "from": 1.67, "to_eps": "16/255", "to": 25.0}
    ]
    assert check.robust == 1.67  # the 8/255 ball lies inside the 16/255 one


def test_a_falling_curve_passes_and_small_noise_is_tolerated_for_random_defenses() -> None:
    rows = [row("4/255", 40.0, True), row("8/255", 20.0, True), row("16/255", 21.0, True)]
    assert monotonicity(rows, 90.0, Epsilon.parse("8/255"), True, 360, randomized=True).status is AuditStatus.PASS
    assert monotonicity(rows, 90.0, Epsilon.parse("8/255"), True, 360, randomized=False).status is AuditStatus.FLAG
    assert tolerance(50.0, 100, randomized=False) == 1.0
    assert tolerance(50.0, 100, randomized=True) == pytest.approx(10.0)


def test_the_headline_takes_the_lowest_check_and_names_it() -> None:
    headline = Headline(eps=Epsilon.parse("8/255"), clean=90.0, robust=30.0, robust_adaptive=20.0)
    checks = [
        AuditCheck(id="convergence", title="c", status=AuditStatus.FLAG, detail="d", robust=12.5),
        AuditCheck(id="black-box", title="b", status=AuditStatus.PASS, detail="d", robust=40.0),
        AuditCheck(id="transfer", title="t", status=AuditStatus.PASS, detail="d", robust=19.0),
    ]
    lowered = lowered_headline(headline, checks, final_adaptive=True)
    assert (lowered.robust, lowered.robust_adaptive, lowered.lowered_by) == (30.0, 12.5, ["convergence", "transfer"])
    static = lowered_headline(headline, checks, final_adaptive=False)
    assert (static.robust, static.lowered_by) == (12.5, ["convergence", "transfer"])
    higher = [AuditCheck(id="x", title="x", status=AuditStatus.PASS, detail="d", robust=35.0)]
    assert lowered_headline(headline, higher, final_adaptive=False) == headline


def test_the_margin_loss_keeps_a_gradient_where_cross_entropy_saturates() -> None:
    x = torch.zeros(1, 3, requires_grad=True)
    logits = torch.stack([x[0, 0] + 200.0, x[0, 1], x[0, 2]])[None]
    labels = torch.tensor([0])
    (ce,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, labels), x, retain_graph=True)
    (margin,) = torch.autograd.grad(margin_loss(logits, labels), x)
    assert ce.abs().sum() == 0 and margin.abs().sum() > 0


def test_a_pipeline_without_gradients_is_flagged() -> None:
    images, labels = torch.rand(6, 3, 4, 4), torch.arange(6) % 3
    weight = torch.randn(48, 3)

    def linear(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ weight

    def quantised(x: torch.Tensor) -> torch.Tensor:
        return linear(torch.round(x * 4) / 4)  # round has a zero gradient everywhere

    assert gradient_check(linear, images, labels, 4).status is AuditStatus.PASS
    flagged = gradient_check(quantised, images, labels, 4)
    assert flagged.status is AuditStatus.FLAG and flagged.numbers["margin_zero"] == 6


def test_the_reference_attacks_stay_in_the_budget() -> None:
    torch.manual_seed(0)
    weight = torch.randn(48, 5)
    images, labels = torch.rand(5, 3, 4, 4), torch.arange(5)

    def model(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ weight

    for attack in (Square(eps=4 / 255, queries=20), AutoAttackSuite(eps=4 / 255, n_classes=5, steps=2, queries=10)):
        adversarial = attack(model, images, labels)
        assert (adversarial - images).abs().max() <= 4 / 255 + 1e-6
        assert adversarial.min() >= 0 and adversarial.max() <= 1
    suite = AutoAttackSuite(eps=1 / 255, n_classes=3, version="rand", steps=2, eot_samples=2)
    assert suite.name.startswith("AutoAttack-rand (APGD-CE, APGD-DLR") and suite.reduced
    assert not AutoAttackSuite(eps=1 / 255, n_classes=3).reduced


def test_unknown_audit_settings_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown audit setting"):
        AuditSettings.from_params({"audit": {"square_querys": 3}})
    assert AuditSettings.from_params({"audit": {"restarts": 5}}).restarts == 5


def test_sweep_points_are_the_sweep_of_one_kind_with_clean_first() -> None:
    rows = [
        row("8/255", 20.0, True),
        row("4/255", 30.0, True),
        row("4/255", 50.0, False),
        row("8/255", 5.0, True, attack="worst(PGD-10, APGD-CE-10)"),
        RobustEntry(
            attack="PGD-10", eps=Epsilon.parse("2/255"), steps=10, adaptive=True, target="t", acc=Accuracy(all=None)
        ),
    ]
    points = sweep_points(rows, 90.0, adaptive=True)
    assert [(e.display, a) for e, a in points] == [("0", 90.0), ("4/255", 30.0), ("8/255", 20.0)]
    assert [(e.display, a) for e, a in sweep_points(rows, None, adaptive=False)] == [("4/255", 50.0)]


def test_monotonicity_bounds_only_with_its_kind_up_to_the_headline() -> None:
    rows = [row("2/255", 12.0, True), row("8/255", 15.0, True), row("16/255", 3.0, True), row("4/255", 1.0, False)]
    check = monotonicity(rows, 80.0, Epsilon.parse("8/255"), True, n=100, randomized=False)
    assert (check.id, check.title) == ("monotonic", "Accuracy does not rise with ε")
    assert check.robust == 12.0  # not 3.0 (beyond the headline), not 1.0 (the other kind)
    assert check.numbers["curves"] == {
        "non-adaptive": [["0", 80.0], ["4/255", 1.0]],
        "adaptive": [["0", 80.0], ["2/255", 12.0], ["8/255", 15.0], ["16/255", 3.0]],
    }
    assert [r["to_eps"] for r in check.numbers["rises"]] == ["8/255"]
    at_headline = monotonicity(rows, 80.0, Epsilon.parse("2/255"), True, n=100, randomized=False)
    assert at_headline.robust == 12.0 and at_headline.status is AuditStatus.FLAG
    rounded = monotonicity([row("8/255", 12.3456, True)], 80.0, Epsilon.parse("8/255"), True, 100, False)
    assert rounded.robust == 12.35


def test_a_rise_of_exactly_the_tolerance_passes_and_a_drop_after_a_tie_is_measured_from_the_first() -> None:
    rows = [row("4/255", 20.0), row("8/255", 21.0)]  # one image of 100 = 1 point: allowed
    assert monotonicity(rows, 90.0, Epsilon.parse("8/255"), False, 100, False).status is AuditStatus.PASS
    tie = [row("2/255", 20.0), row("4/255", 20.0), row("8/255", 21.5)]
    check = monotonicity(tie, 90.0, Epsilon.parse("8/255"), False, 100, False)
    rise = {"attack": "non-adaptive", "from_eps": "2/255", "from": 20.0, "to_eps": "8/255", "to": 21.5}
    assert check.numbers["rises"] == [rise]
    wider = monotonicity(tie, 90.0, Epsilon.parse("8/255"), False, 100, randomized=True, noise_sd=1.0)
    assert wider.status is AuditStatus.PASS  # 1 standard error of 20 % over 100 images is 4 points


def test_monotonicity_skips_a_sweep_without_two_points() -> None:
    for rows, clean in (([], None), ([row("8/255", 10.0)], None)):
        check = monotonicity(rows, clean, Epsilon.parse("8/255"), False, 100, False)
        assert (check.id, check.status, check.robust) == ("monotonic", AuditStatus.SKIP, None)
        assert check.detail == "fewer than two points on the ε sweep"
    two = monotonicity([row("8/255", 10.0)], 90.0, Epsilon.parse("8/255"), False, 100, False)
    assert two.status is AuditStatus.PASS


def test_tolerance_edges() -> None:
    assert one_image(0) == 100.0 and one_image(1) == 100.0 and one_image(400) == 0.25
    assert tolerance(None, 100, randomized=True) == 1.0
    assert tolerance(100.0, 100, randomized=True) == pytest.approx(2.0)  # p(1-p) floored at 1/n
    assert tolerance(150.0, 100, randomized=True) == tolerance(100.0, 100, randomized=True)
    assert tolerance(50.0, 1, randomized=True) == pytest.approx(200.0)  # p(1-p) floored at 1/n = 1
    assert tolerance(50.0, 4, randomized=True, noise_sd=1.0) == pytest.approx(25.0)
    assert "one test image (1.00 points of 100)" in tolerance_words(100, False, 2.0)
    assert tolerance_words(100, True, 2.0).startswith("2 binomial standard errors of the accuracy over 100 images")


def test_a_check_equal_to_the_recorded_worst_case_lowers_nothing() -> None:
    headline = Headline(eps=Epsilon.parse("8/255"), clean=90.0, robust=30.0, robust_adaptive=None)
    same = [AuditCheck(id="a", title="a", status=AuditStatus.PASS, detail="d", robust=30.0)]
    assert lowered_headline(headline, same, final_adaptive=False) == headline
    lower = [*same, AuditCheck(id="b", title="b", status=AuditStatus.FLAG, detail="d", robust=29.994)]
    lowered = lowered_headline(headline, lower, final_adaptive=False)
    assert (lowered.robust, lowered.lowered_by) == (29.99, ["b"])
    assert lowered_headline(headline, lower, final_adaptive=True) == headline  # no adaptive number to lower


def test_the_noise_tolerance_reaches_the_rise_test_and_a_missing_kind_bounds_nothing() -> None:
    tie = [row("2/255", 20.0), row("8/255", 21.5)]
    strict = monotonicity(tie, 90.0, Epsilon.parse("8/255"), False, 100, randomized=True, noise_sd=0.1)
    assert strict.status is AuditStatus.FLAG  # 0.1 standard errors < one image: the 1.5-point rise counts
    only_static = monotonicity(tie, 90.0, Epsilon.parse("8/255"), True, 100, randomized=False)
    assert only_static.robust is None  # no adaptive curve to bound the adaptive headline


def test_a_single_sweep_point_skips_the_monotonicity_check_under_its_title() -> None:
    check = monotonicity([row("8/255", 20.0)], None, Epsilon.parse("8/255"), False, 100, False)
    assert (check.id, check.title, check.status) == ("monotonic", "Accuracy does not rise with ε", AuditStatus.SKIP)
    assert check.detail == "fewer than two points on the ε sweep" and check.robust is None


def test_a_random_defense_is_allowed_two_standard_errors_by_default() -> None:
    # 20 % of 360 images: one standard error is 2.11 points, so a rise of 5 points exceeds two of them
    rows = [row("4/255", 40.0, True), row("8/255", 20.0, True), row("16/255", 25.0, True)]
    assert monotonicity(rows, 90.0, Epsilon.parse("8/255"), True, 360, randomized=True).status is AuditStatus.FLAG
    wider = monotonicity(rows, 90.0, Epsilon.parse("8/255"), True, 360, randomized=True, noise_sd=3.0)
    assert wider.status is AuditStatus.PASS


def test_a_check_that_only_matches_the_headline_does_not_lower_it() -> None:
    headline = Headline(eps=Epsilon.parse("8/255"), clean=90.0, robust=30.0, robust_adaptive=20.0)
    same = [AuditCheck(id="convergence", title="t", status=AuditStatus.PASS, detail="", robust=20.0)]
    assert lowered_headline(headline, same, final_adaptive=True) == headline
    assert lowered_headline(headline, same, final_adaptive=False).model_dump() == {
        **headline.model_dump(),
        "robust": 20.0,
        "lowered_by": ["convergence"],
    }


def test_the_monotonicity_check_explains_its_verdict() -> None:
    falling = [row("4/255", 40.0), row("8/255", 20.0)]
    passed = monotonicity(falling, 90.0, Epsilon.parse("8/255"), False, 100, False)
    assert passed.detail == "no rise beyond the tolerance along the sweep (clean accuracy counts as ε = 0)"
    rising = monotonicity([row("4/255", 20.0), row("8/255", 30.0)], 90.0, Epsilon.parse("8/255"), False, 100, False)
    assert rising.detail == (
        "1 rise(s) beyond the tolerance, e.g. the non-adaptive attack's accuracy goes from 20.00 % at 4/255 to "
        "30.00 % at 8/255: the attack fails at the larger budget (masked or too weak), since a larger ε-ball "
        "contains the smaller one"
    )
