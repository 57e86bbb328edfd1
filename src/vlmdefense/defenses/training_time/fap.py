"""FAP — few-shot adversarial prompt learning (Zhou et al., NeurIPS 2024).

Both towers of CLIP stay frozen; FAP learns MaPLe-style coupled prompts on both of them
(:class:`~vlmdefense.defenses.training_time.adversarial_prompts.CoupledPrompts`) from a few labelled
images per class. Every batch is perturbed by a TRADES-style PGD (random start, ``steps`` signed steps)
that maximises ``KL(p_clean ‖ p_adv)`` between the current prompted model's predictions on the clean
and the perturbed images; the prompts then minimise

``CE(clean logits, y) + λ · mean_i[ KL(p_clean,i ‖ p_adv,i) · (1 + cos(f_clean,i, f_adv,i)) ]``

(official ``calculate_adv_loss`` with ``ADV_TERM=cos``). The KL term asks for *consistent cross-modal*
outputs on clean and adversarial images; the ``1 + cos`` weight of the *uni-modal* image features
receives gradients too, so lowering the loss also pulls the clean and adversarial image features of
the prompted tower apart (the paper's "differentiated uni-modal features"), and weighs the
consistency term most where the two features are still alike. λ = 1.5 as the released scripts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vlmdefense.defenses.training_loop import AdversarialTask
from vlmdefense.defenses.training_time.adversarial_prompts import (
    CoupledPrompts,
    PromptTuningConfig,
    PromptTuningDefense,
    kl_per_sample,
)


@dataclass
class FAPConfig(PromptTuningConfig):
    """FAP's hyperparameters (:class:`PromptTuningConfig` plus the loss weight).

    Attributes:
        lam: weight λ of the cosine-weighted KL term (``LAMBDA_1``: 1.5 in the released scripts).
    """

    lam: float = 1.5


def fap_consistency(
    clean_logits: torch.Tensor, adv_logits: torch.Tensor, clean_features: torch.Tensor, adv_features: torch.Tensor
) -> torch.Tensor:
    """FAP's adversarial term: the batch mean of ``KL(p_clean ‖ p_adv) · (1 + cos(f_clean, f_adv))``."""
    weight = F.cosine_similarity(clean_features, adv_features, dim=-1) + 1.0
    return (kl_per_sample(clean_logits, adv_logits) * weight).mean()


FAPBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class FAPTask(AdversarialTask[FAPBatch]):
    """FAP in the adversarial loop: the KL attack, then clean CE plus λ times the weighted KL."""

    def __init__(self, prompts: CoupledPrompts, classes: list[int], lam: float) -> None:
        self.prompts = prompts
        self.classes = classes
        self.lam = lam

    def prepare(self, images: torch.Tensor, labels: torch.Tensor) -> FAPBatch:
        weights = self.prompts.text_weights()[self.classes]
        clean_logits = self.prompts(images, weights)
        return images, labels, clean_logits

    def attack_objective(self, state: FAPBatch, x: torch.Tensor) -> torch.Tensor:
        _, _, clean_logits = state
        with torch.no_grad():
            weights = self.prompts.text_weights()[self.classes]
        return kl_per_sample(clean_logits, self.prompts(x, weights)).sum()

    def training_loss(self, state: FAPBatch, x_adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        images, labels, _ = state
        weights = self.prompts.text_weights()[self.classes]
        clean = self.prompts.encode(images).features
        adv = self.prompts.encode(x_adv).features
        clean_logits = self.prompts.scale * clean @ weights.T
        adv_logits = self.prompts.scale * adv @ weights.T
        natural = F.cross_entropy(clean_logits, labels)
        consistency = fap_consistency(clean_logits, adv_logits, clean, adv)
        n = len(labels)
        metrics = {
            "natural_ce": natural.item() * n,
            "weighted_kl": consistency.item() * n,
            "train_adv_acc": 100.0 * (adv_logits.argmax(-1) == labels).float().sum().item(),
        }
        return natural + self.lam * consistency, metrics


class FAP(PromptTuningDefense):
    """Few-shot adversarial prompt learning (Zhou et al., NeurIPS 2024)."""

    id = "fap"
    config_class = FAPConfig
    config: FAPConfig

    def make_task(self, prompts: CoupledPrompts, classes: list[int]) -> AdversarialTask[Any]:
        return FAPTask(prompts, classes, self.config.lam)
