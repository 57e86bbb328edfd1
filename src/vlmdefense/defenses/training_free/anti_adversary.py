"""Anti-Adversary — the anti-adversary layer (Alfarra et al., AAAI 2022).

``k`` signed-gradient steps of size ``alpha`` that *decrease* the cross-entropy of the model's own
initial prediction, then the prediction on the moved input (no projection, no clipping, as in the
official wrapper). Adaptive attack: BPDA over the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlmdefense.defenses.base import Predictor
from vlmdefense.defenses.training_free.common import TrainingFreeDefense


@dataclass
class AntiAdversaryConfig:
    """Anti-Adversary's hyperparameters (the official README's setting: ``k 2``, ``alpha 0.15``).

    Attributes:
        k: signed-gradient steps.
        alpha: step size on [0, 1] pixels (the official CIFAR-10 models take unnormalised [0, 1] input).
        clip_to_valid: clip the moved image to [0, 1] (the official wrapper does not).
        bpda_point: where the adaptive attack takes the base model's gradient. ``input``: at the
            input itself (the layer is the identity in the backward pass and its whole effect is a
            constant offset of the logits); ``moved``: at the moved image x + a(x) (the offset a is a
            constant added to the input). Both forward the full defended pipeline.
    """

    k: int = 2
    alpha: float = 0.15
    clip_to_valid: bool = False
    bpda_point: str = "input"


class AntiAdversary(TrainingFreeDefense):
    """The anti-adversary layer (Alfarra et al., AAAI 2022) in front of the zero-shot classifier."""

    id = "anti-adversary"
    config_class = AntiAdversaryConfig
    config: AntiAdversaryConfig

    def anti_adversary(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(perturbation, initial logits)``: ``k`` steps lowering the cross-entropy of the initial
        prediction (no graph to ``images``)."""
        cfg = self.config
        base = self._base()
        x = images.detach()
        with torch.no_grad():
            initial = base(x)
        pseudo = initial.argmax(dim=-1)
        anti = torch.zeros_like(x)
        with torch.enable_grad():
            for _ in range(cfg.k):
                a = anti.detach().requires_grad_(True)
                loss = F.cross_entropy(base(self._moved(x, a)), pseudo)
                grad = torch.autograd.grad(loss, a)[0]
                anti = a.detach() - cfg.alpha * grad.sign()
        return self._moved(x, anti) - x, initial

    def _moved(self, x: torch.Tensor, anti: torch.Tensor) -> torch.Tensor:
        return (x + anti).clamp(0, 1) if self.config.clip_to_valid else x + anti

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        n, k = len(images), self.config.k
        self.counter.images += n
        if k == 0 or self.config.alpha == 0:
            self.counter.forward += n
            with torch.no_grad():
                return self._base()(images)
        self.counter.forward += n * (k + 2)  # pseudo-label, one per step, final prediction
        self.counter.backward += n * k
        delta, _ = self.anti_adversary(images)
        with torch.no_grad():
            return self._base()(images + delta)

    def attack_surface(self) -> Predictor:
        """BPDA over the layer, recomputed for the current input. The logits are the defended pipeline's.

        With ``bpda_point: moved`` the anti-adversarial offset a(x) is a constant added to the input, so
        the gradient is the base model's at x + a(x). With ``input`` (default) the gradient is the base
        model's at x itself. The layer only reinforces the base model's own prediction at x, so the
        pipeline's decision follows that prediction, and its gradient at the input is the informative one.
        """
        point = self.config.bpda_point
        if point not in {"input", "moved"}:
            raise ValueError(f"AntiAdversary: bpda_point must be 'input' or 'moved', not {point!r}")

        def surface(images: torch.Tensor) -> torch.Tensor:
            base = self._base()
            if self.config.k == 0 or self.config.alpha == 0:
                return base(images)
            delta, _ = self.anti_adversary(images.detach())
            if point == "moved":
                return base(images + delta)
            at_input = base(images)
            with torch.no_grad():
                defended = base(images.detach() + delta)
            return at_input + (defended - at_input.detach())

        return surface
