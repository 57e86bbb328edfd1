"""TeCoA — text-guided contrastive adversarial fine-tuning (Mao et al., ICLR 2023).

Both objectives are the text-guided contrastive cross-entropy: the softmax over the scaled cosine
similarities between the image embedding and the frozen class text embeddings, against the true class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmdefense.defenses.training_time.finetuning import AdversarialFineTuning, Batch


class TeCoA(AdversarialFineTuning):
    """TeCoA: text-guided contrastive adversarial fine-tuning of the image encoder (Mao et al., 2023)."""

    id = "tecoa"

    def attack_objective(self, batch: Batch, x_adv: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self._logits(x_adv), batch["labels"])

    def training_loss(self, batch: Batch, x_adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss = F.cross_entropy(self._logits(x_adv), batch["labels"])
        return loss, {"ce_adv": loss.item()}
