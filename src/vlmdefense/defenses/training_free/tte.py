"""TTE — test-time transformation ensembling (Pérez et al., ICCV-W 2021).

The logits averaged over fixed transformed views of the input. Flips do not preserve a digit's label,
so the views are the identity, zero-padded shifted crops and slightly zoomed copies (crop and resize
back). TTE is differentiable and attacked end to end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vlmdefense.defenses.base import Predictor
from vlmdefense.defenses.training_free.common import TrainingFreeDefense


@dataclass
class TTEConfig:
    """TTE's views (the paper's best CIFAR setting: identity + flip + 4 crops + 4 flipped crops).

    Attributes:
        n_crops: shifted crops of the zero-padded image (offsets drawn once, distinct, never the identity).
        pad: zero padding in pixels before cropping back to the input size (paper: 4 px of 32).
        zoom: add the zoomed view and zoomed crops (the label-preserving replacement of the flips).
        zoom_margin: the zoom crops this many pixels from every side, then resizes back (bilinear).
        flip: add the paper's horizontal flips (off: a mirrored digit is not the same digit).
        average: ``logits`` (the official wrapper) or ``probs``.
        seed: seed of the crop offsets.
    """

    n_crops: int = 4
    pad: int = 1
    zoom: bool = True
    zoom_margin: int = 1
    flip: bool = False
    average: str = "logits"
    seed: int = 0


class TTE(TrainingFreeDefense):
    """Test-time transformation ensembling (Pérez et al., ICCV-W 2021) of the zero-shot classifier."""

    id = "tte"
    config_class = TTEConfig
    config: TTEConfig

    def __init__(self, config: TTEConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        side = 2 * cfg.pad + 1
        candidates = [(dy, dx) for dy in range(side) for dx in range(side) if (dy, dx) != (cfg.pad, cfg.pad)]
        if cfg.n_crops > len(candidates):
            raise ValueError(f"TTE: {cfg.n_crops} distinct crops need pad > {cfg.pad}")
        generator = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(len(candidates), generator=generator)[: cfg.n_crops]
        self.offsets: list[tuple[int, int]] = [candidates[int(i)] for i in order]
        self.view_names = self._view_names()

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        return {"n_crops": 2}

    def _view_names(self) -> list[str]:
        cfg = self.config
        names = ["identity"]
        if cfg.flip:
            names.append("flip")
        if cfg.zoom:
            names.append("zoom")
        names += [f"crop{o}" for o in self.offsets]
        if cfg.flip:
            names += [f"flip+crop{o}" for o in self.offsets]
        if cfg.zoom:
            names += [f"zoom+crop{o}" for o in self.offsets]
        return names

    def _crop(self, x: torch.Tensor, offset: tuple[int, int]) -> torch.Tensor:
        p = self.config.pad
        h, w = x.shape[-2:]
        padded = F.pad(x, (p, p, p, p))
        return padded[..., offset[0] : offset[0] + h, offset[1] : offset[1] + w]

    def _zoom(self, x: torch.Tensor) -> torch.Tensor:
        m = self.config.zoom_margin
        h, w = x.shape[-2:]
        inner = x[..., m : h - m, m : w - m]
        return F.interpolate(inner, size=(h, w), mode="bilinear", align_corners=False)

    def views(self, images: torch.Tensor) -> torch.Tensor:
        """All views, stacked (V, N, C, H, W), in the order of ``view_names``; every op is differentiable."""
        cfg = self.config
        out = [images]
        if cfg.flip:
            out.append(images.flip(-1))
        if cfg.zoom:
            out.append(self._zoom(images))
        out += [self._crop(images, o) for o in self.offsets]
        if cfg.flip:
            out += [self._crop(images.flip(-1), o) for o in self.offsets]
        if cfg.zoom:
            out += [self._crop(self._zoom(images), o) for o in self.offsets]
        return torch.stack(out)

    @property
    def n_views(self) -> int:
        """Views per image (forward passes per image)."""
        return len(self.view_names)

    def ensemble(self, images: torch.Tensor) -> torch.Tensor:
        """Averaged logits (or log of averaged probabilities) over the views; differentiable."""
        views = self.views(images)
        v, n = views.shape[:2]
        logits = self._base()(views.flatten(0, 1)).view(v, n, -1)
        if self.config.average == "probs":
            return torch.log(torch.softmax(logits, dim=-1).mean(dim=0).clamp_min(1e-12))
        return logits.mean(dim=0)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        self.counter.images += len(images)
        self.counter.forward += len(images) * self.n_views
        return self.ensemble(images)

    def attack_surface(self) -> Predictor:
        """The whole ensemble (differentiable end to end)."""
        return self.ensemble


def view_accuracy(defense: TTE, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Clean accuracy (%) of the base classifier on each TTE view separately."""
    with torch.no_grad():
        views = defense.views(images)
        return {
            name: round(100.0 * float((defense._base()(v).argmax(-1) == labels).float().mean()), 2)
            for name, v in zip(defense.view_names, views, strict=True)
        }
