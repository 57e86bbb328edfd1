"""DBD — directional-bias-guided test-time defense (Liu et al., ICLR 2026).

Each image is encoded with transformed copies of itself (random resized crops, bit-depth reduction,
JPEG, Gaussian noise, median / mean / Gaussian filters, as in the official ``Augmenter``). The copies
with the lowest prediction entropy are kept; the mean of their unit-embedding offsets from the
original embedding is the correction direction, and the DB-score (mean cosine between each offset and
that mean) decides its weight: the final embedding is ``e + a · mean offset`` with ``a = alpha`` when
the DB-score exceeds ``threshold`` and 1 otherwise.

Adaptive attack: the pipeline differentiated end to end with EOT over the random crops and noise; the
8-bit roundings and bit-depth reduction are straight-through (BPDA with the identity), JPEG is BPDA
with the differentiable approximation, and the entropy selection and the threshold gate are held
constant at their forward values (BPDA over the gates).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vlmdefense.defenses.base import Predictor
from vlmdefense.defenses.training_free.common import TrainingFreeDefense
from vlmdefense.defenses.training_free.differentiable_jpeg import DifferentiableJPEG, pillow_jpeg
from vlmdefense.defenses.training_free.jpeg_compression import approximation_bpda


@dataclass
class DBDConfig:
    """DBD's transformations and correction (official defaults, filters scaled to 16-px images).

    Attributes:
        n_crops: random resized crops (official: 16, area 0.5–1, aspect 3/4–4/3).
        crop_scale: smallest crop area as a fraction of the image.
        flip: flip each crop horizontally with probability 1/2 (official: yes; off, a mirrored digit is
            not the same digit).
        bits: bit depth of the three bit-depth reductions (floor, round, ceil).
        jpeg_qualities: comma-separated JPEG qualities (official: 50, 60, 75).
        n_noise: Gaussian-noise copies (official: 6, σ = 0.1 on [0, 1] pixels).
        noise_sigma: their standard deviation.
        filter_size: kernel of the median, mean and Gaussian filters (official: 5 at 224 px).
        keep: copies with the lowest prediction entropy that define the direction (official: 16).
        threshold: DB-score above which the direction is amplified (official: 0.8).
        alpha: the amplification (official: 2.5).
    """

    n_crops: int = 16
    crop_scale: float = 0.5
    flip: bool = False
    bits: int = 3
    jpeg_qualities: str = "50,60,75"
    n_noise: int = 6
    noise_sigma: float = 0.1
    filter_size: int = 3
    keep: int = 16
    threshold: float = 0.8
    alpha: float = 2.5


def straight_through(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` forward, the identity backward (BPDA with the identity)."""
    return x + (value - x).detach()


def to_8bit(x: torch.Tensor, mode: str = "round") -> torch.Tensor:
    """``x`` on the 8-bit grid (``round``, or ``floor`` as numpy's uint8 cast truncates), straight-through."""
    scaled = x.detach().clamp(0, 1) * 255
    grid = torch.floor(scaled) if mode == "floor" else torch.round(scaled)
    return straight_through(x, grid / 255)


def bit_depth(x: torch.Tensor, bits: int, mode: str) -> torch.Tensor:
    """8-bit pixels reduced to ``bits`` bits by ``floor``, ``round`` or ``ceil`` (straight-through)."""
    interval = 2 ** (8 - bits)
    levels = torch.round(x.detach().clamp(0, 1) * 255) / interval
    op = {"floor": torch.floor, "round": torch.round, "ceil": torch.ceil}[mode]
    return straight_through(x, (op(levels) * interval).clamp(0, 255) / 255)


