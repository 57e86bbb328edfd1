"""A-TPT — attention-guided test-time prompt tuning (Hai, Wang and Wei, ICML 2026).

R-TPT with other views. Each augmented view starts as a random resized crop (the *base*) and an AugMix
mixture of augmentation chains of it (the *pure mix*). A gradient-weighted attention rollout of the
last two image blocks (the official "Grad-Rollout-last2avg": the top-1 logit's gradient weights every
token, the rollout of the last block through the weighted average of the last two maps gives the
class token's relevance of each patch) marks where CLIP looks; the view is then rebuilt pixel by pixel
as ``m · base + (1 - m) · mix`` with ``m = m_high`` in the top ``p_high`` of the attention map and
``m_low`` in its bottom ``p_low`` (the AugMix Beta draw in between), so the salient parts stay closer
to the image. On these views: R-TPT's one AdamW step on the mean pointwise entropy of the most
confident views and its reliability-weighted ensemble.

Adaptive attack: the views stay differentiable in the image (crops, augmentation chains, blend); the
attention masks are thresholded (piecewise constant) and computed without a graph, which is exact up
to their jumps; BPDA (or the unrolled step) through the prompt update; EOT over the random views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vlmdefense.defenses.test_time_adaptation.prompt_tuning import PromptTuning, PromptTuningConfig
from vlmdefense.defenses.test_time_adaptation.views import random_views
from vlmdefense.workbench.models import LoadedClip


@dataclass
class ATPTConfig(PromptTuningConfig):
    """A-TPT's hyperparameters (official README command / argument defaults in brackets); R-TPT's
    fields keep R-TPT's meaning (views, selection, step, reliability ensemble).

    Attributes:
        p_high: share of pixels with the highest attention [0.2]; p_low: lowest [0.8].
        m_high, m_low: weight of the base view there [0.8, 0.2].
        mix_width: augmentation chains per view [AugMix 3]; mix_depth: ops per chain, up to [3].
        severity: AugMix severity [1].
        attention_quantile: the attention map is clipped at this quantile before normalising [0.99].
    """

    ensemble: str = "reliability"
    p_high: float = 0.2
    p_low: float = 0.8
    m_high: float = 0.8
    m_low: float = 0.2
    mix_width: int = 3
    mix_depth: int = 3
    severity: float = 1.0
    attention_quantile: float = 0.99


# ---- AugMix on tensors -----------------------------------------------------------------------------------


def _affine(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Warp ``x`` (N, C, H, W) by per-image 2x3 matrices in [-1, 1] coordinates (zero fill, as PIL)."""
    grid = F.affine_grid(matrix, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _identity(n: int, x: torch.Tensor) -> torch.Tensor:
    return torch.eye(2, 3, device=x.device, dtype=x.dtype).repeat(n, 1, 1)


def augment_ops(x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> list[torch.Tensor]:
    """TPT's AugMix operations at per-image ``level`` (severity-scaled, in (0, 1]) and ``sign``:
    autocontrast, posterize (straight-through), rotate, solarize, shear x/y, translate x/y; magnitudes
    as ``augmix_ops.py`` (30°, 0.3 shear, a third of the side, 4 bits, a 256-level threshold, over 10).
    Equalize is left out (a histogram step with no useful gradient)."""
    n = x.shape[0]
    low = x.amin(dim=(-2, -1), keepdim=True)
    high = x.amax(dim=(-2, -1), keepdim=True)
    autocontrast = torch.where(high > low, (x - low) / (high - low + 1e-8), x)
    bits = 4 - torch.floor(level * 4 / 10)
    step = (2 ** (8 - bits)).view(-1, 1, 1, 1)
    posterized = torch.floor(x * 255 / step) * step / 255
    posterize = x + (posterized - x).detach()
    threshold = (256 - torch.floor(level * 256 / 10)).view(-1, 1, 1, 1) / 255
    solarize = torch.where(x >= threshold, 1 - x, x)
    angle = torch.floor(level * 30 / 10) * sign * math.pi / 180
    rot = _identity(n, x)
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = angle.cos(), -angle.sin(), angle.sin(), angle.cos()
    out = [autocontrast, posterize, _affine(x, rot), solarize]
    for i, amount in ((0, level * 0.3 / 10 * sign), (1, level * 0.3 / 10 * sign)):  # shear x, shear y
        m = _identity(n, x)
        m[:, i, 1 - i] = amount
        out.append(_affine(x, m))
    for i in (0, 1):  # translate x, translate y: a third of the side at level 10
        m = _identity(n, x)
        m[:, i, 2] = 2 * level / 30 * sign
        out.append(_affine(x, m))
    return out


def augmix_pure_mix(base: torch.Tensor, width: int, depth: int, severity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AugMix's mixture of ``width`` chains of 1..``depth`` random operations (Dirichlet(1) weights)
    of every image in ``base`` (N, C, H, W), and the Beta(1, 1) mixing weights ``(N,)``."""
    n, device, dtype = base.shape[0], base.device, base.dtype
    weights = torch.distributions.Dirichlet(torch.ones(width, device=device)).sample((n,)).to(dtype)
    mix = torch.zeros_like(base)
    for chain in range(width):
        x = base
        length = torch.randint(1, depth + 1, (n,), device=device)
        for d in range(depth):
            level = torch.empty(n, device=device, dtype=dtype).uniform_(0.1, severity)
            sign = torch.where(torch.rand(n, device=device) < 0.5, -1.0, 1.0).to(dtype)
            options = torch.stack(augment_ops(x, level, sign), dim=1)  # (N, ops, C, H, W)
            choice = torch.randint(0, options.shape[1], (n,), device=device)
            picked = options[torch.arange(n, device=device), choice]
            x = torch.where((d < length).view(-1, 1, 1, 1), picked, x)
        mix = mix + weights[:, chain].view(-1, 1, 1, 1) * x
    beta = torch.rand(n, device=device, dtype=dtype)  # Beta(1, 1) is uniform
    return mix, beta


# ---- gradient-weighted attention rollout -----------------------------------------------------------------


def tower_with_attention(
    clip: LoadedClip, images: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The image tower written out block by block: unit features, every block's input tokens (which
    require grad) and attention probabilities per head ``(N, heads, T, T)``."""
    v = clip.model.visual
    x = v.conv1(clip.normalize(images))
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype))
    x = x.detach().requires_grad_(True) if not x.requires_grad else x
    inputs, maps = [], []
    for block in v.transformer.resblocks:
        inputs.append(x)
        y = block.ln_1(x)
        out, attn = block.attn(y, y, y, need_weights=True, average_attn_weights=False)
        x = x + block.ls_1(out)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        maps.append(attn)
    pooled = v.ln_post(x)[:, 0]
    return F.normalize(pooled @ v.proj if v.proj is not None else pooled, dim=-1), inputs, maps


def attention_rollout(
    clip: LoadedClip, text: torch.Tensor, scale: float, images: torch.Tensor, quantile: float
) -> torch.Tensor:
    """``(N, 1, H, W)`` in [0, 1]: the official Grad-Rollout-last2avg map of the top-1 class, upsampled
    (no graph to ``images``)."""
    with torch.enable_grad():
        features, inputs, maps = tower_with_attention(clip, images.detach())
        logits = scale * features @ text.T
        top = logits.gather(1, logits.detach().argmax(-1, keepdim=True)).sum()
        grads = torch.autograd.grad(top, inputs[-2:])
    t = maps[-1].shape[-1]
    eye = torch.eye(t, device=images.device, dtype=images.dtype)

    def relevance(attn: torch.Tensor, tokens: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        w = F.relu((tokens.detach() * grad).sum(-1))
        w = w / (w.sum(-1, keepdim=True) + 1e-8)
        a = attn.detach().mean(dim=1) * w.unsqueeze(1) + eye
        return a / (a.sum(-1, keepdim=True) + 1e-8)

    prev, last = (relevance(maps[i], inputs[i], grads[k]) for k, i in ((0, -2), (1, -1)))
    average = (0.5 * prev + last) / 1.5
    average = average / (average.sum(-1, keepdim=True) + 1e-8)
    cam = (last @ average)[:, 0, 1:]
    side = math.isqrt(cam.shape[-1])
    cam = torch.minimum(cam, torch.quantile(cam, quantile, dim=1, keepdim=True))
    low, high = cam.min(1, keepdim=True).values, cam.max(1, keepdim=True).values
    cam = ((cam - low) / (high - low + 1e-8)).view(-1, 1, side, side)
    return F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)


def mixing_map(attention: torch.Tensor, beta: torch.Tensor, cfg: ATPTConfig) -> torch.Tensor:
    """Per-pixel weight of the base view: ``m_high`` above the ``1 - p_high`` quantile of each map,
    ``m_low`` at or below the ``p_low`` quantile, the view's AugMix ``beta`` in between."""
    flat = attention.flatten(1)
    n = flat.shape[0]
    inf = torch.full((n, 1), math.inf, device=flat.device, dtype=flat.dtype)
    top = torch.quantile(flat, 1 - cfg.p_high, dim=1, keepdim=True) if cfg.p_high > 0 else inf
    bottom = torch.quantile(flat, cfg.p_low, dim=1, keepdim=True) if cfg.p_low > 0 else -inf
    high = flat > top
    low = (flat <= bottom) & ~high
    m = torch.where(high, cfg.m_high, torch.where(low, cfg.m_low, beta.view(-1, 1).expand_as(flat)))
    return m.view_as(attention)


class ATPT(PromptTuning):
    """A-TPT (Hai, Wang and Wei, ICML 2026): attention-guided AugMix views for R-TPT."""

    id = "a-tpt"
    config_class = ATPTConfig
    config: ATPTConfig

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        return {"n_views": 4, "neighbours": 2, "selection": 0.5, "mix_width": 2, "mix_depth": 2}

    def make_views(self, images: torch.Tensor) -> torch.Tensor:
        """The image, then ``n_views - 1`` attention-guided AugMix views of random resized crops."""
        assert self.learner is not None
        cfg = self.config
        crops = random_views(images, cfg.n_views, scale=(cfg.crop_scale_min, 1.0))
        b, v = crops.shape[:2]
        if v == 1:
            return crops
        base = crops[:, 1:].flatten(0, 1)
        mix, beta = augmix_pure_mix(base, cfg.mix_width, cfg.mix_depth, cfg.severity)
        with torch.no_grad():
            text = self.learner()  # the initial prompt
        attention = attention_rollout(self.clip, text, self._base().logit_scale, base, cfg.attention_quantile)
        m = mixing_map(attention, beta, cfg)
        views = (m * base + (1 - m) * mix).view(b, v - 1, *images.shape[1:])
        return torch.cat([crops[:, :1], views], dim=1)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        n, v = len(images), self.config.n_views
        self.counter.images += n
        self.counter.forward += n * (2 * v - 1)  # the attention of every augmented view, then all views
        self.counter.backward += n * (v - 1 + self.config.steps)  # attention gradients, the tuning step
        return self.run(images).logits
