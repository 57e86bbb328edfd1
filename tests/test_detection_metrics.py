"""The detection metrics on hand-computable cases (scores: higher = more likely clean; flagged below τ)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO
from vlmdefense.runs.detection import DetectionSection
from vlmdefense.runs.records import check_result_file, read_result, result_path
from vlmdefense.workbench import detection as m


def test_auroc_separable_identical_and_reversed() -> None:
    clean, adversarial = [0.9, 0.8, 0.7], [0.1, 0.2, 0.3]
    assert m.auroc(clean, adversarial) == 1.0
    assert m.auroc(adversarial, clean) == 0.0
    assert m.auroc([0.5] * 4, [0.5] * 3) == 0.5
    same = torch.rand(50, generator=torch.Generator().manual_seed(0))
    assert m.auroc(same, same) == pytest.approx(0.5)


def test_auroc_counts_pairs() -> None:
    # pairs (clean > adversarial): 0.6 beats all three (3), 0.4 beats 0.2 (1); 0.4 against 0.4 counts half
    assert m.auroc([0.6, 0.4], [0.5, 0.2, 0.4]) == pytest.approx((3 + 1 + 0.5) / 6)
    with pytest.raises(ValueError):
        m.auroc([], [0.1])


def test_threshold_and_tpr_at_five_percent_fpr() -> None:
    clean = [i / 100 for i in range(1, 21)]  # 0.01 … 0.20: 5 % of 20 is one image
    tau = m.threshold_at_fpr(clean, 0.05)
    assert tau == 0.02
    assert float(m.flagged(clean, tau).double().mean()) == 0.05  # only 0.01 lies below τ
    tpr, tau2 = m.tpr_at_fpr(clean, [0.0, 0.015, 0.03, 0.5], 0.05)
    assert (tpr, tau2) == (0.5, 0.02)
    assert m.threshold_at_fpr(clean, 0.0) == 0.01  # no clean image flagged
    assert m.threshold_at_fpr([0.3] * 10, 0.05) == 0.3  # ties: none strictly below


def test_equal_error_threshold_and_rates() -> None:
    clean, adversarial = [0.6, 0.7, 0.8, 0.9], [0.1, 0.2, 0.65, 0.3]
    tau = m.equal_error_threshold(clean, adversarial)
    tpr, fpr = m.rates(clean, adversarial, tau)
    assert (tpr, fpr) == (0.75, 0.25)  # the best balance these scores allow
    assert m.rates([1.0], [0.0], 0.5) == (1.0, 0.0)


def test_rejection_accuracies() -> None:
    correct = [True, True, False, False]
    flagged = [False, True, True, False]
    assert m.clean_accuracy_after_rejection(correct, flagged) == 0.25  # correct and kept: the first only
    assert m.attacked_accuracy_after_rejection(correct, flagged) == 0.75  # flagged or correct: all but the last


def test_roc_points_run_from_corner_to_corner() -> None:
    points = m.roc_points([0.9, 0.8], [0.1, 0.2])
    assert points[0] == (0.0, 0.0) and points[-1] == (1.0, 1.0)
    assert (0.0, 1.0) in points  # a threshold between the sets separates them


def test_detection_section_round_trip(tmp_path: Path) -> None:
    row = {
        "attack": "PGD-10",
        "eps": {"value": 8 / 255, "display": "8/255"},
        "steps": 10,
        "adaptive": False,
        "target": "base-model",
        "attacked_images": 10,
        "adversarial_images": 8,
        "attack_success": 88.89,
        "auroc": 0.9,
        "tpr_at_5_fpr": 50.0,
        "threshold_at_5_fpr": 0.7,
        "detection_rate": 75.0,
        "evading": 20.0,
        "accuracy_after_rejection": 80.0,
    }
    section = {
        "score": "cosine",
        "threshold": 0.6,
        "threshold_rule": "equal_tpr_tnr on training images",
        "clean_images": 10,
        "clean_accuracy": 90.0,
        "clean_false_positive_rate": 10.0,
        "clean_accuracy_after_rejection": 80.0,
        "mean_clean_score": 0.8,
        "rows": [row],
    }
    base = read_result(result_path(REPO, "baseline", "smoke"))
    stored = base.model_copy(update={"detection": {"deployed": DetectionSection.model_validate(section)}})
    path = tmp_path / "reproductions" / "baseline" / "smoke" / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(stored.model_dump_json(indent=2), encoding="utf-8")
    parsed = read_result(path).detection["deployed"]
    assert parsed.row("PGD", "8/255", adaptive=False) is not None
    assert parsed.row("PGD", "8/255", adaptive=True) is None
    data = json.loads(path.read_text(encoding="utf-8"))
    data["detection"]["deployed"]["threshold"] = "high"
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    problems = check_result_file(path)
    assert [p.field for p in problems] == ["detection.deployed.threshold"]
    assert problems[0].line == next(n for n, t in enumerate(path.read_text().splitlines(), 1) if '"threshold"' in t)


def test_the_default_operating_point_is_five_percent_and_a_given_one_is_used() -> None:
    clean = [i / 100 for i in range(1, 21)]
    adversarial = [0.0, 0.015, 0.025, 0.5]
    assert m.threshold_at_fpr(clean) == m.threshold_at_fpr(clean, 0.05) == 0.02
    assert m.tpr_at_fpr(clean, adversarial) == (0.5, 0.02)
    assert m.tpr_at_fpr(clean, adversarial, 0.10) == (0.75, 0.03)  # two clean images may be flagged


@pytest.mark.parametrize("fpr", [1.0, 1.5, -0.01])
def test_the_operating_point_must_be_a_rate_below_one(fpr: float) -> None:
    with pytest.raises(ValueError, match=r"^threshold_at_fpr needs clean scores and 0 <= fpr < 1$"):
        m.threshold_at_fpr([0.1, 0.2], fpr)


def test_metrics_name_what_they_lack() -> None:
    with pytest.raises(ValueError, match=r"needs clean scores and 0 <= fpr < 1"):
        m.threshold_at_fpr([], 0.05)
    with pytest.raises(ValueError, match=r"^AUROC needs at least one clean and one adversarial score$"):
        m.auroc([0.1], [])


def test_equal_error_threshold_breaks_ties_by_the_lower_threshold_and_takes_a_single_score() -> None:
    # τ = 0.5 flags one clean image and no adversarial one, τ = 0.7 one clean image and the adversarial one:
    # |TPR − TNR| is 0.5 at both, and the lower threshold wins
    assert m.equal_error_threshold([0.3, 0.7], [0.5]) == 0.5
    assert m.equal_error_threshold([0.4], [0.4]) == 0.4  # one observed score: the only candidate


def test_rejection_accuracies_keep_correct_and_flagged_apart() -> None:
    correct = [True, True, True, False]
    flagged = [False, False, True, True]
    assert m.clean_accuracy_after_rejection(correct, flagged) == 0.5  # correct and kept: the first two
    assert m.attacked_accuracy_after_rejection([True, False, False], [False, True, False]) == pytest.approx(2 / 3)
    as_floats = torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 1.0])  # (pred == y).float()
    assert m.clean_accuracy_after_rejection(*as_floats) == 0.5
    assert m.attacked_accuracy_after_rejection(*as_floats) == 1.0
