"""FPT-Noise — a counterattack whose strength follows the image's feature perception (Deng et al., arXiv 2025).

Only the paper's abstract could be read and no code is released, so this is a reconstruction of the
four parts the abstract names, each in the simplest form consistent with it (every choice is listed in
the catalog's deviations):

1. Feature perception: the *feature change rate* of an image is the relative change of its unnormalised
   embedding under uniform noise of each ``probe_levels`` radius, divided by the radius and averaged.
   Attacked images are falsely stable (their features react slowly), as TTC observed.
2. Dynamic feature modulator: the rate sets the image's own counterattack budget, from ``eps_min`` (fast
   features: clean) to ``eps_max`` (slow: attacked) through sigmoid((threshold − rate) / (temp · threshold)).
   The counterattack is TTC's: signed steps raising the embedding distance from the input, from noise.
3. Scene-aware regulation: an image whose counterattacked embedding moved further than the stability
   threshold has its perturbation scaled by ``regulation``.
4. Test-time transformation ensembling: the zero-shot logits averaged over TTE's label-preserving views.

Adaptive attacks: BPDA over the counterattack, BPDA at the input, or its unrolled steps (``adaptive``),
with EOT over the noise; the ensemble is differentiated as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from vlmdefense.defenses.training_free.common import tau_quantiles
from vlmdefense.defenses.training_free.counterattack import (
    CounterattackDefense,
    embedding_distance,
    inner_gradient,
    raw_embed,
    relative_change,
    score_clean_train,
    signed,
    uniform_start,
    variable,
)
from vlmdefense.defenses.training_free.tte import TTE, TTEConfig

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData


@dataclass
class FPTNoiseConfig:
    """FPT-Noise's settings (all assumed: the abstract gives no values).

    Attributes:
        probe_max: the largest radius of the uniform noise the feature change rate is measured under.
        probe_levels: how many radii, halving from ``probe_max`` (3: 8, 4 and 2/255).
        rate_thres: feature-change-rate threshold, or ``"calibrate"``: the ``rate_quantile`` quantile of the
            rate of clean seen-class training images.
        rate_quantile: quantile used by ``rate_thres: calibrate``.
        rate_temp: temperature of the budget's sigmoid, relative to the threshold.
        eps_min, eps_max: the per-image counterattack budget's range (L∞).
        fpt_steps: counterattack steps.
        step_fraction: step size as a fraction of the image's budget.
        stability_thres: embedding-move threshold of the regulation, or ``"calibrate"``: the
            ``stability_quantile`` quantile of the move of clean seen-class training images.
        stability_quantile: quantile used by ``stability_thres: calibrate``.
        regulation: factor applied to the perturbation of an image that moved beyond the stability threshold.
        n_crops: shifted crops of TTE's ensemble (with the identity, the zoom and the zoomed crops).
        calibration_images: clean seen-class training images used by ``fit``.
        adaptive: the adaptive attack surface (``bpda``, ``input`` or ``unrolled``).
    """

    probe_max: float = 8 / 255
    probe_levels: int = 3
    rate_thres: float | str = "calibrate"
    rate_quantile: float = 0.1
    rate_temp: float = 0.1
    eps_min: float = 1 / 255
    eps_max: float = 4 / 255
    fpt_steps: int = 2
    step_fraction: float = 0.5
    stability_thres: float | str = "calibrate"
    stability_quantile: float = 0.95
    regulation: float = 0.5
    n_crops: int = 2
    calibration_images: int = 720
    adaptive: str = "bpda"


def clip_to(delta: torch.Tensor, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``delta`` within each image's L∞ radius ``eps`` (shape (N, 1, 1, 1)) and x + delta in [0, 1]."""
    delta = torch.max(torch.min(delta, eps), -eps)
    return torch.max(torch.min(delta, 1 - x), -x)


