"""SCC — self-calibrated consistency counterattacks (Liu et al., ICML 2026).

1. Warm-up: TTC's τ-gated counterattack on the input (:mod:`.gated_counterattack`).
2. Soft prototype: the softmax of the zero-shot logits, averaged over weak views of the warmed-up image
   (the image itself and copies with low-variance Gaussian noise; horizontal flips optionally), is
   sharpened with a temperature below 1 and mixes the class text embeddings; its arg max is the pseudo-label.
3. Correction: one perturbation of the *input*, shared by all its views, is found by signed ascent on the
   margin cos(f(view), prototype) − max over the other classes of cos(f(view), t_k), averaged over views,
   inside an ``scc_eps`` L∞ ball from zero.
4. Prediction: the zero-shot logits averaged over the views of the corrected input.

The official code could not be read; the warm-up takes TTC's defaults and the view count, noise,
temperature and correction budget are the reproduction's own (see the catalog's deviations).
Adaptive attacks: BPDA over the warm-up and the correction, BPDA at the input, or every inner step
unrolled (``adaptive``), with EOT over the noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vlmdefense.defenses.training_free.common import tau_quantiles
from vlmdefense.defenses.training_free.counterattack import (
    CounterattackDefense,
    inner_gradient,
    into_ball,
    score_clean_train,
    signed,
    variable,
)
from vlmdefense.defenses.training_free.gated_counterattack import GateSettings, gated_counterattack

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData


@dataclass
class SCCConfig:
    """SCC's hyperparameters (warm-up: TTC's official defaults; the rest assumed, see the module docstring).

    Attributes:
        warmup_eps, warmup_steps, warmup_step_size, tau_thres, beta: the TTC warm-up.
        n_views: views per image, the image itself included (the rest carry Gaussian noise).
        noise_sd: standard deviation of the views' Gaussian noise on [0, 1] pixels.
        flip: flip every second noisy view horizontally (the paper's flips; off for digits, whose mirror
            image is not the same digit).
        temperature: sharpening temperature of the averaged view probabilities (below 1).
        scc_eps: L∞ radius of the correction.
        scc_steps: signed-gradient steps of the correction.
        scc_step_size: step size of the correction.
        calibration_images: clean seen-class training images on which ``fit`` records τ and the gate.
        adaptive: the adaptive attack surface (``bpda``, ``input`` or ``unrolled``).
    """

    warmup_eps: float = 4 / 255
    warmup_steps: int = 2
    warmup_step_size: float = 1 / 255
    tau_thres: float = 0.2
    beta: float = 2.0
    n_views: int = 4
    noise_sd: float = 0.01
    flip: bool = False
    temperature: float = 0.5
    scc_eps: float = 4 / 255
    scc_steps: int = 2
    scc_step_size: float = 2 / 255
    calibration_images: int = 720
    adaptive: str = "bpda"


def margin_to_prototype(
    embeddings: torch.Tensor, prototype: torch.Tensor, text: torch.Tensor, pseudo: torch.Tensor
) -> torch.Tensor:
    """cos(embedding, prototype) − max over classes other than ``pseudo`` of cos(embedding, text), per row
    (unit ``embeddings`` and ``text``)."""
    to_prototype = (embeddings * F.normalize(prototype, dim=-1)).sum(-1)
    to_classes = embeddings @ text.T
    others = to_classes.masked_fill(F.one_hot(pseudo, text.shape[0]).bool(), float("-inf"))
    return to_prototype - others.max(dim=-1).values


class SCC(CounterattackDefense):
    """Self-calibrated consistency (Liu et al., ICML 2026) on the zero-shot classifier."""

    id = "scc"
    randomized = True  # the warm-up's noise start and the views' noise are drawn at every prediction
    config_class = SCCConfig
    config: SCCConfig

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        return {"n_views": 2, "warmup_steps": 1, "scc_steps": 1, "calibration_images": 64}

    @property
    def gate(self) -> GateSettings:
        """The warm-up's budget and τ gate."""
        cfg = self.config
        return GateSettings(cfg.warmup_eps, cfg.warmup_steps, cfg.warmup_step_size, cfg.tau_thres, cfg.beta)

    def tau(self, images: torch.Tensor) -> torch.Tensor:
        """τ of the warm-up for ``images`` (one draw of its starting noise)."""
        return gated_counterattack(self.clip, images, self.gate, unroll=False)[1]

    def fit(self, data: FitData) -> dict[str, Any]:
        """Bind the base model and record where the warm-up's τ gate falls on clean seen-class training images."""
        self.bind(data.base)
        if data.train is None:
            return {}
        taus = score_clean_train(data, self.tau, self.config.calibration_images)
        below = float((taus < self.config.tau_thres).float().mean())
        return {
            "tau_clean_train": {
                "images": len(taus),
                "quantiles": tau_quantiles(taus),
                "fraction_gated": round(below, 4),
            }
        }

    def draw_noise(self, images: torch.Tensor) -> torch.Tensor:
        """The noise of the ``n_views − 1`` noisy views, drawn once per prediction: (V − 1, N, C, H, W)."""
        return torch.randn(self.config.n_views - 1, *images.shape, device=images.device) * self.config.noise_sd

    def views(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The image and its noisy (every second one flipped, with ``flip``) copies, stacked (V·N, C, H, W)."""
        out = [images]
        for i, n in enumerate(noise):
            view = (images + n).clamp(0, 1)
            out.append(view.flip(-1) if self.config.flip and i % 2 == 0 else view)
        return torch.cat(out)

    def prototype(self, warmed: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(soft text prototype, pseudo-label) from the views of the warmed-up images."""
        base = self._base()
        probs = torch.softmax(base(self.views(warmed, noise)), dim=-1)
        mean = probs.view(self.config.n_views, len(warmed), -1).mean(dim=0)
        sharp = mean.clamp_min(1e-12).pow(1 / self.config.temperature)
        sharp = sharp / sharp.sum(dim=-1, keepdim=True)
        return sharp @ base.text_weights, mean.argmax(dim=-1)

    def calibrate(self, x: torch.Tensor, noise: torch.Tensor, unroll: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The warm-up, then (soft prototype, pseudo-label) from the warmed-up views; a graph to ``x`` only
        when ``unroll``."""
        x = x if unroll else x.detach()
        warm, _ = gated_counterattack(self.clip, x, self.gate, unroll)
        with torch.set_grad_enabled(unroll):
            return self.prototype(x + warm, noise)

    def margin(
        self, x: torch.Tensor, noise: torch.Tensor, prototype: torch.Tensor, pseudo: torch.Tensor
    ) -> torch.Tensor:
        """The correction's objective per image: the margin averaged over the views of ``x``."""
        base, v = self._base(), self.config.n_views
        embeddings = base.embed(self.views(x, noise))
        margin = margin_to_prototype(embeddings, prototype.repeat(v, 1), base.text_weights, pseudo.repeat(v))
        return margin.view(v, len(x)).mean(dim=0)

    def correct(
        self, x: torch.Tensor, noise: torch.Tensor, prototype: torch.Tensor, pseudo: torch.Tensor, unroll: bool
    ) -> torch.Tensor:
        """The correction of ``x``: signed ascent on :meth:`margin` from zero, one perturbation for all views."""
        cfg = self.config
        x = x if unroll else x.detach()
        delta = torch.zeros_like(x)
        with torch.enable_grad():
            for _ in range(cfg.scc_steps):
                d = variable(delta, unroll)
                grad = inner_gradient(self.margin(x + d, noise, prototype, pseudo).sum(), d, unroll)
                moved = into_ball(d + cfg.scc_step_size * signed(grad, unroll), x, cfg.scc_eps)
                delta = moved if unroll else moved.detach()
        return delta

    def defend(self, images: torch.Tensor, unroll: bool) -> torch.Tensor:
        noise = self.draw_noise(images)
        prototype, pseudo = self.calibrate(images, noise, unroll)
        delta = self.correct(images, noise, prototype, pseudo, unroll)
        logits = self._base()(self.views(images + delta, noise))
        return logits.view(self.config.n_views, len(images), -1).mean(dim=0)

    def passes(self) -> tuple[int, int]:
        cfg, v = self.config, self.config.n_views
        warm = 1 + cfg.warmup_steps  # reference embedding, one per step
        return warm + v + v * cfg.scc_steps + v, cfg.warmup_steps + v * cfg.scc_steps