def _patches(x: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    """(N, C, H, W) → (N, C, H, W, k*k) neighbourhoods, padded by ``mode``."""
    n, c, h, w = x.shape
    r = k // 2
    padded = F.pad(x, (r, r, r, r), mode=mode)
    return F.unfold(padded, k).view(n, c, k * k, h, w).permute(0, 1, 3, 4, 2)


def gaussian_kernel(k: int) -> torch.Tensor:
    """The (k,) Gaussian weights OpenCV uses when sigma is 0: sigma = 0.3 · ((k − 1)/2 − 1) + 0.8."""
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
    t = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    return g / g.sum()


def filters(x: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Median (replicated border), mean and Gaussian (reflected border) filters of size ``k``, on the 8-bit grid."""
    median = _patches(x, k, "replicate").median(dim=-1).values
    mean = _patches(x, k, "reflect").mean(dim=-1)
    g = gaussian_kernel(k).to(x)
    weights = (g[:, None] * g[None, :]).flatten()
    gauss = (_patches(x, k, "reflect") * weights).sum(dim=-1)
    return [to_8bit(median), to_8bit(mean), to_8bit(gauss)]


def random_resized_crops(x: torch.Tensor, n: int, scale: float, flip: bool) -> torch.Tensor:
    """``n`` random resized crops of each image (area ``scale``–1, aspect 3/4–4/3, integer boxes as
    torchvision draws them), resampled bilinearly to the input size and rounded to 8 bits (straight-through);
    (n, N, C, H, W)."""
    views = []
    batch, _, h, w = x.shape
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(n):
        area = h * w * torch.empty(batch).uniform_(scale, 1.0)
        ratio = torch.exp(torch.empty(batch).uniform_(*log_ratio))
        cw = torch.sqrt(area * ratio).round().clamp(1, w)
        ch = torch.sqrt(area / ratio).round().clamp(1, h)
        left = torch.floor(torch.rand(batch) * (w - cw + 1))
        top = torch.floor(torch.rand(batch) * (h - ch + 1))
        sign = torch.where(torch.rand(batch) < 0.5, -1.0, 1.0) if flip else torch.ones(batch)
        theta = torch.zeros(batch, 2, 3)
        theta[:, 0, 0] = sign * cw / w
        theta[:, 0, 2] = (2 * left + cw) / w - 1
        theta[:, 1, 1] = ch / h
        theta[:, 1, 2] = (2 * top + ch) / h - 1
        grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
        views.append(to_8bit(F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)))
    return torch.stack(views)


class DBD(TrainingFreeDefense):
    """DBD (Liu et al., ICLR 2026): the embedding corrected along the mean shift of low-entropy transformed copies."""

    id = "dbd"
    randomized = True
    config_class = DBDConfig
    config: DBDConfig

    def __init__(self, config: DBDConfig | None = None) -> None:
        super().__init__(config)
        self.qualities = [int(q) for q in str(self.config.jpeg_qualities).split(",") if q.strip()]
        self.approximations = {q: DifferentiableJPEG(q) for q in self.qualities}
        self.last_scores: torch.Tensor | None = None

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        return {"n_crops": 4, "n_noise": 2, "keep": 6}

    @property
    def n_views(self) -> int:
        """Transformed copies per image (the original not included)."""
        cfg = self.config
        return cfg.n_crops + 3 + len(self.qualities) + cfg.n_noise + 3

    def views(self, images: torch.Tensor) -> torch.Tensor:
        """The original (index 0) and its transformed copies, (1 + n_views, N, C, H, W); the forward values
        are the official transforms', gradients pass as described in the module docstring."""
        cfg = self.config
        x = to_8bit(images)
        out = [x, *random_resized_crops(x, cfg.n_crops, cfg.crop_scale, cfg.flip).unbind(0)]
        out += [bit_depth(x, cfg.bits, mode) for mode in ("floor", "round", "ceil")]
        for q in self.qualities:
            out.append(approximation_bpda(functools.partial(pillow_jpeg, quality=q), self.approximations[q])(x))
        for _ in range(cfg.n_noise):
            out.append(to_8bit((x + cfg.noise_sigma * torch.randn_like(x)).clamp(0, 1), mode="floor"))
        out += filters(x, cfg.filter_size)
        return torch.stack(out)

    def correct(self, embeddings: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DBD's correction from unit embeddings (V, N, D) and logits (V, N, K) of the original (index 0)
        and its copies: returns the corrected embeddings (N, D) and the DB-scores (N,). The entropy
        selection and the threshold gate carry no gradient."""
        cfg = self.config
        with torch.no_grad():
            p = logits[1:].softmax(-1)
            entropy = -(p * logits[1:].log_softmax(-1)).sum(-1)  # (V-1, N)
            keep = min(cfg.keep, entropy.shape[0])
            index = entropy.topk(keep, dim=0, largest=False).indices + 1  # (keep, N)
        picked = embeddings.gather(0, index.unsqueeze(-1).expand(-1, -1, embeddings.shape[-1]))
        offsets = picked - embeddings[0].unsqueeze(0)
        direction = offsets.mean(dim=0)
        score = F.cosine_similarity(offsets, direction.unsqueeze(0), dim=-1, eps=1e-8).mean(dim=0)
        with torch.no_grad():
            factor = torch.where(score > cfg.threshold, cfg.alpha, 1.0).unsqueeze(-1)
        return embeddings[0] + factor * direction, score.detach()

    def pipeline(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of the corrected embeddings (differentiable as described; records ``last_scores``)."""
        base = self._base()
        views = self.views(images)
        v, n = views.shape[:2]
        embeddings = base.embed(views.flatten(0, 1)).view(v, n, -1)
        corrected, self.last_scores = self.correct(embeddings, base.logits_from_embeddings(embeddings))
        return base.logits_from_embeddings(F.normalize(corrected, dim=-1))

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        self.counter.images += len(images)
        self.counter.forward += len(images) * (1 + self.n_views)
        with torch.no_grad():
            return self.pipeline(images)

    def attack_surface(self) -> Predictor:
        """The whole pipeline with fresh random copies per call (EOT), BPDA as described."""
        return self.pipeline


def db_scores(defense: DBD, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """DB-scores (N,) of ``images`` under one draw of the copies."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            defense.pipeline(images[i : i + batch_size])
            assert defense.last_scores is not None
            out.append(defense.last_scores.cpu())
    return torch.cat(out)
