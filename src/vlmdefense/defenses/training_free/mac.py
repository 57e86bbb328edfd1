"""MAC — multi-view guided adaptive counterattacks (Kim & Um, CVPR 2026).

The input and ``num_views − 1`` weakly augmented copies are each counterattacked as in TTC: from
uniform noise in an ``mac_eps`` L∞ ball, signed steps raise the squared L2 distance between the view's
perturbed and original (unnormalised) image embeddings. Each view's corruption degree — the relative
change of its embedding under one further weak augmentation — scales its final perturbation by
``sigmoid((degree − tau_thres) / tau_temp)``; the zero-shot logits of the counterattacked views are
averaged. Adaptive attacks: BPDA over the counterattack (``bpda`` / ``input``) or its unrolled steps,
with EOT over the views, the noise and the augmentations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from vlmdefense.defenses.training_free.common import tau_quantiles
from vlmdefense.defenses.training_free.counterattack import (
    CounterattackDefense,
    embedding_distance,
    gaussian_blur,
    inner_gradient,
    into_ball,
    random_affine,
    raw_embed,
    relative_change,
    score_clean_train,
    signed,
    uniform_start,
    variable,
)

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData


@dataclass
class MACConfig:
    """MAC's hyperparameters (the official ``mac_test.sh``: budget 8/255, 4 steps of budget / 4, 2 views,
    threshold 0.7, temperature 0.01; the augmentation of its ``build_aug``).

    Attributes:
        mac_eps: L∞ radius of each view's counterattack.
        mac_steps: counterattack steps.
        mac_step_size: step size (official: ``mac_eps / 4``).
        num_views: views per image, the input included.
        tau_thres: corruption-degree threshold of the soft weight, or ``"calibrate"``: the
            ``tau_quantile`` quantile of the degree of clean seen-class training images (a variant).
        tau_quantile: quantile used by ``tau_thres: calibrate``.
        tau_temp: temperature of the soft weight.
        rotation, translate, scale: the random affine map (degrees, fraction of the side, zoom range).
        brightness, contrast: colour jitter ranges (applied with probability 1/2; saturation and hue are
            no-ops on grey digits).
        blur_sigma_min, blur_sigma_max: Gaussian blur (kernel 5, probability 1/2).
        noise_sigma: largest standard deviation of the additive Gaussian noise (probability 1/2).
        calibration_images: training images on which ``fit`` measures the corruption degree.
        adaptive: the adaptive attack surface (``bpda``, ``input`` or ``unrolled``).
    """

    mac_eps: float = 8 / 255
    mac_steps: int = 4
    mac_step_size: float = 2 / 255
    num_views: int = 2
    tau_thres: float | str = 0.7
    tau_quantile: float = 0.95
    tau_temp: float = 0.01
    rotation: float = 5.0
    translate: float = 0.04
    scale: float = 0.08
    brightness: float = 0.08
    contrast: float = 0.08
    blur_sigma_min: float = 0.5
    blur_sigma_max: float = 1.2
    noise_sigma: float = 0.02
    calibration_images: int = 720
    adaptive: str = "bpda"


class MAC(CounterattackDefense):
    """Multi-view guided adaptive counterattacks (Kim & Um, CVPR 2026)."""

    id = "mac"
    randomized = True  # random views, noise start and augmentation at every prediction
    config_class = MACConfig
    config: MACConfig

    def __init__(self, config: MACConfig | None = None) -> None:
        super().__init__(config)
        self.threshold: float | None = None if self.config.tau_thres == "calibrate" else float(self.config.tau_thres)

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        return {"mac_steps": 2, "mac_step_size": 4 / 255, "calibration_images": 64}

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """One weak augmentation per image (affine always; jitter, blur, noise each with probability 1/2);
        differentiable in ``x``."""
        cfg = self.config
        n = len(x)
        shape = (n, 1, 1, 1)

        def coin() -> torch.Tensor:
            return (torch.rand(shape, device=x.device) < 0.5).to(x.dtype)

        def spread(width: float) -> torch.Tensor:
            return torch.empty(shape, device=x.device).uniform_(1 - width, 1 + width)

        out = random_affine(x, cfg.rotation, cfg.translate, cfg.scale)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        jittered = (mean + spread(cfg.contrast) * (out * spread(cfg.brightness) - mean)).clamp(0, 1)
        use = coin()
        out = use * jittered + (1 - use) * out
        sigma = torch.empty(n, device=x.device).uniform_(cfg.blur_sigma_min, cfg.blur_sigma_max)
        use = coin()
        out = use * gaussian_blur(out, sigma) + (1 - use) * out
        noise = torch.randn_like(out) * torch.empty(shape, device=x.device).uniform_(0, cfg.noise_sigma)
        use = coin()
        return (out + use * noise).clamp(0, 1)

    def views(self, images: torch.Tensor) -> torch.Tensor:
        """The input and ``num_views − 1`` augmented copies, stacked (V·N, C, H, W)."""
        return torch.cat([images] + [self.augment(images) for _ in range(self.config.num_views - 1)])

    def corruption(self, views: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """The relative change of each view's embedding under one further augmentation."""
        clip = self.clip
        reference = raw_embed(clip, views) if reference is None else reference
        return relative_change(raw_embed(clip, self.augment(views)), reference)

    def soft_weight(self, degree: torch.Tensor) -> torch.Tensor:
        """sigmoid((degree − tau_thres) / tau_temp)."""
        if self.threshold is None:
            raise RuntimeError("MAC: tau_thres is 'calibrate' and fit has not run")
        return torch.sigmoid((degree - self.threshold) / self.config.tau_temp)

    def counterattack(self, views: torch.Tensor, unroll: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(the weighted perturbation of every view, the soft weights); a graph to ``views`` only when
        ``unroll``."""
        cfg, clip = self.config, self.clip
        x = views if unroll else views.detach()
        with torch.set_grad_enabled(unroll):
            reference = raw_embed(clip, x)
            weight = self.soft_weight(self.corruption(x, reference))
        delta = uniform_start(x, cfg.mac_eps)
        with torch.enable_grad():
            for _ in range(cfg.mac_steps):
                d = variable(delta, unroll)
                grad = inner_gradient(embedding_distance(raw_embed(clip, x + d), reference), d, unroll)
                delta = into_ball(d + cfg.mac_step_size * signed(grad, unroll), x, cfg.mac_eps)
                delta = delta if unroll else delta.detach()
        return delta * weight.view(-1, 1, 1, 1), weight

    def defend(self, images: torch.Tensor, unroll: bool) -> torch.Tensor:
        views = self.views(images)
        delta, _ = self.counterattack(views, unroll)
        logits = self._base()(views + delta)
        return logits.view(self.config.num_views, len(images), -1).mean(dim=0)

    def passes(self) -> tuple[int, int]:
        v, steps = self.config.num_views, self.config.mac_steps
        return v * (steps + 3), v * steps  # reference, augmented copy, one per step, final prediction

    def fit(self, data: FitData) -> dict[str, Any]:
        """Bind the base model and record the corruption degree and soft weight of clean seen-class
        training images (where the paper's threshold falls on this model)."""
        self.bind(data.base)
        if data.train is None:
            if self.threshold is None:
                raise RuntimeError("MAC: tau_thres 'calibrate' needs a training split")
            return {}
        degree = score_clean_train(data, self.corruption, self.config.calibration_images)
        quantile = float(torch.quantile(degree, self.config.tau_quantile))
        if self.threshold is None:
            self.threshold = quantile
        weight = self.soft_weight(degree)
        return {
            "corruption_clean_train": {
                "images": len(degree),
                "degree_quantiles": tau_quantiles(degree),
                "weight_mean": round(float(weight.mean()), 5),
                "calibrated_threshold": round(quantile, 5),
                "threshold_in_use": round(self.threshold, 5),
                "fraction_above_threshold": round(float((degree > self.threshold).float().mean()), 4),
            }
        }
