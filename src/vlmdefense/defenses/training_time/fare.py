"""FARE — unsupervised adversarial fine-tuning towards the original embeddings (Schlarmann et al., ICML 2024).

Both objectives are the squared L2 distance between the fine-tuned encoder's (unnormalised) embedding of
the perturbed image and the original encoder's embedding of the clean image. No labels, no text.
"""

from __future__ import annotations

from typing import Any

import torch

from vlmdefense.defenses.training_time.finetuning import AdversarialFineTuning, Batch, FineTuneConfig


class FARE(AdversarialFineTuning):
    """FARE: unsupervised adversarial fine-tuning towards the original clean embeddings
    (Schlarmann et al., 2024). Labels are never read (only for the logged training accuracy)."""

    id = "fare"
    needs_labels = False

    @classmethod
    def default_config(cls) -> Any:
        """AdamW with weight decay, as FARE's code."""
        return FineTuneConfig(optimizer="adamw", lr=1e-3, weight_decay=1e-4)

    def reference(self, batch: Batch) -> Batch:
        assert self.original is not None
        clip = self.original.clip
        return {**batch, "original": clip.model.encode_image(clip.normalize(batch["images"]))}

    def _distance(self, batch: Batch, x_adv: torch.Tensor) -> torch.Tensor:
        return (self._features(x_adv) - batch["original"]).pow(2).sum(dim=-1).mean()

    def attack_objective(self, batch: Batch, x_adv: torch.Tensor) -> torch.Tensor:
        return self._distance(batch, x_adv)

    def training_loss(self, batch: Batch, x_adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss = self._distance(batch, x_adv)
        return loss, {"l2_sq_adv": loss.item()}
