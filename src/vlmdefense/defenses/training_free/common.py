"""What the training-free defenses share: the :class:`TrainingFreeDefense` base and the notebooks'
helpers (non-adaptive adversarial test images crafted on the base model, accuracies, τ statistics).

None of the training-free defenses changes a weight; each wraps the frozen base zero-shot classifier
at inference. Those that run an inner optimisation (TTC, Anti-Adversary, CLIPure) are attacked
adaptively by BPDA over it: the inner perturbation or embedding update is computed without a graph and
added as a constant offset, so the attacker's gradient passes through the frozen encoder at the purified
point with an identity Jacobian for the inner step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vlmdefense.defenses.base import InferenceDefense, Predictor
from vlmdefense.units import parse_epsilon

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData


class TrainingFreeDefense(InferenceDefense):
    """A training-free defense: nothing is learned, the frozen base classifier is bound at ``fit``."""


def tau_quantiles(taus: torch.Tensor) -> dict[str, float]:
    """Quantiles of τ values, keyed ``q05`` … ``q95``."""
    taus = taus.detach().float().cpu()
    levels = (0.05, 0.25, 0.5, 0.75, 0.95)
    return {f"q{round(100 * q):02d}": round(float(torch.quantile(taus, q)), 5) for q in levels}


def auc(negatives: torch.Tensor, positives: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    neg = negatives.detach().float().cpu().flatten()
    pos = positives.detach().float().cpu().flatten()
    greater = (pos.unsqueeze(1) > neg.unsqueeze(0)).float().mean()
    ties = (pos.unsqueeze(1) == neg.unsqueeze(0)).float().mean()
    return round(float(greater + 0.5 * ties), 4)


def base_adversarials(data: FitData, eps_values: list[str], steps: int | None = None) -> dict[str, torch.Tensor]:
    """Non-adaptive PGD adversarial test images, crafted on the undefended ``data.base`` (seeded like the
    harness), keyed by the ε's display form ('4/255')."""
    from vlmdefense.workbench.attacks import PGD
    from vlmdefense.workbench.models import set_seed

    steps = data.sweep_steps if steps is None else steps
    out: dict[str, torch.Tensor] = {}
    test = data.sets.test
    for raw in eps_values:
        value, display = parse_epsilon(raw)
        set_seed(data.seed)
        attack = PGD(eps=value, steps=steps)
        batch = data.batch_size
        x, y = test.images, test.labels
        parts = [attack(data.base, x[i : i + batch], y[i : i + batch]) for i in range(0, len(y), batch)]
        out[display] = torch.cat(parts)
    return out


def accuracy_of(predict: Predictor, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (%) of ``predict`` on ``images``, rounded to 2 decimals."""
    with torch.no_grad():
        return round(100.0 * float((predict(images).argmax(-1) == labels).float().mean()), 2)
