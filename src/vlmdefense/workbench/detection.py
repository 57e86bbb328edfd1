"""Detection metrics of an adversarial-input detector, as pure functions of its scores.

Convention: a detector's score is **higher for inputs it believes clean** (MirrorCheck's similarity between the
input and its regenerated picture), and an input is **flagged** (rejected as adversarial) when its score is
*strictly below* the threshold τ. Clean inputs are the negatives of detection, adversarial ones its positives:
the false-positive rate (FPR) is the share of clean inputs flagged, the true-positive rate (TPR) the share of
adversarial inputs flagged.

Accuracy after rejection (the classifier and the detector as one system that may abstain):

- **clean**: the share of clean inputs that are classified correctly *and* not flagged (a false alarm costs
  accuracy, as a misclassification does);
- **under attack**: the share of attacked inputs that are flagged *or* classified correctly: a rejected
  adversarial input counts as defended, as in the detection literature's robust accuracy of a classifier with
  a reject option (Tramèr, ICML 2022, "Detecting adversarial examples is (nearly) as hard as classifying them").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Scores = torch.Tensor | Sequence[float]


def _flat(values: Scores) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64).flatten().cpu()


def auroc(clean: Scores, adversarial: Scores) -> float:
    """Area under the ROC curve of detection: the probability that a random clean input scores higher than a
    random adversarial one, ties counting half (1: separable, 0.5: indistinguishable).

    Raises:
        ValueError: either set is empty.
    """
    c, a = _flat(clean), _flat(adversarial)
    if not len(c) or not len(a):
        raise ValueError("AUROC needs at least one clean and one adversarial score")
    higher = (c.unsqueeze(1) > a.unsqueeze(0)).double().mean()
    ties = (c.unsqueeze(1) == a.unsqueeze(0)).double().mean()
    return float(higher + 0.5 * ties)


def flagged(scores: Scores, threshold: float) -> torch.Tensor:
    """Boolean tensor: which inputs are rejected (score strictly below ``threshold``)."""
    return _flat(scores) < threshold


def threshold_at_fpr(clean: Scores, fpr: float = 0.05) -> float:
    """The largest threshold that flags at most ``fpr`` of the clean scores: the (⌊fpr·n⌋ + 1)-th smallest
    clean score (scores strictly below it are flagged).

    Raises:
        ValueError: no clean scores, or ``fpr`` outside [0, 1).
    """
    c = torch.sort(_flat(clean)).values
    if not len(c) or not 0 <= fpr < 1:
        raise ValueError("threshold_at_fpr needs clean scores and 0 <= fpr < 1")
    return float(c[int(fpr * len(c) + 1e-9)])


def tpr_at_fpr(clean: Scores, adversarial: Scores, fpr: float = 0.05) -> tuple[float, float]:
    """``(TPR, threshold)``: the share of adversarial scores flagged at :func:`threshold_at_fpr` of the clean
    ones (the threshold is set on the clean scores alone)."""
    tau = threshold_at_fpr(clean, fpr)
    return float(flagged(adversarial, tau).double().mean()), tau


def rates(clean: Scores, adversarial: Scores, threshold: float) -> tuple[float, float]:
    """``(TPR, FPR)`` at ``threshold``."""
    return float(flagged(adversarial, threshold).double().mean()), float(flagged(clean, threshold).double().mean())


def equal_error_threshold(clean: Scores, adversarial: Scores) -> float:
    """The threshold where detection's TPR is closest to its TNR (1 − FPR): the rule of MirrorCheck's released
    evaluation (``equal_tpr_tnr``), chosen among the observed scores (ties broken by the lower threshold)."""
    c, a = _flat(clean), _flat(adversarial)
    candidates = torch.unique(torch.cat([c, a]))
    best, gap = float(candidates[0]), float("inf")
    for tau in candidates.tolist():
        tpr, fpr = rates(c, a, tau)
        if abs(tpr - (1 - fpr)) < gap - 1e-12:
            best, gap = tau, abs(tpr - (1 - fpr))
    return best


def _bools(values: torch.Tensor | Sequence[bool]) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.bool).flatten().cpu()


def clean_accuracy_after_rejection(
    correct: torch.Tensor | Sequence[bool], rejected: torch.Tensor | Sequence[bool]
) -> float:
    """Share of clean inputs classified correctly and not flagged (0–1)."""
    ok, flag = _bools(correct), _bools(rejected)
    return float((ok & ~flag).double().mean())


def attacked_accuracy_after_rejection(
    correct: torch.Tensor | Sequence[bool], rejected: torch.Tensor | Sequence[bool]
) -> float:
    """Share of attacked inputs that are flagged or still classified correctly (0–1)."""
    ok, flag = _bools(correct), _bools(rejected)
    return float((ok | flag).double().mean())


def roc_points(clean: Scores, adversarial: Scores) -> list[tuple[float, float]]:
    """``(FPR, TPR)`` of every threshold between observed scores, from (0, 0) to (1, 1) (for a plot)."""
    c, a = _flat(clean), _flat(adversarial)
    taus = [*torch.unique(torch.cat([c, a])).tolist(), float("inf")]
    points = [(0.0, 0.0)]
    for tau in taus:
        tpr, fpr = rates(c, a, tau)
        points.append((fpr, tpr))
    return points
