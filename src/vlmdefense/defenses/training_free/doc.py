"""DOC — directional orthogonal counterattacks (Jiang et al., AAAI 2026).

A TTC-style counterattack (raise the L2 distance between the perturbed and the input's image embedding,
from uniform noise in a ``doc_eps`` L∞ ball) whose steps are diversified: each step's direction is the
normalised gradient plus ``ortho_lambda`` times a random Gaussian direction made orthogonal to it,
accumulated with momentum, and applied as a signed step. A directional sensitivity score — one minus
the mean cosine similarity between the embedding and those of ``dss_samples`` sign-noise copies — sets
a soft weight that blends the optimised perturbation with the random start: images whose embedding is
stable under noise (the "falsely stable" attacked ones) receive the counterattack. Adaptive attacks:
BPDA over the counterattack or its unrolled steps, with EOT over the noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vlmdefense.defenses.training_free.common import tau_quantiles
from vlmdefense.defenses.training_free.counterattack import (
    CounterattackDefense,
    embedding_distance,
    inner_gradient,
    into_ball,
    raw_embed,
    score_clean_train,
    signed,
    uniform_start,
    variable,
)

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData


@dataclass
class DOCConfig:
    """DOC's hyperparameters (the paper's setting: 4 steps of 3/255 within 4/255; the rest assumed).

    Attributes:
        doc_eps: L∞ radius of the counterattack.
        doc_steps: counterattack steps.
        doc_step_size: step size.
        ortho_lambda: weight of the orthogonal random direction (assumed 1).
        momentum: momentum decay of the accumulated direction (assumed 1, as MI-FGSM).
        dss_samples: sign-noise copies for the directional sensitivity score (assumed 4).
        dss_noise: amplitude of the sign noise (assumed ``doc_eps``).
        dss_thres: score threshold, or ``"calibrate"``: the ``dss_quantile`` quantile of the score of
            clean seen-class training images (assumed; the paper's value was not verified).
        dss_quantile: quantile used by ``dss_thres: calibrate``.
        dss_temp: temperature of the sigmoid, relative to the threshold (assumed 0.1).
        calibration_images: training images on which ``fit`` measures the score.
        adaptive: the adaptive attack surface (``bpda``, ``input`` or ``unrolled``).
    """

    doc_eps: float = 4 / 255
    doc_steps: int = 4
    doc_step_size: float = 3 / 255
    ortho_lambda: float = 1.0
    momentum: float = 1.0
    dss_samples: int = 4
    dss_noise: float = 4 / 255
    dss_thres: float | str = "calibrate"
    dss_quantile: float = 0.5
    dss_temp: float = 0.1
    calibration_images: int = 720
    adaptive: str = "bpda"


def orthogonal_direction(grad: torch.Tensor, noise: torch.Tensor, weight: float) -> torch.Tensor:
    """The unit gradient plus ``weight`` times the unit component of ``noise`` orthogonal to it (per image)."""
    g = F.normalize(grad.flatten(1), dim=1)
    r = noise.flatten(1)
    r = F.normalize(r - (r * g).sum(dim=1, keepdim=True) * g, dim=1)
    return (g + weight * r).view_as(grad)


class DOC(CounterattackDefense):
    """Directional orthogonal counterattacks (Jiang et al., AAAI 2026)."""

    id = "doc"
    randomized = True  # uniform start, orthogonal directions and sign noise are drawn at every prediction
    config_class = DOCConfig
    config: DOCConfig

    def __init__(self, config: DOCConfig | None = None) -> None:
        super().__init__(config)
        self.threshold: float | None = None if self.config.dss_thres == "calibrate" else float(self.config.dss_thres)

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        return {"doc_steps": 2, "dss_samples": 2, "calibration_images": 64}

    def sensitivity(self, x: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """1 − the mean cosine similarity between the embedding of ``x`` and of sign-noise copies."""
        cfg, clip = self.config, self.clip
        reference = raw_embed(clip, x) if reference is None else reference
        cosines = []
        for _ in range(cfg.dss_samples):
            noisy = (x + cfg.dss_noise * torch.randn_like(x).sign()).clamp(0, 1)
            cosines.append(F.cosine_similarity(raw_embed(clip, noisy), reference, dim=-1))
        return 1 - torch.stack(cosines).mean(dim=0)

    def weight(self, score: torch.Tensor) -> torch.Tensor:
        """The share of the optimised counterattack: high for a stable (low-score) embedding."""
        if self.threshold is None:
            raise RuntimeError("DOC: dss_thres is 'calibrate' and fit has not run")
        temp = self.config.dss_temp * max(abs(self.threshold), 1e-8)
        return torch.sigmoid((self.threshold - score) / temp)

    def counterattack(self, images: torch.Tensor, unroll: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(the blended perturbation, the weight of the optimised part); a graph to ``images`` only when
        ``unroll``."""
        cfg, clip = self.config, self.clip
        x = images if unroll else images.detach()
        start = uniform_start(x, cfg.doc_eps)  # drawn first: the start does not depend on the score's noise
        with torch.set_grad_enabled(unroll):
            reference = raw_embed(clip, x)
            weight = self.weight(self.sensitivity(x, reference)).view(-1, 1, 1, 1)
        delta, accumulated = start, torch.zeros_like(x)
        with torch.enable_grad():
            for _ in range(cfg.doc_steps):
                d = variable(delta, unroll)
                grad = inner_gradient(embedding_distance(raw_embed(clip, x + d), reference), d, unroll)
                direction = orthogonal_direction(grad, torch.randn_like(grad), cfg.ortho_lambda)
                accumulated = cfg.momentum * accumulated + direction
                delta = into_ball(d + cfg.doc_step_size * signed(accumulated, unroll), x, cfg.doc_eps)
                delta = delta if unroll else delta.detach()
        return weight * delta + (1 - weight) * start, weight.flatten()

    def defend(self, images: torch.Tensor, unroll: bool) -> torch.Tensor:
        delta, _ = self.counterattack(images, unroll)
        return self._base()(images + delta)

    def passes(self) -> tuple[int, int]:
        steps = self.config.doc_steps
        return 1 + self.config.dss_samples + steps + 1, steps

    def fit(self, data: FitData) -> dict[str, Any]:
        """Bind the base model and measure the sensitivity score of clean seen-class training images
        (calibrating the threshold from them when ``dss_thres`` is ``calibrate``)."""
        self.bind(data.base)
        if data.train is None:
            if self.threshold is None:
                raise RuntimeError("DOC: dss_thres 'calibrate' needs a training split")
            return {}
        score = score_clean_train(data, self.sensitivity, self.config.calibration_images)
        quantile = float(torch.quantile(score, self.config.dss_quantile))
        if self.threshold is None:
            self.threshold = quantile
        return {
            "dss_clean_train": {
                "images": len(score),
                "quantiles": tau_quantiles(score),
                "calibrated_threshold": round(quantile, 6),
                "threshold_in_use": round(self.threshold, 6),
                "weight_mean": round(float(self.weight(score).mean()), 4),
            }
        }
