"""DiffPure — diffusion models for adversarial purification (Nie et al., ICML 2022).

The input is diffused to a small time t* of the VP-SDE and the reverse-time SDE, driven by a frozen
pre-trained diffusion model, is solved back to t ≈ 0 (Euler–Maruyama, as the official ``sde`` runner); the
frozen zero-shot CLIP classifies the result. Nothing is trained. Randomness: the forward noise and the
Brownian path. Adaptive attacks (:mod:`~.diffusion_purification`): the full gradient through every sampling
step with EOT (the harness' adaptive rows), and BPDA with the identity over the purifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlmdefense.defenses.training_free.diffusion_purification import DiffusionPurifier, purify


@dataclass
class DiffPureConfig:
    """DiffPure's hyperparameters (official CIFAR-10 L∞ setting: t* = 0.1, Euler–Maruyama with dt = 1e-3).

    Attributes:
        t_star: diffusion time (official: 0.1 for CIFAR-10 L∞, 0.075 for L2, 0.15 for ImageNet).
        steps: Euler–Maruyama steps from t* to 1e-5 (official: t*/1e-3 = 100).
        prior: empty for the small prior of the smoke profile; else a local diffusers UNet directory.
        prior_steps: training steps of the small prior (0: its recipe's; the quick profile trains a few).
        adaptive: the harness' adaptive surface, ``full`` (through the sampling steps) or ``bpda``.
        grad_checkpoint: recompute each sampling step in the backward pass of the ``full`` surface.
    """

    t_star: float = 0.1
    steps: int = 100
    prior: str = ""
    prior_steps: int = 0
    adaptive: str = "full"
    grad_checkpoint: bool = False


class DiffPure(DiffusionPurifier):
    """DiffPure (Nie et al., ICML 2022) in front of the zero-shot classifier."""

    id = "diffpure"
    config_class = DiffPureConfig
    config: DiffPureConfig

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        return {"steps": 2, "prior_steps": 30}

    def purify_images(self, images: torch.Tensor, graph: bool) -> torch.Tensor:
        cfg = self.config
        with torch.set_grad_enabled(graph and torch.is_grad_enabled()):
            return purify(self._prior(), images, cfg.t_star, cfg.steps, cfg.grad_checkpoint and graph)

    def unet_calls(self) -> int:
        return self.config.steps if self.config.t_star > 0 else 0
