"""TPT — test-time prompt tuning (Shu et al., NeurIPS 2022), the non-adversarial ancestor of R-TPT,
TAPT, A-TPT and SS-TPT.

Per test image, the text context (initialised from a template's words) takes ``steps`` AdamW steps on
the *marginal* entropy — the entropy of the averaged prediction — of the lowest-entropy fraction of
the image's augmented views; the tuned prompt then classifies the image itself, and the context is
reset for the next image. Both encoders are frozen. The question here is how much robustness this
plain tuning gives. Adaptive attack: BPDA through the prompt update with EOT over the views, or the
unrolled AdamW step (``unrolled``); see :mod:`~vlmdefense.defenses.test_time_adaptation.prompt_tuning`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmdefense.defenses.test_time_adaptation.prompt_tuning import PromptTuning, PromptTuningConfig
from vlmdefense.defenses.test_time_adaptation.views import marginal_entropy


@dataclass
class TPTConfig(PromptTuningConfig):
    """TPT's hyperparameters (official defaults in brackets; the profile's parameters override).

    Attributes:
        n_views: inputs per image, the image plus ``n_views - 1`` augmented views [64].
        selection: fraction of lowest-entropy views kept (confidence selection) [0.1].
        steps: AdamW steps per image [1]; lr [5e-3]; weight_decay [torch's default 0.01].
        template: its words before the class name are the tuned context [``a photo of a``: 4 tokens].
        crop_scale_min: smallest area of a random crop [RandomResizedCrop 0.08, plus flips; AugMix
            on the fine-grained sets].
        ensemble: ``none`` — the tuned prompt classifies the unaugmented image (TPT); R-TPT's
            ``mean`` / ``reliability`` are available as ablations (then ``temperature`` and
            ``neighbours`` apply).
        unrolled: the adaptive attack differentiates through the AdamW step instead of BPDA.
    """

    n_views: int = 8
    selection: float = 0.25
    ensemble: str = "none"


class TPT(PromptTuning):
    """TPT (Shu et al., NeurIPS 2022): marginal-entropy test-time prompt tuning on confident views."""

    id = "tpt"
    config_class = TPTConfig
    config: TPTConfig

    def objective(self, selected_logits: torch.Tensor, selected_scores: torch.Tensor | None) -> torch.Tensor:
        """TPT's loss per image: entropy of the mean probability over the selected views."""
        return marginal_entropy(selected_logits)
