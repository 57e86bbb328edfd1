"""Sim-CLIP — unsupervised Siamese adversarial fine-tuning of the image encoder (Hossain & Imteaj, 2024).

FARE's sibling: no labels, no text. The inner attack is FARE's (PGD maximising the squared L2 distance
between the fine-tuned tower's embedding of the perturbed image and the frozen original's embedding of
the clean image, as the released script's ``--attack_loss l2``). The training loss is SimSiam's
symmetric negative cosine similarity with a stop-gradient on each half's target::

    L = ½ D(z_adv, sg(z_clean)) + ½ D(z_clean, sg(z_adv)),    D(p, z) = 1 − cos(p, z)

(the code's D is −cos; the constant 1 changes no gradient and keeps the logged loss non-negative).

``clean_view`` says where ``z_clean`` comes from: ``original`` — the frozen original encoder, as the
released training script (its second half then carries no gradient: the gradient is half of
−cos(z_adv, z₀)'s, which AdamW's scale-free steps all but cancel, so this is FARE with a cosine distance);
``shared`` — the fine-tuned encoder itself on the clean image, the paper's
shared-weight Siamese pair (both halves then train the encoder, nothing anchors it to the original).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from vlmdefense.defenses.training_time.fare import FARE
from vlmdefense.defenses.training_time.finetuning import Batch, FineTuneConfig

CLEAN_VIEWS = ("original", "shared")
ATTACK_LOSSES = ("l2", "cosine")


@dataclass
class SimCLIPConfig(FineTuneConfig):
    """The fine-tuning budget plus Sim-CLIP's choices.

    Attributes:
        clean_view: ``original`` (frozen original encoder on the clean image, the released script) or
            ``shared`` (the fine-tuned encoder on the clean image, the paper's Siamese description).
        attack_loss: the inner attack's objective: ``l2`` (squared L2 to the original clean embedding,
            the released script) or ``cosine`` (negative cosine to it).
    """

    clean_view: str = "original"
    attack_loss: str = "l2"


def siamese_loss(z_adv: torch.Tensor, z_clean: torch.Tensor) -> torch.Tensor:
    """½ D(z_adv, sg(z_clean)) + ½ D(z_clean, sg(z_adv)) with D = 1 − cos, batch mean."""
    first = 1 - F.cosine_similarity(z_adv, z_clean.detach(), dim=-1).mean()
    second = 1 - F.cosine_similarity(z_clean, z_adv.detach(), dim=-1).mean()
    return 0.5 * first + 0.5 * second


class SimCLIP(FARE):
    """Sim-CLIP: label-free adversarial fine-tuning of the image tower with a Siamese cosine loss and
    stop-gradients (Hossain & Imteaj, 2024). FARE's reference embeddings and inner attack (``l2``);
    labels are read only for the logged training accuracy."""

    id = "sim-clip"
    config_class: ClassVar[type] = SimCLIPConfig
    config: SimCLIPConfig

    def __init__(self, config: SimCLIPConfig | None = None) -> None:
        super().__init__(config)
        if self.config.clean_view not in CLEAN_VIEWS:
            raise ValueError(f"clean_view must be one of {CLEAN_VIEWS}, not {self.config.clean_view!r}")
        if self.config.attack_loss not in ATTACK_LOSSES:
            raise ValueError(f"attack_loss must be one of {ATTACK_LOSSES}, not {self.config.attack_loss!r}")

    @classmethod
    def default_config(cls) -> Any:
        """AdamW with weight decay 1e-5 (the released script), FARE's learning rate at this scale."""
        return SimCLIPConfig(optimizer="adamw", lr=1e-3, weight_decay=1e-5)

    def attack_objective(self, batch: Batch, x_adv: torch.Tensor) -> torch.Tensor:
        if self.config.attack_loss == "cosine":
            return -F.cosine_similarity(self._features(x_adv), batch["original"], dim=-1).mean()
        return self._distance(batch, x_adv)

    def training_loss(self, batch: Batch, x_adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        z_adv = self._features(x_adv)
        z_clean = batch["original"] if self.config.clean_view == "original" else self._features(batch["images"])
        loss = siamese_loss(z_adv, z_clean)
        with torch.no_grad():
            gap = 1 - F.cosine_similarity(z_adv, batch["original"], dim=-1).mean().item()
        return loss, {"one_minus_cos_adv_to_original": gap}
