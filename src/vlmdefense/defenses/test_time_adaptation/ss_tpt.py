"""SS-TPT — stability- and suitability-guided test-time prompt tuning (Kim and Um, ICML 2026).

Every view of a test image gets a quality score before tuning: *suitability*, the inverse mean
feature distance (``2 - 2 cos``) to the image's other views (dense views are typical ones), and
*stability*, the inverse Jensen-Shannon divergence between the view's zero-shot prediction and that of
a weakly re-perturbed copy (small affine change, brightness/contrast jitter, Gaussian noise). The
min-max normalised scores are mixed (``ss_ratio`` suitability) and softened by a softmax at
``temperature``. One AdamW step on the text context minimises the mean entropy of the ``n_select``
lowest-entropy views plus ``consistency`` times the KL divergence from each of them to the
score-weighted leave-one-out average prediction of the others; the prediction is the score-weighted
sum of all views' tuned logits. Both encoders are frozen; the context is reset per image.

Adaptive attack: BPDA through the prompt update (or the unrolled step), EOT over the random views and
re-perturbations; the scores and the weighted vote stay differentiable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vlmdefense.defenses.test_time_adaptation.prompt_tuning import PromptTuning, PromptTuningConfig
from vlmdefense.defenses.test_time_adaptation.views import entropy


@dataclass
class SSTPTConfig(PromptTuningConfig):
    """SS-TPT's hyperparameters (official ``run_sstpt.sh`` / argument defaults in brackets).

    Attributes:
        n_views: inputs per image, the image and ``n_views - 1`` augmented views [16].
        n_select: lowest-entropy views in the loss (at least 2) [3 of 16].
        steps, lr, weight_decay: AdamW on the context [1, 5e-3, torch's 0.01].
        ss_ratio: weight of suitability in the score, ``1 - ss_ratio`` for stability [0.4].
        score_temperature: softmax temperature of the view weights [0.25].
        consistency: weight of the leave-one-out KL term [1.0].
        jitter_degrees, jitter_translate, jitter_scale: the weak affine re-perturbation [5°, 4 %,
            ±8 %]; jitter_brightness, jitter_contrast [±8 %, applied with probability 0.5];
            jitter_noise: largest Gaussian noise sd [0.02, probability 0.5].

    R-TPT's ``selection``, ``temperature``, ``neighbours`` and ``ensemble`` are inherited and unused.
    """

    n_views: int = 8
    n_select: int = 2
    ss_ratio: float = 0.4
    score_temperature: float = 0.25
    consistency: float = 1.0
    jitter_degrees: float = 5.0
    jitter_translate: float = 0.04
    jitter_scale: float = 0.08
    jitter_brightness: float = 0.08
    jitter_contrast: float = 0.08
    jitter_noise: float = 0.02


def weak_perturbation(views: torch.Tensor, cfg: SSTPTConfig) -> torch.Tensor:
    """SS-TPT's re-perturbation of ``views`` ``(B, V, C, H, W)``: one random draw per image shared by its
    views (the official transform is applied to an image's whole view batch); differentiable."""
    b, v = views.shape[:2]
    device, dtype = views.device, views.dtype
    u = lambda *shape: torch.rand(*shape, device=device, dtype=dtype)  # noqa: E731
    angle = (u(b) * 2 - 1) * math.radians(cfg.jitter_degrees)
    scale = 1 + (u(b) * 2 - 1) * cfg.jitter_scale
    shift = (u(b, 2) * 2 - 1) * cfg.jitter_translate * 2  # in [-1, 1] grid units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], -1), torch.stack([sin, cos, shift[:, 1]], -1)], 1)
    flat = views.flatten(0, 1)
    grid = F.affine_grid(theta.repeat_interleave(v, dim=0), list(flat.shape), align_corners=False)
    x = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False).view_as(views)
    per_image = lambda t: t.view(b, 1, 1, 1, 1)  # noqa: E731
    on = lambda: per_image((u(b) < 0.5).to(dtype))  # noqa: E731  (each jitter with probability 0.5)
    bright = 1 + (u(b) * 2 - 1) * cfg.jitter_brightness
    x = x * (1 + on() * (per_image(bright) - 1))
    contrast = 1 + (u(b) * 2 - 1) * cfg.jitter_contrast
    mean = x.mean(dim=(-3, -2, -1), keepdim=True)
    x = (x + on() * (per_image(contrast) - 1) * (x - mean)).clamp(0, 1)
    noise = torch.randn_like(x) * per_image(u(b) * cfg.jitter_noise) * on()
    return (x + noise).clamp(0, 1)


def js_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Jensen-Shannon divergence along the last dimension (the official ``eps`` smoothing)."""
    m = 0.5 * (p + q) + eps
    kl = lambda a: (m * (m.log() - (a + eps).log())).sum(-1)  # noqa: E731
    return 0.5 * (kl(p) + kl(q))


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation along dim 1."""
    low, high = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
    return (x - low) / (high - low + 1e-8)


class SSTPT(PromptTuning):
    """SS-TPT (Kim and Um, ICML 2026): view quality (stability, suitability) weights the consistency
    loss of test-time prompt tuning and the final vote."""

    id = "ss-tpt"
    config_class = SSTPTConfig
    config: SSTPTConfig

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        return {"n_views": 4}

    def view_scores(self, views: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``(B, V, 2)``: suitability and stability of every view (initial prompt)."""
        assert self.learner is not None
        base = self._base()
        distance = 2 - 2 * features @ features.transpose(1, 2)  # (B, V, V), self-distance 0
        v = features.shape[1]
        suitability = 1.0 / (distance.sum(-1) / max(1, v - 1) + 1e-8)
        with torch.no_grad():
            text = self.learner()
        p = torch.softmax(base.logit_scale * features @ text.T, dim=-1)
        moved = weak_perturbation(views, self.config)
        q_features = base.embed(moved.flatten(0, 1)).view_as(features)
        q = torch.softmax(base.logit_scale * q_features @ text.T, dim=-1)
        stability = 1.0 / (js_divergence(p, q) + 1e-8)
        return torch.stack([suitability, stability], dim=-1)

    def weights(self, scores: torch.Tensor) -> torch.Tensor:
        """Softmax weights ``(B, n)`` of the min-max normalised, mixed scores ``(B, n, 2)``."""
        cfg = self.config
        mixed = cfg.ss_ratio * minmax(scores[..., 0]) + (1 - cfg.ss_ratio) * minmax(scores[..., 1])
        return torch.softmax(mixed / cfg.score_temperature, dim=-1)

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        k = min(logits.shape[1], max(2, self.config.n_select))
        return entropy(logits).argsort(dim=1)[:, :k]

    def objective(self, selected_logits: torch.Tensor, selected_scores: torch.Tensor | None) -> torch.Tensor:
        """Mean entropy of the selected views plus the KL divergence from each to the weighted
        leave-one-out average of the others (a detached reference), per image."""
        assert selected_scores is not None
        loss = entropy(selected_logits).mean(dim=1)
        if self.config.consistency <= 0:
            return loss
        w = self.weights(selected_scores).unsqueeze(-1)  # (B, k, 1)
        probs = torch.softmax(selected_logits, dim=-1).clamp_min(1e-8)
        others = (w * probs).sum(dim=1, keepdim=True) - w * probs
        reference = (others / (w.sum(dim=1, keepdim=True) - w).clamp_min(1e-8)).detach()
        kl = (torch.xlogy(reference, reference) - reference * probs.log()).sum(-1).mean(dim=1)
        return loss + self.config.consistency * kl

    def ensemble(
        self, features: torch.Tensor, logits: torch.Tensor, scores: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert scores is not None
        weights = self.weights(scores)
        return (weights.unsqueeze(-1) * logits).sum(dim=1), weights

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        n = len(images)
        self.counter.images += n
        self.counter.forward += 2 * n * self.config.n_views  # the views and their re-perturbed copies
        self.counter.backward += n * self.config.steps
        return self.run(images).logits
