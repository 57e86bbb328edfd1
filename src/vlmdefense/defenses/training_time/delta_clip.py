"""ΔCLIP — adversarial vision-language pre-training from scratch (Wang, Xie, Bartoldson & Kailkhura, 2025).

The first stage of the Double Visual Defense, reproduced at the level of the CLIP model: a CLIP of the
small CLIP's architecture is pre-trained from a random initialisation with the min-max contrastive
objective (PGD on the image-text contrastive loss, then the optimiser on the perturbed images; both
towers learn). The result is used as any CLIP is: zero-shot with its *own* text tower. The second stage
(Δ²LLaVA, adversarial visual instruction tuning of LLaVA on top) has no counterpart at this level.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import open_clip

from vlmdefense.defenses.training_time.adversarial_pretraining import AdversarialPretraining
from vlmdefense.workbench.evaluation import ZeroShotClassifier

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData


class DeltaCLIP(AdversarialPretraining):
    """ΔCLIP: a CLIP pre-trained adversarially from scratch and used zero-shot with its own text tower
    (the prompt-ensembled class embeddings of its text tower, its learnt temperature)."""

    id = "delta-clip"

    def build(self, data: FitData, model: open_clip.CLIP) -> tuple[ZeroShotClassifier, dict[str, Any]]:
        clip = dataclasses.replace(data.clip, model=model, pretrained="delta-clip (adversarial pre-training)")
        classifier = ZeroShotClassifier(clip, data.prompts).to(data.device)
        return classifier, {"logit_scale": round(classifier.logit_scale, 2)}
