"""R-TPT — reliable test-time prompt tuning against adversarial inputs (Sheng et al., CVPR 2025).

The text context (initialised from a template's words) takes ``steps`` AdamW steps on the mean
*pointwise* entropy of the most confident views (TPT's marginal entropy minus its KL part); the
prediction is the ensemble of all views' tuned logits weighted by reliability: a softmax (temperature
0.01) over each view's mean cosine similarity to its nearest views. Both encoders are frozen and the
image features do not depend on the prompt, so they are computed once per view.

Adaptive attack surface: BPDA through the prompt update (:mod:`~vlmdefense.defenses.test_time_adaptation.views`);
the attacker's gradient flows through the augmented views, the image tower and the reliability weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from vlmdefense.defenses.base import Predictor
from vlmdefense.defenses.prompt_learner import ContextInit, PromptLearner
from vlmdefense.defenses.test_time_adaptation.views import (
    TestTimeDefense,
    accuracy,
    entropy,
    gather_views,
    most_confident,
    random_views,
)
from vlmdefense.workbench.models import set_seed

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData
    from vlmdefense.workbench.evaluation import ZeroShotClassifier


@dataclass
class RTPTConfig:
    """R-TPT's hyperparameters (official defaults in brackets; the profile's parameters override).

    Attributes:
        n_views: inputs per image, the image itself plus ``n_views - 1`` augmented views [64].
        selection: fraction of lowest-entropy views the prompt is tuned on [0.1].
        steps: AdamW steps per image [1].
        lr: AdamW learning rate [5e-3].
        weight_decay: AdamW weight decay [torch's default 0.01].
        template: its words before the class name are the tuned context [``a photo of a`` with
            CLIP's ImageNet class names: 4 tokens].
        temperature: softmax temperature of the reliability weights [0.01].
        neighbours: nearest views whose mean similarity is a view's reliability [20 of 64].
        crop_scale_min: smallest area fraction of a random crop [RandomResizedCrop: 0.08, plus flips].
        ensemble: ``reliability`` (R-TPT), ``mean`` (plain average of the views' tuned logits) or
            ``none`` (the tuned prompt on the image alone) — the ablations of the paper.
    """

    n_views: int = 8
    selection: float = 0.25
    steps: int = 1
    lr: float = 5e-3
    weight_decay: float = 0.01
    template: str = "a photo of the digit {name}."
    temperature: float = 0.01
    neighbours: int = 3
    crop_scale_min: float = 0.5
    ensemble: str = "reliability"


@dataclass
class RTPTOutput:
    """One R-TPT pass over a batch."""

    logits: torch.Tensor
    view_logits: torch.Tensor
    weights: torch.Tensor
    selected: torch.Tensor
    ctx: torch.Tensor
    loss_before: torch.Tensor
    loss_after: torch.Tensor | None = None


class RTPT(TestTimeDefense):
    """R-TPT (Sheng et al., CVPR 2025): pointwise-entropy test-time prompt tuning with a
    reliability-weighted ensemble of augmented views."""

    id = "r-tpt"
    config_class = RTPTConfig
    config: RTPTConfig

    def __init__(self, config: RTPTConfig | None = None) -> None:
        super().__init__(config)
        self.learner: PromptLearner | None = None

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        return {"n_views": 4, "neighbours": 2, "selection": 0.5}

    def bind(self, classifier: ZeroShotClassifier) -> None:
        """Use ``classifier``'s frozen CLIP without the rest of ``fit``."""
        self.base = classifier
        self.learner = PromptLearner(classifier.clip, classifier.prompts, ContextInit(template=self.config.template))
        self.learner.to(classifier.clip.device)

    def fit(self, data: FitData) -> dict[str, Any]:
        """Nothing is trained: bind the base model and build the prompt learner."""
        self.bind(data.base)
        assert self.learner is not None
        return {"initial_prompts": self.learner.template_text()[:2], "hyperparameters": self.hyperparameters()}

    # ---- the mechanism ---------------------------------------------------------------------------

    def view_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings of fresh random views ``(B, V, D)`` (graph to ``images`` kept)."""
        cfg = self.config
        views = random_views(images, cfg.n_views, scale=(cfg.crop_scale_min, 1.0))
        b, v = views.shape[:2]
        return self._base().embed(views.flatten(0, 1)).view(b, v, -1)

    def view_logits(self, features: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """``(B, V, C)`` logits of every view with each image's own context ``ctx`` ``(B, M, d)``."""
        assert self.learner is not None
        weights = self.learner(ctx, per_image=True)  # (B, C, D)
        return self._base().logit_scale * torch.einsum("bvd,bcd->bvc", features, weights)

    def tune(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tuned contexts ``(B, M, d)`` from detached view features, with the selected views and
        the loss (per image) before the update."""
        assert self.learner is not None
        cfg = self.config
        features = features.detach()
        start = self.learner.ctx_init.unsqueeze(0).repeat(features.shape[0], 1, 1)
        context = torch.nn.Parameter(start)
        optimizer = torch.optim.AdamW([context], lr=cfg.lr, weight_decay=cfg.weight_decay)
        selected = None
        loss_before = None
        with torch.enable_grad():
            for _ in range(cfg.steps):
                logits = self.view_logits(features, context)
                if selected is None:
                    selected = most_confident(logits.detach(), cfg.selection)
                per_image = entropy(gather_views(logits, selected)).mean(dim=1)  # pointwise entropy
                if loss_before is None:
                    loss_before = per_image.detach()
                optimizer.zero_grad(set_to_none=True)
                per_image.sum().backward()  # summed: each context gets its own image's gradient
                optimizer.step()
        if selected is None:  # steps == 0
            with torch.no_grad():
                logits = self.view_logits(features, context)
            selected = most_confident(logits, cfg.selection)
            loss_before = entropy(gather_views(logits, selected)).mean(dim=1)
        assert loss_before is not None
        return context.detach(), selected, loss_before

    def reliability(self, features: torch.Tensor) -> torch.Tensor:
        """Weights ``(B, V)``: softmax over views of the mean cosine similarity of each view to its
        ``neighbours`` most similar other views, divided by the temperature (differentiable)."""
        cfg = self.config
        v = features.shape[1]
        if v == 1:
            return torch.ones(features.shape[:2], device=features.device, dtype=features.dtype)
        similarity = features @ features.transpose(1, 2)
        eye = torch.eye(v, dtype=torch.bool, device=features.device)
        similarity = similarity.masked_fill(eye, float("-inf"))  # a view is not its own neighbour
        k = min(cfg.neighbours, v - 1)
        score = similarity.topk(k, dim=-1).values.mean(dim=-1)
        return torch.softmax(score / cfg.temperature, dim=-1)

    def combine(self, features: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ensemble of the views' logits and its weights."""
        mode = self.config.ensemble
        if mode == "reliability":
            weights = self.reliability(features)
        elif mode == "mean":
            weights = torch.full(features.shape[:2], 1.0 / features.shape[1], device=features.device)
        elif mode == "none":
            weights = torch.zeros(features.shape[:2], device=features.device)
            weights[:, 0] = 1.0
        else:
            raise ValueError(f"ensemble must be reliability, mean or none, not {mode!r}")
        return (weights.unsqueeze(-1) * logits).sum(dim=1), weights

    def run(self, images: torch.Tensor, with_graph: bool = False) -> RTPTOutput:
        """The whole pipeline; ``with_graph`` keeps the graph from the output to ``images`` except
        through the tuned context (BPDA: the context is a constant)."""
        with torch.set_grad_enabled(with_graph):
            features = self.view_features(images)
        ctx, selected, loss_before = self.tune(features)
        with torch.set_grad_enabled(with_graph):
            with torch.no_grad():
                weights_text = self.learner(ctx, per_image=True) if self.learner is not None else None
            assert weights_text is not None
            logits = self._base().logit_scale * torch.einsum("bvd,bcd->bvc", features, weights_text)
            out, weights = self.combine(features, logits)
        return RTPTOutput(out, logits, weights, selected, ctx, loss_before)

    # ---- the harness' interface ------------------------------------------------------------------

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        n = len(images)
        self.counter.images += n
        self.counter.forward += n * self.config.n_views  # image tower, once per view
        self.counter.backward += n * self.config.steps  # through the text tower only
        return self.run(images).logits

    def attack_surface(self) -> Predictor:
        """The pipeline with fresh views at every call; the tuned context is a constant (BPDA)."""

        def surface(images: torch.Tensor) -> torch.Tensor:
            return self.run(images, with_graph=True).logits

        return surface


def rtpt_ablation(data: FitData, defense: RTPT, adversarial: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Accuracy on the test split (clean and the given non-adaptive adversarial images) of the parts
    of R-TPT: the initial prompt on the image alone, the tuned prompt alone (``none``), the plain mean
    over the views (``mean``), R-TPT's reliability weights, and R-TPT without the tuning step; with
    statistics of the reliability weights."""
    x, y = data.sets.test.images, data.sets.test.labels
    assert defense.learner is not None
    base = defense._base()
    with torch.no_grad():
        initial = defense.learner()
    sets = {"clean": x, **adversarial}
    rows: dict[str, dict[str, float]] = {}
    original = defense.config
    seed = data.seed
    try:
        with torch.no_grad():
            rows["initial prompt, image only"] = {
                k: accuracy(base.logit_scale * base.embed(v) @ initial.T, y) for k, v in sets.items()
            }
        variants: dict[str, dict[str, Any]] = {
            "tuned prompt, image only": {"ensemble": "none"},
            "tuned prompt, mean of views": {"ensemble": "mean"},
            "R-TPT (tuned, reliability-weighted)": {"ensemble": "reliability"},
            "no tuning, reliability-weighted": {"ensemble": "reliability", "steps": 0},
        }
        weights = None
        for name, change in variants.items():
            defense.config = dataclasses.replace(original, **change)
            row = {}
            for key, images in sets.items():
                set_seed(seed)
                out = defense.run(images)
                row[key] = accuracy(out.logits, y)
                if name.startswith("R-TPT") and key == "clean":
                    weights = out.weights
            rows[name] = row
    finally:
        defense.config = original
    assert weights is not None
    return {
        "accuracy": rows,
        "reliability_weights_clean": {
            "max_weight_mean": round(float(weights.max(dim=1).values.mean()), 4),
            "identity_view_weight_mean": round(float(weights[:, 0].mean()), 4),
            "effective_views_mean": round(float((1.0 / (weights**2).sum(dim=1)).mean()), 3),
            "uniform_weight": round(1.0 / weights.shape[1], 4),
        },
    }
