"""CLIPure-Cos — purification in CLIP's latent space (Zhang et al., ICLR 2025).

The unit image embedding is moved on the sphere by normalised gradient steps that increase its cosine
similarity to the embedding of the class-free templates ("a photo of the digit ."), then classified
against the class embeddings. Adaptive attack: BPDA in latent space (the embedding update is a constant
offset).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from vlmdefense.defenses.base import Predictor
from vlmdefense.defenses.training_free.common import TrainingFreeDefense

if TYPE_CHECKING:
    from vlmdefense.workbench.evaluation import ZeroShotClassifier


@dataclass
class CLIPureConfig:
    """CLIPure-Cos' hyperparameters (official code: 10 steps of size 30, class-free ensemble templates).

    Attributes:
        steps: purification steps on the sphere.
        step_size: length of each normalised step (before re-projection onto the sphere).
        norm_scope: ``sample`` normalises each image's gradient by its own L2 norm; ``batch`` by the
            norm of the whole batch's gradient tensor, as the official code does (then the step each
            image receives depends on the batch it is classified in).
        blank: ``ensemble`` — the mean of the unit embeddings of every prompt template with an empty
            class name (the official code's choice); any other string is used as the single blank prompt.
    """

    steps: int = 10
    step_size: float = 30.0
    norm_scope: str = "sample"
    blank: str = "ensemble"


class CLIPure(TrainingFreeDefense):
    """CLIPure-Cos (Zhang et al., ICLR 2025): purification of the image embedding in CLIP's latent space."""

    id = "clipure"
    config_class = CLIPureConfig
    config: CLIPureConfig

    def __init__(self, config: CLIPureConfig | None = None) -> None:
        super().__init__(config)
        self.blank_embedding: torch.Tensor | None = None
        self.blank_prompts: list[str] = []

    def bind(self, classifier: ZeroShotClassifier) -> None:
        super().bind(classifier)
        prompts = classifier.prompts
        if self.config.blank == "ensemble":
            self.blank_prompts = [t.format(name="", digit="") for t in prompts.templates]
        else:
            self.blank_prompts = [self.config.blank]
        with torch.no_grad():
            embeddings = classifier.clip.encode_texts(self.blank_prompts)
        self.blank_embedding = embeddings.mean(dim=0).detach()  # cosine ignores the norm of the mean

    def purify(
        self, embeddings: torch.Tensor, steps: int | None = None, step_size: float | None = None
    ) -> torch.Tensor:
        """Move ``embeddings`` (N, D) towards the blank-template embedding on their sphere (no graph).

        Each step: ``u ← normalise(u + s · d)`` where ``d`` is the normalised gradient of the cosine
        similarity to the blank embedding, taken w.r.t. the embedding and scaled by its norm (as the
        official code does), and the norm ``r`` of the embedding is kept."""
        cfg = self.config
        steps = cfg.steps if steps is None else steps
        step_size = cfg.step_size if step_size is None else step_size
        if self.blank_embedding is None:
            raise RuntimeError("CLIPure: call fit before purifying")
        e = embeddings.detach()
        t = F.normalize(self.blank_embedding.to(e.dtype), dim=-1)
        for _ in range(steps):
            r = e.norm(dim=-1, keepdim=True)
            u = e / r
            cos = (u * t).sum(dim=-1, keepdim=True)
            # gradient of cos(e, t) w.r.t. e is (t - cos u) / r; scaled by r it is the tangent t - cos u
            ascent = t - cos * u
            if cfg.norm_scope == "batch":
                norm = ascent.norm().clamp_min(1e-12)
            else:
                norm = ascent.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            u = F.normalize(u + step_size * ascent / norm, dim=-1)
            e = r * u
        return e

    def purify_with_official_graph(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The purification as the official evaluation differentiates it: each step's direction is a
        constant (the official code takes it from ``autograd.grad`` without a graph), while the norm,
        the step and the re-projection onto the sphere stay in the graph. For diagnostics only."""
        cfg = self.config
        if self.blank_embedding is None:
            raise RuntimeError("CLIPure: call fit before purifying")
        e = embeddings
        t = F.normalize(self.blank_embedding.to(e.dtype), dim=-1)
        for _ in range(cfg.steps):
            r = e.norm(dim=-1, keepdim=True)
            u = e / r
            with torch.no_grad():
                ascent = t - (u * t).sum(dim=-1, keepdim=True) * u
                if cfg.norm_scope == "batch":
                    direction = ascent / ascent.norm().clamp_min(1e-12)
                else:
                    direction = ascent / ascent.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            u = F.normalize(u + cfg.step_size * direction, dim=-1)
            e = r * u
        return e

    def official_graph_surface(self) -> Predictor:
        """``images -> logits`` differentiated through :meth:`purify_with_official_graph` (diagnostic)."""

        def surface(images: torch.Tensor) -> torch.Tensor:
            base = self._base()
            return base.logits_from_embeddings(self.purify_with_official_graph(base.embed(images)))

        return surface

    def blank_similarity(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of embeddings to the blank-template embedding."""
        if self.blank_embedding is None:
            raise RuntimeError("CLIPure: call fit first")
        return F.cosine_similarity(embeddings, self.blank_embedding.to(embeddings.dtype).unsqueeze(0), dim=-1)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        base = self._base()
        self.counter.images += len(images)
        self.counter.forward += len(images)  # purification needs no extra pass of the image tower
        with torch.no_grad():
            return base.logits_from_embeddings(self.purify(base.embed(images)))

    def attack_surface(self) -> Predictor:
        """BPDA in latent space: the purification's displacement of the embedding is a constant offset."""

        def surface(images: torch.Tensor) -> torch.Tensor:
            base = self._base()
            embedding = base.embed(images)
            offset = (self.purify(embedding.detach()) - embedding.detach()).detach()
            return base.logits_from_embeddings(embedding + offset)

        return surface


def rotation_per_step(step_size: float) -> float:
    """Degrees a normalised tangent step of ``step_size`` turns a unit vector (CLIPure's update)."""
    return math.degrees(math.atan(step_size))
