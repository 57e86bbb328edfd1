"""PMG-AFT — pre-trained model guided adversarial fine-tuning (Wang et al., CVPR 2024).

The inner attack is TeCoA's; the training loss adds two KL terms that pull the fine-tuned model's class
distribution on the adversarial image towards the frozen pre-trained model's distribution on the same
adversarial image (``alpha``) and towards the fine-tuned model's own distribution on the clean image
(``beta``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from vlmdefense.defenses.training_time.finetuning import AdversarialFineTuning, Batch, FineTuneConfig


@dataclass
class PMGAFTConfig(FineTuneConfig):
    """The fine-tuning budget plus PMG-AFT's loss weights.

    Attributes:
        alpha: weight of the generalisation term KL(p_tuned(x_adv) || p_original(x_adv)).
        beta: weight of the clean term KL(p_tuned(x_adv) || p_tuned(x)).
        kl_reduction: ``batchmean`` (the paper's formula with per-image KL averaged like the
            cross-entropy) or ``sum`` over the batch as the official code (``KLDivLoss(reduction="sum")``,
            which weights both KL terms by the batch size).
    """

    alpha: float = 1.0
    beta: float = 1.0
    kl_reduction: str = "batchmean"


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor, reduction: str) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) per image, summed (``sum``) or averaged (``batchmean``) over the batch."""
    return F.kl_div(
        F.log_softmax(q_logits, dim=-1), F.log_softmax(p_logits, dim=-1), reduction=reduction, log_target=True
    )


class PMGAFT(AdversarialFineTuning):
    """PMG-AFT: TeCoA plus KL guidance by the frozen pre-trained model and by the clean outputs
    (Wang et al., 2024)."""

    id = "pmg-aft"
    config_class: ClassVar[type] = PMGAFTConfig
    config: PMGAFTConfig

    def __init__(self, config: PMGAFTConfig | None = None) -> None:
        super().__init__(config)
        if self.config.kl_reduction not in {"sum", "batchmean"}:
            raise ValueError(f"kl_reduction must be 'sum' or 'batchmean', not {self.config.kl_reduction!r}")

    @property
    def alpha(self) -> float:
        """Weight of the generalisation KL term."""
        return self.config.alpha

    @property
    def beta(self) -> float:
        """Weight of the clean KL term."""
        return self.config.beta

    @property
    def kl_reduction(self) -> str:
        """``sum`` or ``batchmean``."""
        return self.config.kl_reduction

    def attack_objective(self, batch: Batch, x_adv: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self._logits(x_adv), batch["labels"])

    def training_loss(self, batch: Batch, x_adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        assert self.original is not None
        logits_adv = self._logits(x_adv)
        logits_clean = self._logits(batch["images"])
        with torch.no_grad():
            logits_original = self._logits(x_adv, self.original)
        ce = F.cross_entropy(logits_adv, batch["labels"])
        general = _kl(logits_adv, logits_original, self.kl_reduction)
        clean = _kl(logits_adv, logits_clean, self.kl_reduction)
        loss = ce + self.alpha * general + self.beta * clean
        parts: dict[str, Any] = {"ce_adv": ce.item(), "kl_general": general.item(), "kl_clean": clean.item()}
        return loss, parts