class FPTNoise(CounterattackDefense):
    """FPT-Noise (Deng et al., 2025), reconstructed from its abstract, on the zero-shot classifier."""

    id = "fpt-noise"
    randomized = True  # probe noise and the counterattack's start are drawn at every prediction
    config_class = FPTNoiseConfig
    config: FPTNoiseConfig

    def __init__(self, config: FPTNoiseConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        self.rate_threshold = None if cfg.rate_thres == "calibrate" else float(cfg.rate_thres)
        self.stability_threshold = None if cfg.stability_thres == "calibrate" else float(cfg.stability_thres)
        self.ensemble = TTE(TTEConfig(n_crops=cfg.n_crops))

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        return {"fpt_steps": 1, "probe_levels": 1, "calibration_images": 64}

    @property
    def radii(self) -> list[float]:
        """The probe noise radii, largest first."""
        return [self.config.probe_max / 2**k for k in range(self.config.probe_levels)]

    def _thresholds(self) -> tuple[float, float]:
        if self.rate_threshold is None or self.stability_threshold is None:
            raise RuntimeError("FPTNoise: a threshold is 'calibrate' and fit has not run")
        return self.rate_threshold, self.stability_threshold

    def change_rate(self, x: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """The feature change rate per image: mean over the probe radii of relative change / radius."""
        reference = raw_embed(self.clip, x) if reference is None else reference
        rates = [relative_change(raw_embed(self.clip, x + uniform_start(x, r)), reference) / r for r in self.radii]
        return torch.stack(rates).mean(dim=0)

    def budget(self, rate: torch.Tensor) -> torch.Tensor:
        """Each image's counterattack radius from its rate (slow features: the larger budget)."""
        cfg = self.config
        if self.rate_threshold is None:
            raise RuntimeError("FPTNoise: rate_thres is 'calibrate' and fit has not run")
        threshold = self.rate_threshold
        strength = torch.sigmoid((threshold - rate) / (cfg.rate_temp * threshold))
        return cfg.eps_min + strength * (cfg.eps_max - cfg.eps_min)

    def modulated(self, images: torch.Tensor, unroll: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the counterattack before regulation, each image's budget, the input's embedding); a graph to
        ``images`` only when ``unroll``."""
        cfg, clip = self.config, self.clip
        x = images if unroll else images.detach()
        with torch.set_grad_enabled(unroll):
            reference = raw_embed(clip, x)
            eps = self.budget(self.change_rate(x, reference)).view(-1, 1, 1, 1)
        delta = clip_to((torch.rand_like(x) * 2 - 1) * eps, x, eps)
        with torch.enable_grad():
            for _ in range(cfg.fpt_steps):
                d = variable(delta, unroll)
                grad = inner_gradient(embedding_distance(raw_embed(clip, x + d), reference), d, unroll)
                moved = clip_to(d + cfg.step_fraction * eps * signed(grad, unroll), x, eps)
                delta = moved if unroll else moved.detach()
        return delta, eps, reference

    def moved_by(self, images: torch.Tensor) -> torch.Tensor:
        """How far the (unregulated) counterattack moves each image's embedding, relative to it."""
        delta, _, reference = self.modulated(images, unroll=False)
        return relative_change(raw_embed(self.clip, images + delta), reference)

    def counterattack(self, images: torch.Tensor, unroll: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(the regulated perturbation, which images were regulated)."""
        stability = self._thresholds()[1]
        delta, _, reference = self.modulated(images, unroll)
        x = images if unroll else images.detach()
        with torch.set_grad_enabled(unroll):
            move = relative_change(raw_embed(self.clip, x + delta), reference)
        regulated = (move > stability).detach()
        scale = torch.where(regulated, self.config.regulation, 1.0).to(delta.dtype).view(-1, 1, 1, 1)
        return delta * scale, regulated

    def defend(self, images: torch.Tensor, unroll: bool) -> torch.Tensor:
        delta, _ = self.counterattack(images, unroll)
        views = self.ensemble.views(images + delta)
        v, n = views.shape[:2]
        return self._base()(views.flatten(0, 1)).view(v, n, -1).mean(dim=0)

    def passes(self) -> tuple[int, int]:
        cfg = self.config
        forward = 1 + cfg.probe_levels + cfg.fpt_steps + 1 + self.ensemble.n_views
        return forward, cfg.fpt_steps

    def fit(self, data: FitData) -> dict[str, Any]:
        """Bind the base model; measure the change rate and the counterattack's move on clean seen-class
        training images, calibrating the thresholds that are ``calibrate``."""
        cfg = self.config
        self.bind(data.base)
        if data.train is None:
            self._thresholds()
            return {}
        rates = score_clean_train(data, self.change_rate, cfg.calibration_images)
        if self.rate_threshold is None:
            self.rate_threshold = float(torch.quantile(rates, cfg.rate_quantile))
        moves = score_clean_train(data, self.moved_by, cfg.calibration_images)
        if self.stability_threshold is None:
            self.stability_threshold = float(torch.quantile(moves, cfg.stability_quantile))
        budgets = self.budget(rates)
        return {
            "perception_clean_train": {
                "images": len(rates),
                "rate_quantiles": tau_quantiles(rates),
                "rate_threshold": round(self.rate_threshold, 5),
                "budget_mean_255": round(255 * float(budgets.mean()), 3),
                "move_quantiles": tau_quantiles(moves),
                "stability_threshold": round(self.stability_threshold, 5),
                "fraction_regulated": round(float((moves > self.stability_threshold).float().mean()), 4),
            }
        }
