"""AGC — adaptive geodesic correction (Li, Xue et al., arXiv 2026).

The unit image embedding is rotated on the sphere towards an anchor, the normalised mean of the
embeddings of random perspective warps of the same image, by ``beta`` times the angle between them. The
factor ``beta`` interpolates between ``beta_clean`` and ``beta_adv`` with a correction score: how far the
views fall from the input (attack score) times how much the views agree with each other (trust score),
as the official ``build_tangent_filtered_feature`` does. Every step is differentiable, so the adaptive
attack runs end to end, averaged over draws of the warps (EOT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlmdefense.defenses.training_free.feature_steering import (
    EmbeddingSteering,
    geodesic_angle,
    geodesic_step,
    mean_direction,
    mean_pairwise_cosine,
    random_perspective,
    unit,
)


@dataclass
class AGCConfig:
    """AGC's hyperparameters (official defaults of ``test.py`` and ``Adaptive_geo_cor``, except the
    distortion, halved for the small CLIP).

    Attributes:
        n_views: random perspective views per image (official ``--n_views 32``).
        distortion: ``RandomPerspective`` distortion scale, applied with probability 1. Official 0.5 moves
            each corner of a 16-px digit by up to 4 px, which the small CLIP (trained with ±1-px shifts)
            does not recognise (about 38 % clean accuracy); 0.25 (up to 2 px) keeps it near 94 %.
        beta_clean: step factor for an input that looks clean (official 0.45).
        beta_adv: step factor for an input that looks attacked (official 2.25).
        gamma_attack: exponent of the attack score (official 0.9).
        gamma_trust: exponent of the trust score (official 1.0).
    """

    n_views: int = 32
    distortion: float = 0.25
    beta_clean: float = 0.45
    beta_adv: float = 2.25
    gamma_attack: float = 0.9
    gamma_trust: float = 1.0


@dataclass
class AGCStatistics:
    """Per-image quantities of one AGC pass (all (N,) tensors, no graph)."""

    attack_score: torch.Tensor
    trust_score: torch.Tensor
    beta: torch.Tensor
    angle: torch.Tensor  # between the input's embedding and the anchor, radians


class AGC(EmbeddingSteering):
    """Adaptive geodesic correction (Li, Xue et al., 2026) of the zero-shot classifier's image embedding."""

    id = "agc"
    randomized = True  # fresh perspective warps at every prediction
    config_class = AGCConfig
    config: AGCConfig

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        return {"n_views": 2}

    @property
    def n_views(self) -> int:
        return self.config.n_views

    def views(self, images: torch.Tensor) -> torch.Tensor:
        return random_perspective(images, self.config.n_views, self.config.distortion)

    def scores(self, embedding: torch.Tensor, view_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(attack score, trust score), each (N,): the mean cosine distance of the views to the input,
        and the mean pairwise cosine of the views mapped from [-1, 1] to [0, 1], both clamped to [0, 1]."""
        views = unit(view_embeddings)
        attack = (1 - (views * embedding.unsqueeze(0)).sum(dim=-1)).mean(dim=0).clamp(0, 1)
        if views.shape[0] < 2:
            return attack, torch.ones_like(attack)
        trust = ((mean_pairwise_cosine(views) + 1) / 2).clamp(0, 1)
        return attack, trust

    def beta(self, embedding: torch.Tensor, view_embeddings: torch.Tensor) -> torch.Tensor:
        """(N,) step factors ``beta_clean + (beta_adv - beta_clean) * clamp(attack^γa · trust^γt, 0, 1)``."""
        cfg = self.config
        attack, trust = self.scores(embedding, view_embeddings)
        # attack^γ with γ < 1 has an infinite derivative at 0: keep the base off zero for the gradient
        score = (attack.clamp_min(1e-12).pow(cfg.gamma_attack) * trust.pow(cfg.gamma_trust)).clamp(0, 1)
        return cfg.beta_clean + (cfg.beta_adv - cfg.beta_clean) * score

    def steer(self, embedding: torch.Tensor, view_embeddings: torch.Tensor) -> torch.Tensor:
        beta = self.beta(embedding, view_embeddings)
        return geodesic_step(embedding, mean_direction(view_embeddings), beta.unsqueeze(-1))

    def statistics(self, images: torch.Tensor) -> AGCStatistics:
        """Attack score, trust score, step factor and anchor angle of one draw of views (no graph)."""
        with torch.no_grad():
            embedding, views = self.readings(images)
            attack, trust = self.scores(embedding, views)
            return AGCStatistics(
                attack, trust, self.beta(embedding, views), geodesic_angle(embedding, mean_direction(views))
            )
