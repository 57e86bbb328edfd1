"""AOM — anchor-guided one-step move in CLIP's embedding space (Tong, Lai, Pan and Yin, CVPR 2025).

The input's unit image embedding takes one step towards an anchor: the normalised mean of the unit
embeddings of Gaussian-noised copies of the same image. The paper text, and any code, could not be read
here; the rule is reconstructed from secondary descriptions (noise-averaged anchor, features
interpolated towards it), and the noise level, the number of copies and the step are our assumptions.
Every step is differentiable, so the adaptive attack runs end to end, averaged over noise draws (EOT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlmdefense.defenses.training_free.feature_steering import (
    EmbeddingSteering,
    geodesic_angle,
    mean_direction,
    unit,
)


@dataclass
class AOMConfig:
    """AOM's hyperparameters (not verified against the paper: see the catalog's deviations).

    Attributes:
        n_noise: Gaussian-noised copies per image that build the anchor.
        sigma: standard deviation of the noise on [0, 1] pixels.
        step: fraction of the way from the input's embedding to the anchor (``u + step · (a − u)``,
            renormalised); 1 replaces the embedding by the anchor, 0 is the undefended model.
        clip_noisy: clip the noisy copies to [0, 1].
    """

    n_noise: int = 8
    sigma: float = 0.1
    step: float = 0.5
    clip_noisy: bool = True


class AOM(EmbeddingSteering):
    """Anchor-guided one-step move (Tong et al., CVPR 2025) of the zero-shot classifier's image embedding."""

    id = "aom"
    randomized = True  # fresh Gaussian noise at every prediction
    config_class = AOMConfig
    config: AOMConfig

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        return {"n_noise": 2}

    @property
    def n_views(self) -> int:
        return self.config.n_noise

    def views(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        noise = cfg.sigma * torch.randn(cfg.n_noise, *images.shape, device=images.device, dtype=images.dtype)
        noisy = images.unsqueeze(0) + noise
        return noisy.clamp(0, 1) if cfg.clip_noisy else noisy

    def steer(self, embedding: torch.Tensor, view_embeddings: torch.Tensor) -> torch.Tensor:
        anchor = mean_direction(view_embeddings)
        return unit(embedding + self.config.step * (anchor - embedding))

    def anchor_angle(self, images: torch.Tensor) -> torch.Tensor:
        """(N,) angle (radians) between each input's embedding and its anchor, one noise draw (no graph)."""
        with torch.no_grad():
            embedding, views = self.readings(images)
            return geodesic_angle(embedding, mean_direction(views))
