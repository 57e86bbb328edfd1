"""ATAC — augmentation-based test-time adversarial correction (Su and Balogh, arXiv 2025).

The frozen image tower reads the input and a few fixed, label-preserving augmentations of it; each
augmented unit embedding minus the input's is a *drift*. Their mean is the recovery direction, and the
mean pairwise cosine of the drifts (their angular consistency) decides whether to correct: an input whose
drifts agree (above ``threshold``) is moved by ``step`` along the unit recovery direction and
renormalised, the others are left alone. The paper's equations and code could not be read here; the
rule follows the abstract, and the augmentations, the threshold and the step are our assumptions.

The consistency gate is a hard threshold. Its gradient is zero almost everywhere, so the adaptive attack
differentiates everything else exactly and, by default, the gate through a sigmoid surrogate
(straight-through: the forward pass keeps the hard gate) so the attacker also sees how to push an input
across the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vlmdefense.defenses.base import Predictor
from vlmdefense.defenses.training_free.common import tau_quantiles
from vlmdefense.defenses.training_free.feature_steering import EmbeddingSteering, mean_pairwise_cosine, unit

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData


@dataclass
class ATACConfig:
    """ATAC's hyperparameters (assumptions: the paper's values could not be read).

    Attributes:
        shift: pixels of the four zero-padded shifts (up, down, left, right).
        zoom_margin: the zoom view crops this many pixels from every side and resizes back (bilinear);
            0 leaves the zoom out.
        step: length of the correction along the unit recovery direction, before renormalising
            (1 turns an embedding by up to 45°).
        threshold: consistency above which an input is corrected, or ``"calibrate"``: the
            ``threshold_quantile`` quantile of the consistency of clean seen-class training images.
        threshold_quantile: quantile used by ``threshold: calibrate``.
        surrogate_temperature: the adaptive attack's gradient of the gate is that of
            ``sigmoid((κ − threshold) / T)``; 0 uses the hard gate's (zero) gradient.
        calibration_images: at most this many training images are read in ``fit``.
    """

    shift: int = 1
    zoom_margin: int = 1
    step: float = 1.0
    threshold: float | str = "calibrate"
    threshold_quantile: float = 0.95
    surrogate_temperature: float = 0.05
    calibration_images: int = 720


def shifted(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``images`` moved by (dy, dx) pixels, zero-filled (differentiable)."""
    p = max(abs(dy), abs(dx))
    h, w = images.shape[-2:]
    padded = F.pad(images, (p, p, p, p))
    return padded[..., p - dy : p - dy + h, p - dx : p - dx + w]


def zoomed(images: torch.Tensor, margin: int) -> torch.Tensor:
    """The centre of ``images`` without ``margin`` pixels per side, resized back (bilinear)."""
    h, w = images.shape[-2:]
    inner = images[..., margin : h - margin, margin : w - margin]
    return F.interpolate(inner, size=(h, w), mode="bilinear", align_corners=False)


class ATAC(EmbeddingSteering):
    """Augmentation-based test-time adversarial correction (Su and Balogh, 2025) of the image embedding."""

    id = "atac"
    config_class = ATACConfig
    config: ATACConfig

    def __init__(self, config: ATACConfig | None = None) -> None:
        super().__init__(config)
        t = self.config.threshold
        self.threshold: float | None = None if t == "calibrate" else float(t)
        self.calibration: dict[str, Any] = {}
        self.surrogate = False  # set while the adaptive surface runs

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        return {"calibration_images": 64}

    @property
    def n_views(self) -> int:
        return 4 + (1 if self.config.zoom_margin > 0 else 0)

    def views(self, images: torch.Tensor) -> torch.Tensor:
        s = self.config.shift
        out = [shifted(images, dy, dx) for dy, dx in ((-s, 0), (s, 0), (0, -s), (0, s))]
        if self.config.zoom_margin > 0:
            out.append(zoomed(images, self.config.zoom_margin))
        return torch.stack(out)

    @staticmethod
    def drifts(embedding: torch.Tensor, view_embeddings: torch.Tensor) -> torch.Tensor:
        """(V, N, D) augmented unit embeddings minus the input's."""
        return unit(view_embeddings) - embedding.unsqueeze(0)

    def consistency(self, embedding: torch.Tensor, view_embeddings: torch.Tensor) -> torch.Tensor:
        """(N,) angular consistency: mean pairwise cosine of the drifts."""
        return mean_pairwise_cosine(self.drifts(embedding, view_embeddings))

    def gate(self, consistency: torch.Tensor) -> torch.Tensor:
        """(N, 1) 1 where the input is corrected, else 0; straight-through sigmoid gradient while the
        adaptive surface runs (``surrogate_temperature`` > 0)."""
        if self.threshold is None:
            raise RuntimeError("ATAC: threshold is 'calibrate' and fit has not run")
        hard = (consistency >= self.threshold).to(consistency.dtype)
        temperature = self.config.surrogate_temperature
        if self.surrogate and temperature > 0:
            soft = torch.sigmoid((consistency - self.threshold) / temperature)
            hard = hard + soft - soft.detach()
        return hard.unsqueeze(-1)

    def steer(self, embedding: torch.Tensor, view_embeddings: torch.Tensor) -> torch.Tensor:
        recovery = unit(self.drifts(embedding, view_embeddings).mean(dim=0))
        gate = self.gate(self.consistency(embedding, view_embeddings))
        return unit(embedding + self.config.step * gate * recovery)

    def measure(self, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """(N,) consistency of ``images`` (no graph)."""
        with torch.no_grad():
            return torch.cat(
                [self.consistency(*self.readings(images[i : i + batch])) for i in range(0, len(images), batch)]
            )

    def fit(self, data: FitData) -> dict[str, Any]:
        """Bind the base model and measure the consistency of clean seen-class training images (the
        threshold is their ``threshold_quantile`` quantile when ``threshold`` is ``calibrate``)."""
        self.bind(data.base)
        if data.train is None:
            if self.threshold is None:
                raise RuntimeError("ATAC: threshold 'calibrate' needs a training split")
            return {}
        train = data.seen_train
        generator = torch.Generator().manual_seed(data.seed)
        n = min(self.config.calibration_images, len(train))
        kappa = self.measure(train.images[torch.randperm(len(train), generator=generator)[:n]]).cpu()
        quantile = float(torch.quantile(kappa, self.config.threshold_quantile))
        if self.threshold is None:
            self.threshold = quantile
        self.calibration = {
            "images": n,
            "consistency_mean": round(float(kappa.mean()), 5),
            "consistency_quantiles": tau_quantiles(kappa),
            "calibrated_threshold": round(quantile, 5),
            "threshold_in_use": round(float(self.threshold), 5),
            "fraction_corrected": round(float((kappa >= self.threshold).float().mean()), 4),
        }
        return {"consistency_clean_train": self.calibration}

    def attack_surface(self) -> Predictor:
        """The whole pipeline end to end, the gate's gradient through the sigmoid surrogate."""

        def surface(images: torch.Tensor) -> torch.Tensor:
            self.surrogate = True
            try:
                return self.defended_logits(images)
            finally:
                self.surrogate = False

        return surface
