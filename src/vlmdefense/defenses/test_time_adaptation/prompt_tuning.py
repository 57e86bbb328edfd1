"""What TPT, A-TPT and SS-TPT share: R-TPT's per-image text-context tuning with the objective, the
views and the ensemble as hooks, and an *unrolled* variant of the single AdamW step.

:class:`PromptTuning` extends :class:`~vlmdefense.defenses.test_time_adaptation.r_tpt.RTPT` (its
prompt learner, view features, tuned logits and reliability weights): a subclass chooses

* :meth:`~PromptTuning.make_views` — the augmented views (default: the image and random resized crops);
* :meth:`~PromptTuning.view_scores` — per-view scores computed before tuning (SS-TPT's stability and
  suitability), handed to the objective and the ensemble;
* :meth:`~PromptTuning.objective` — the per-image loss on the selected views' logits;
* :meth:`~PromptTuning.ensemble` — how the views' tuned logits become one prediction.

Adaptive attack surfaces. ``run(images, with_graph=True)`` is BPDA through the prompt update (the
tuned context is recomputed for the current input, then a constant). ``run(images, unrolled=True)``
differentiates through the update itself: AdamW's first step from a fresh state is
``ctx · (1 - lr · wd) - lr · g / (|g| + eps)`` elementwise (bias-corrected moments ``m̂ = g``,
``v̂ = g²``), written out so that autograd follows ``g`` back to the input. The step is a sign of the
gradient up to ``eps``, so its derivative is almost zero and the unrolled gradient nearly equals
BPDA's — the notebooks measure it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from vlmdefense.defenses.base import Predictor
from vlmdefense.defenses.test_time_adaptation.r_tpt import RTPT, RTPTConfig, RTPTOutput
from vlmdefense.defenses.test_time_adaptation.views import accuracy, entropy, gather_views, random_views
from vlmdefense.workbench.models import set_seed

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData

ADAM_EPS = 1e-8  # torch.optim.AdamW's default eps


@dataclass
class PromptTuningConfig(RTPTConfig):
    """R-TPT's fields plus ``unrolled``: the adaptive attack differentiates through the AdamW step
    (``steps`` must be 1) instead of treating the tuned context as a constant (BPDA)."""

    unrolled: bool = False


def adamw_first_step(ctx: torch.Tensor, grad: torch.Tensor, lr: float, weight_decay: float) -> torch.Tensor:
    """The parameter after one AdamW step from a fresh optimiser state (differentiable in both)."""
    return ctx * (1.0 - lr * weight_decay) - lr * grad / (grad.abs() + ADAM_EPS)


class PromptTuning(RTPT):
    """R-TPT's machinery with the views, objective and ensemble as hooks (no id: not registered)."""

    config: PromptTuningConfig

    # ---- hooks -------------------------------------------------------------------------------------

    def make_views(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, V, C, H, W)``: the image and ``n_views - 1`` random resized crops."""
        cfg = self.config
        return random_views(images, cfg.n_views, scale=(cfg.crop_scale_min, 1.0))

    def view_scores(self, views: torch.Tensor, features: torch.Tensor) -> torch.Tensor | None:
        """Per-view scores ``(B, V, ...)`` computed before tuning (none by default)."""
        return None

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """Indices ``(B, k)`` of the views the objective sees (the lowest-entropy fraction)."""
        k = max(1, int(logits.shape[1] * self.config.selection))
        return entropy(logits).argsort(dim=1)[:, :k]

    def objective(self, selected_logits: torch.Tensor, selected_scores: torch.Tensor | None) -> torch.Tensor:
        """Per-image loss ``(B,)`` on the selected views' logits ``(B, k, C)``: mean pointwise entropy."""
        return entropy(selected_logits).mean(dim=1)

    def ensemble(
        self, features: torch.Tensor, logits: torch.Tensor, scores: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prediction ``(B, C)`` from the views' tuned logits and its weights ``(B, V)``."""
        return self.combine(features, logits)

    # ---- the mechanism ---------------------------------------------------------------------------

    def view_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings of fresh views ``(B, V, D)`` (graph to ``images`` kept)."""
        views = self.make_views(images)
        b, v = views.shape[:2]
        return self._base().embed(views.flatten(0, 1)).view(b, v, -1)

    def _loss(
        self, features: torch.Tensor, ctx: torch.Tensor, scores: torch.Tensor | None, selected: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.view_logits(features, ctx)
        if selected is None:
            selected = self.select(logits.detach())
        chosen = None if scores is None else gather_views(scores, selected)
        return self.objective(gather_views(logits, selected), chosen), selected

    def tune(
        self, features: torch.Tensor, scores: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tuned contexts ``(B, M, d)`` (no graph to the input), the selected views and the loss per
        image before the update; the selection is made once, on the initial prompt's logits."""
        assert self.learner is not None
        cfg = self.config
        features = features.detach()
        scores = None if scores is None else scores.detach()
        context = torch.nn.Parameter(self.learner.ctx_init.unsqueeze(0).repeat(features.shape[0], 1, 1))
        optimizer = torch.optim.AdamW([context], lr=cfg.lr, weight_decay=cfg.weight_decay)
        selected: torch.Tensor | None = None
        before: torch.Tensor | None = None
        with torch.enable_grad():
            for _ in range(cfg.steps):
                per_image, selected = self._loss(features, context, scores, selected)
                before = per_image.detach() if before is None else before
                optimizer.zero_grad(set_to_none=True)
                per_image.sum().backward()  # summed: each context gets its own image's gradient
                optimizer.step()
        if selected is None or before is None:  # steps == 0
            with torch.no_grad():
                before, selected = self._loss(features, context, scores, None)
        return context.detach(), selected, before

    def tune_unrolled(
        self, features: torch.Tensor, scores: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As :meth:`tune` for one step, with the graph from the tuned context back to ``features``."""
        assert self.learner is not None
        cfg = self.config
        if cfg.steps != 1:
            raise ValueError("the unrolled attack supports steps == 1 (the methods' default)")
        start = self.learner.ctx_init.unsqueeze(0).repeat(features.shape[0], 1, 1).requires_grad_(True)
        # the math attention kernel: the fused CPU kernels have no double backward
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            per_image, selected = self._loss(features, start, scores, None)
            (grad,) = torch.autograd.grad(per_image.sum(), start, create_graph=True)
        return adamw_first_step(start, grad, cfg.lr, cfg.weight_decay), selected, per_image.detach()

    def run(self, images: torch.Tensor, with_graph: bool = False, unrolled: bool = False) -> RTPTOutput:
        """The whole pipeline. ``with_graph``: graph to ``images`` except through the tuned context
        (BPDA); ``unrolled``: also through the tuning step."""
        assert self.learner is not None
        graph = with_graph or unrolled
        with torch.set_grad_enabled(graph):
            views = self.make_views(images)
            b, v = views.shape[:2]
            features = self._base().embed(views.flatten(0, 1)).view(b, v, -1)
            scores = self.view_scores(views, features)
        if unrolled:
            ctx, selected, before = self.tune_unrolled(features, scores)
        else:
            ctx, selected, before = self.tune(features, scores)
        with torch.set_grad_enabled(graph):
            with torch.set_grad_enabled(unrolled):
                text = self.learner(ctx, per_image=True)
            logits = self._base().logit_scale * torch.einsum("bvd,bcd->bvc", features, text)
            out, weights = self.ensemble(features, logits, scores)
        return RTPTOutput(out, logits, weights, selected, ctx.detach(), before)

    def objective_change(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The objective per image before and after the tuning step, on the same views and selection."""
        with torch.no_grad():
            views = self.make_views(images)
            b, v = views.shape[:2]
            features = self._base().embed(views.flatten(0, 1)).view(b, v, -1)
            scores = self.view_scores(views, features)
        ctx, selected, before = self.tune(features, scores)
        with torch.no_grad():
            after, _ = self._loss(features, ctx, scores, selected)
        return before, after

    def attack_surface(self) -> Predictor:
        """Fresh views at every call; BPDA through the prompt update, or through the unrolled step
        when ``unrolled`` is set."""
        unrolled = self.config.unrolled

        def surface(images: torch.Tensor) -> torch.Tensor:
            return self.run(images, with_graph=True, unrolled=unrolled).logits

        return surface


def tuning_effect(data: FitData, defense: PromptTuning, adversarial: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Accuracy on the test split (clean and the given non-adaptive adversarial images) of the method
    with and without its tuning step (``steps = 0``: the initial prompt through the same views and
    ensemble), the share of predictions the step changes, and the objective before and after it."""
    x, y = data.sets.test.images, data.sets.test.labels
    original = defense.config
    rows: dict[str, dict[str, float]] = {"tuned": {}, "no tuning (steps = 0)": {}, "changed predictions %": {}}
    objective: dict[str, dict[str, float]] = {}
    try:
        for key, images in {"clean": x, **adversarial}.items():
            outputs = {}
            for name, steps in (("tuned", original.steps), ("no tuning (steps = 0)", 0)):
                defense.config = dataclasses.replace(original, steps=steps)
                set_seed(data.seed)  # the same views for both
                outputs[name] = defense.run(images)
                rows[name][key] = accuracy(outputs[name].logits, y)
            tuned, untuned = outputs["tuned"], outputs["no tuning (steps = 0)"]
            changed = (tuned.logits.argmax(-1) != untuned.logits.argmax(-1)).float().mean()
            rows["changed predictions %"][key] = round(100.0 * float(changed), 2)
            defense.config = original
            set_seed(data.seed)
            before, after = defense.objective_change(images)
            objective[key] = {"before": round(float(before.mean()), 5), "after": round(float(after.mean()), 5)}
    finally:
        defense.config = original
    return {"accuracy": rows, "objective": objective}
