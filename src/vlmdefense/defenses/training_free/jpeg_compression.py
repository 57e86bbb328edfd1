"""JPEG compression — re-encode the input as JPEG before classifying it (Dziugaite, Ghahramani & Roy, 2016).

Each image is saved by the real codec (Pillow's libjpeg, quality 75, 4:2:0, on the 16×16 digits) and
decoded again, then classified by the frozen zero-shot CLIP. The codec has no useful gradient, so the
adaptive attacks are BPDA (Athalye et al., 2018): the real codec forward, and backward either the
identity or the gradient of a differentiable JPEG approximation (Shin & Song, 2017; see
:mod:`~vlmdefense.defenses.training_free.differentiable_jpeg`). Robust accuracy is the per-example worst
case over both (:func:`~vlmdefense.defenses.training_free.worst_case.surface_worst_case`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlmdefense.defenses.base import Predictor
from vlmdefense.defenses.training_free.common import TrainingFreeDefense
from vlmdefense.defenses.training_free.differentiable_jpeg import DifferentiableJPEG, pillow_jpeg
from vlmdefense.workbench.attacks import WorstCase, bpda, make_attack


@dataclass
class JPEGConfig:
    """JPEG re-compression's settings.

    Attributes:
        quality: JPEG quality of the real codec (the study: 75).
        bpda: the backward pass of the adaptive attack's surface: ``approx`` (gradient of the
            differentiable JPEG approximation) or ``identity``.
    """

    quality: int = 75
    bpda: str = "approx"


def approximation_bpda(real: Predictor, approx: Predictor) -> Predictor:
    """``real`` forward, the gradient of ``approx`` backward (BPDA with a differentiable approximation)."""

    def wrapped(x: torch.Tensor) -> torch.Tensor:
        smooth = approx(x)
        with torch.no_grad():
            exact = real(x)
        return smooth + (exact - smooth).detach()

    return wrapped


class JPEGCompression(TrainingFreeDefense):
    """JPEG re-compression of the input (Dziugaite et al., 2016) in front of the zero-shot classifier."""

    id = "jpeg-compression"
    config_class = JPEGConfig
    config: JPEGConfig

    def __init__(self, config: JPEGConfig | None = None) -> None:
        super().__init__(config)
        if self.config.bpda not in {"approx", "identity"}:
            raise ValueError(f"JPEG: bpda must be 'approx' or 'identity', got {self.config.bpda!r}")
        self.approximation = DifferentiableJPEG(self.config.quality)

    def compress(self, images: torch.Tensor) -> torch.Tensor:
        """The real codec's round trip (Pillow, no graph)."""
        return pillow_jpeg(images, self.config.quality)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        self.counter.images += len(images)
        self.counter.forward += len(images)
        with torch.no_grad():
            return self._base()(self.compress(images))

    def surfaces(self) -> dict[str, Predictor]:
        """Both BPDA surfaces, keyed ``bpda-identity`` and ``bpda-approx``: the real codec forward."""
        base = self._base()
        identity = bpda(self.compress)
        approx = approximation_bpda(self.compress, self.approximation)
        return {
            "bpda-identity": lambda x: base(identity(x)),
            "bpda-approx": lambda x: base(approx(x)),
        }

    def attack_surface(self) -> Predictor:
        """The BPDA surface named by ``config.bpda`` (the other one is run by :func:`surface_worst_case`)."""
        return self.surfaces()[f"bpda-{self.config.bpda}"]


def headline_attack(params: dict[str, Any], eps: float) -> WorstCase:
    """The per-example worst case over a profile's ``attacks`` at ``eps`` (a deterministic defense: no EOT)."""
    specs = params["attacks"]
    return WorstCase([make_attack(s["name"], eps, int(s["steps"]), s.get("norm", "linf")) for s in specs])
