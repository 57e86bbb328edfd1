"""COLA — cross-modality alignment by subspace projection and optimal transport (Zhu et al., NeurIPS 2025).

Every image embedding (of the image and of random resized crops of it) is projected onto the subspace
spanned by the class text embeddings and renormalised. Each class is a uniform distribution over its
prompt embeddings (one per template); the image is a uniform distribution over its projected views.
An entropic optimal-transport plan (Sinkhorn, log domain) between the two gives each class a transport
cost ⟨P, C⟩ with C = 1 − cosine; the logits are ``logit_scale · (1 − cost)``, so the class with the
lowest cost wins.

No official code was released; the view count, crop scale, Sinkhorn regularisation and iterations are
our choices (see the catalog's deviations). Adaptive attack: the whole pipeline differentiated end to
end (projection and unrolled Sinkhorn iterations), EOT over the random crops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vlmdefense.defenses.base import Predictor
from vlmdefense.defenses.training_free.common import TrainingFreeDefense
from vlmdefense.defenses.training_free.dbd import random_resized_crops, to_8bit

if TYPE_CHECKING:
    from vlmdefense.workbench.evaluation import ZeroShotClassifier


@dataclass
class COLAConfig:
    """COLA's settings (assumptions where the paper's text was not reachable).

    Attributes:
        n_views: image views per prediction: the image itself plus ``n_views - 1`` random resized crops.
        crop_scale: smallest crop area as a fraction of the image (aspect 3/4–4/3).
        rank: dimensions of the text subspace kept (largest singular values); 0 keeps the whole span.
        project: project the image views onto the text subspace (off: OT on the raw embeddings).
        ot_eps: entropic regularisation of the transport problem (on costs 1 − cosine).
        ot_iters: Sinkhorn iterations (unrolled, differentiable).
    """

    n_views: int = 8
    crop_scale: float = 0.5
    rank: int = 0
    project: bool = True
    ot_eps: float = 0.1
    ot_iters: int = 50


def text_subspace(class_embeddings: torch.Tensor, rank: int = 0) -> torch.Tensor:
    """An orthonormal basis (D, r) of the span of the class embeddings (K, D), the ``rank`` leading
    right singular directions (all K when ``rank`` is 0)."""
    _, s, vh = torch.linalg.svd(class_embeddings.double(), full_matrices=False)
    keep = int((s > s[0] * 1e-6).sum()) if rank <= 0 else min(rank, len(s))
    return vh[:keep].T.to(class_embeddings.dtype)


def sinkhorn_cost(cost: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """⟨P, C⟩ of the entropic OT plan P between uniform marginals for a batch of cost matrices
    (..., M, T); log-domain Sinkhorn, differentiable through every iteration."""
    m, t = cost.shape[-2:]
    log_a = torch.full(cost.shape[:-1], -torch.log(torch.tensor(float(m))).item(), dtype=cost.dtype, device=cost.device)
    log_b = torch.full(
        (*cost.shape[:-2], t), -torch.log(torch.tensor(float(t))).item(), dtype=cost.dtype, device=cost.device
    )
    kernel = -cost / eps
    f = torch.zeros_like(log_a)
    g = torch.zeros_like(log_b)
    for _ in range(iters):
        f = log_a - torch.logsumexp(kernel + g.unsqueeze(-2), dim=-1)
        g = log_b - torch.logsumexp(kernel + f.unsqueeze(-1), dim=-2)
    plan = torch.exp(kernel + f.unsqueeze(-1) + g.unsqueeze(-2))
    return (plan * cost).sum(dim=(-2, -1))


class COLA(TrainingFreeDefense):
    """COLA (Zhu et al., NeurIPS 2025): text-subspace projection and optimal-transport classification."""

    id = "cola"
    randomized = True
    config_class = COLAConfig
    config: COLAConfig

    def __init__(self, config: COLAConfig | None = None) -> None:
        super().__init__(config)
        self.basis: torch.Tensor | None = None
        self.prompt_embeddings: torch.Tensor | None = None

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        return {"n_views": 4, "ot_iters": 20}

    def bind(self, classifier: ZeroShotClassifier) -> None:
        super().bind(classifier)
        prompts = classifier.prompts
        with torch.no_grad():
            per_class = [classifier.clip.encode_texts(prompts.prompts(i)) for i in range(len(prompts.classnames))]
        self.prompt_embeddings = F.normalize(torch.stack(per_class), dim=-1)  # (K, T, D)
        self.basis = text_subspace(classifier.text_weights, self.config.rank)

    def project(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Unit embeddings (..., D) projected onto the text subspace and renormalised."""
        if self.basis is None:
            raise RuntimeError("COLA: call fit before predicting")
        u = self.basis.to(embeddings)
        return F.normalize(embeddings @ u @ u.T, dim=-1)

    def views(self, images: torch.Tensor) -> torch.Tensor:
        """The image and ``n_views - 1`` random resized crops, (V, N, C, H, W), differentiable."""
        cfg = self.config
        x = to_8bit(images)
        if cfg.n_views <= 1:
            return x.unsqueeze(0)
        crops = random_resized_crops(x, cfg.n_views - 1, cfg.crop_scale, flip=False)
        return torch.cat([x.unsqueeze(0), crops])

    def transport_logits(self, view_embeddings: torch.Tensor) -> torch.Tensor:
        """Logits ``logit_scale · (1 − OT cost)`` from unit view embeddings (V, N, D)."""
        if self.prompt_embeddings is None:
            raise RuntimeError("COLA: call fit before predicting")
        cfg = self.config
        feats = self.project(view_embeddings) if cfg.project else view_embeddings
        texts = self.prompt_embeddings.to(feats)  # (K, T, D)
        cosine = torch.einsum("vnd,ktd->nkvt", feats, texts)
        cost = sinkhorn_cost(1.0 - cosine, cfg.ot_eps, cfg.ot_iters)  # (N, K)
        return self._base().logit_scale * (1.0 - cost)

    def pipeline(self, images: torch.Tensor) -> torch.Tensor:
        """Views → embeddings → projected OT logits (differentiable; fresh crops per call)."""
        views = self.views(images)
        v, n = views.shape[:2]
        embeddings = self._base().embed(views.flatten(0, 1)).view(v, n, -1)
        return self.transport_logits(embeddings)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        self.counter.images += len(images)
        self.counter.forward += len(images) * self.config.n_views
        with torch.no_grad():
            return self.pipeline(images)

    def attack_surface(self) -> Predictor:
        """The whole pipeline, end to end (EOT over the crops comes from the attack)."""
        return self.pipeline
