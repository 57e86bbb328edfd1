"""Shared parts of the adversarial prompt-tuning family (AdvPT, FAP, CBA-FAPT).

* :func:`few_shot_indices` — the few-shot training split: ``shots`` images per class, drawn once with a
  seeded generator (Dassl's ``generate_fewshot_dataset``).
* :class:`CoupledPrompts` — MaPLe-style prompts on *both* towers, as FAP's official code couples them:
  ``n_ctx`` learnable text context vectors at the input of the text tower (starting from the first
  words of a template, the rest of the template stays fixed text); their linear projection is the
  image tower's layer-0 prompt; the image tower's deeper prompts (layers ``1 … depth-1``) are learned,
  and their linear projections are the text tower's deeper context vectors.
* :class:`PromptTuningDefense` — the fit/predict shell of FAP and CBA-FAPT: the few-shot split, the
  adversarial loop (:class:`~vlmdefense.defenses.training_loop.AdversarialLoop`) with the method's
  task, the Dassl warm-up + cosine schedule, and a static prompted classifier at inference.

Only prompt tensors and the prompt projections are ever optimised: the CLIP weights are read, never
changed (checked bit for bit in the tests).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmdefense.defenses.base import ConfiguredDefense
from vlmdefense.defenses.prompt_learner import ContextInit, PromptLearner, VisualOutput, VisualPromptEncoder
from vlmdefense.defenses.training_loop import (
    AdversarialLoop,
    AdversarialTask,
    inner_attack,
    training_classes,
    training_labels,
    with_training_eps,
)
from vlmdefense.workbench.data import ImageSet, PromptSpec
from vlmdefense.workbench.models import LoadedClip, set_seed
from vlmdefense.workbench.schedule import dassl_lr

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData


def few_shot_indices(labels: torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """Indices of ``shots`` images of every class present in ``labels`` (sorted), drawn without
    replacement by a generator seeded with ``seed``.

    Raises:
        ValueError: a class has fewer than ``shots`` images, or ``shots < 1``.
    """
    if shots < 1:
        raise ValueError(f"shots must be at least 1, not {shots}")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for cls in torch.unique(labels.cpu()).tolist():
        members = torch.nonzero(labels.cpu() == cls).flatten()
        if len(members) < shots:
            raise ValueError(f"class {cls} has {len(members)} training images, fewer than {shots} shots")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return torch.sort(torch.cat(chosen)).values.to(labels.device)


def few_shot_set(train: ImageSet, shots: int | None, seed: int) -> ImageSet:
    """``train`` cut to ``shots`` images per class (all of it when ``shots`` is ``None`` or 0)."""
    if not shots:
        return train
    return train.subset(few_shot_indices(train.labels, shots, seed), f"{train.name}-{shots}shot")


class CoupledPrompts(nn.Module):
    """FAP's multi-modal prompts on the frozen towers of ``clip``.

    Args:
        clip: the model (weights used, never changed).
        prompts: class names.
        n_ctx: learnable context tokens (first words of ``template``; official: 2 of "a photo of a").
        depth: prompted layers per tower (layer 0 plus ``depth - 1`` deeper ones; official 9 of 12).
        template: the template whose first ``n_ctx`` words start the text context.
    """

    def __init__(self, clip: LoadedClip, prompts: PromptSpec, n_ctx: int, depth: int, template: str) -> None:
        super().__init__()
        self.text = PromptLearner(clip, prompts, ContextInit(template=template, learn_first=n_ctx))
        self.vision = VisualPromptEncoder(clip)
        text_layers = len(list(clip.model.transformer.resblocks))
        if not 1 <= depth <= min(text_layers, self.vision.layers):
            raise ValueError(f"depth {depth}: the towers have {text_layers} and {self.vision.layers} layers")
        self.depth = depth
        self.scale = float(clip.model.logit_scale.exp().item())
        self.ctx = nn.Parameter(self.text.ctx_init.clone())
        self.to_vision = nn.Linear(self.text.width, self.vision.width)
        self.visual_deep = nn.Parameter(torch.randn(depth - 1, n_ctx, self.vision.width) * 0.02)
        self.to_text = nn.ModuleList(nn.Linear(self.vision.width, self.text.width) for _ in range(depth - 1))
        self.to(clip.device)

    def learnable(self) -> list[nn.Parameter]:
        """The prompt tensors and projections (what the optimiser gets; never the CLIP weights)."""
        params = [self.ctx, self.visual_deep, *self.to_vision.parameters()]
        return params + [p for layer in self.to_text for p in layer.parameters()]

    def n_learnable(self) -> int:
        """Number of learned values."""
        return sum(p.numel() for p in self.learnable())

    def deep_text(self) -> torch.Tensor | None:
        """The text tower's deeper context ``(depth - 1, n_ctx, d)``, projected from the image side."""
        if self.depth == 1:
            return None
        return torch.stack([proj(p) for proj, p in zip(self.to_text, self.visual_deep, strict=True)])

    def visual_prompts(self) -> torch.Tensor:
        """The image tower's prompts ``(depth, n_ctx, width)``: layer 0 projected from the text context."""
        return torch.cat([self.to_vision(self.ctx).unsqueeze(0), self.visual_deep], dim=0)

    def text_weights(self) -> torch.Tensor:
        """Unit class embeddings ``(C, D)`` of the prompted text tower."""
        return self.text(self.ctx, deep=self.deep_text())

    def encode(self, images: torch.Tensor, record: bool = False) -> VisualOutput:
        """Unit image embeddings of the prompted image tower (with the block inputs if ``record``)."""
        return self.vision(images, self.visual_prompts(), record=record)

    def forward(self, images: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Zero-shot logits of [0, 1] images (``weights``: precomputed class embeddings)."""
        weights = self.text_weights() if weights is None else weights
        return self.scale * self.encode(images).features @ weights.T


@dataclass
class PromptTuningConfig:
    """Hyperparameters shared by FAP and CBA-FAPT (official FAP: ``vit_b32_ep10_batch4_2ctx_notransform``).

    Attributes:
        shots: training images per seen class (few-shot split; 0 = every seen-class training image).
        n_ctx: learnable context tokens per layer (official 2).
        depth: prompted layers of each tower (official 9 of 12; the small CLIP's text tower has 2).
        template: template whose first ``n_ctx`` words start the context ("a photo of a" officially).
        epochs, train_batch_size: official 10 epochs, batch 4.
        lr, momentum, weight_decay: SGD (official 0.0035, Dassl's 0.9 and 5e-4).
        warmup_epochs, warmup_lr: one constant epoch at 1e-5, then cosine (official).
        train_eps: ε of the training attack; default the profile's headline ε (official 1/255).
        steps: PGD steps of the training attack (official 2).
        step_size: PGD step; default ``train_eps`` (official α = ε).
        train_text: ``seen`` (the base-to-new protocol: softmax over the seen class names) or ``all``.
        seed: seed of the split, the prompt initialisation, the batch order and PGD's noise.
    """

    shots: int = 16
    n_ctx: int = 2
    depth: int = 2
    template: str = "a photo of the digit {name}."
    epochs: int = 10
    train_batch_size: int = 4
    lr: float = 0.0035
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    train_eps: float | None = None
    steps: int = 2
    step_size: float | None = None
    train_text: str = "seen"
    seed: int = 0


class PromptTuningDefense(ConfiguredDefense):
    """Few-shot adversarial prompt tuning of :class:`CoupledPrompts` on frozen towers; a static
    defense at inference (one prompted image-tower pass, the class embeddings computed once)."""

    kind = "static"
    config: PromptTuningConfig

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.prompts: CoupledPrompts | None = None
        self.weights: torch.Tensor | None = None
        self.history: list[dict[str, float]] = []

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        """The quick profile: 4 shots, one epoch without warm-up, one PGD step, batches of 20."""
        return {"shots": 4, "epochs": 1, "warmup_epochs": 0, "steps": 1, "train_batch_size": 20}

    def make_task(self, prompts: CoupledPrompts, classes: list[int]) -> AdversarialTask[Any]:
        """The method's inner objective and training loss."""
        raise NotImplementedError

    def fit(self, data: FitData) -> dict[str, Any]:
        """Tune the prompts on the few-shot split of the seen classes' training images."""
        start = time.perf_counter()
        c = self.config = with_training_eps(self.config, data.headline.value)
        assert c.train_eps is not None
        set_seed(c.seed)
        train = few_shot_set(data.seen_train, c.shots, c.seed)
        prompts = CoupledPrompts(data.clip, data.prompts, c.n_ctx, c.depth, c.template)
        classes = training_classes(data.prompts, c.train_text)
        loop = AdversarialLoop(
            epochs=c.epochs,
            batch_size=c.train_batch_size,
            seed=c.seed,
            attack=inner_attack(c.train_eps, c.steps, c.step_size if c.step_size is not None else c.train_eps),
            optimizer=torch.optim.SGD(prompts.learnable(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
            schedule=lambda step, epoch, total: dassl_lr(epoch, c.epochs, c.lr, c.warmup_epochs, c.warmup_lr),
        )
        with torch.no_grad():
            initial = prompts.text_weights()
        self.history = loop.run(
            self.make_task(prompts, classes), train.images, training_labels(train, data.prompts, classes)
        )
        for parameter in prompts.learnable():
            parameter.requires_grad_(False)
        self.prompts = prompts
        with torch.no_grad():
            self.weights = prompts.text_weights()
        return self.summary(train, initial, time.perf_counter() - start)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        if self.prompts is None or self.weights is None:
            raise RuntimeError(f"{type(self).__name__}: call fit first")
        self.counter.forward += len(images)
        self.counter.images += len(images)
        return self.prompts(images, self.weights)

    def summary(self, train: ImageSet, initial: torch.Tensor, seconds: float) -> dict[str, Any]:
        """Hyperparameters, the split, the loss curve and how far the class embeddings moved."""
        assert self.prompts is not None and self.weights is not None
        per_class = torch.bincount(train.labels.cpu(), minlength=len(train.classnames))
        return {
            "method": self.id,
            "hyperparameters": self.hyperparameters(),
            "train_images": len(train),
            "shots_per_class": {str(i): int(n) for i, n in enumerate(per_class.tolist()) if n},
            "train_classes": sorted({int(v) for v in train.labels.tolist()}),
            "prompt_tuning_seconds": round(seconds, 2),
            "prompt_parameters": self.prompts.n_learnable(),
            "initial_prompt": self.prompts.text.prompt_texts[0],
            "loss_curve": self.history,
            "first_epoch": self.history[0] if self.history else None,
            "last_epoch": self.history[-1] if self.history else None,
            "class_embedding_cosine_to_initial": [
                round(float(v), 4) for v in F.cosine_similarity(self.weights, initial, dim=-1)
            ],
        }


def kl_per_sample(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(target_logits) ‖ softmax(logits))`` per row."""
    return F.kl_div(F.log_softmax(logits, dim=-1), F.softmax(target_logits, dim=-1), reduction="none").sum(-1)


def tradeoff(
    data: FitData, method: str, settings: list[dict[str, Any]], steps: int | None = None
) -> list[dict[str, Any]]:
    """Refit ``method`` under each of ``settings`` (parameters on top of the profile's) and measure its
    clean accuracy and PGD accuracy (the profile's sweep steps) at the headline ε and at 2/255, per split:
    the trade-off between a setting's robustness and the accuracy it keeps."""
    from vlmdefense.defenses import create_defense
    from vlmdefense.workbench.attacks import PGD
    from vlmdefense.workbench.evaluation import clean_accuracy, robust_accuracy

    steps = data.sweep_steps if steps is None else steps
    rows = []
    for setting in settings:
        defense = create_defense(method, **{**data.params, **setting})
        defense.fit(data)
        row: dict[str, Any] = {
            "setting": setting,
            "clean": clean_accuracy(defense, data.sets, data.batch_size).as_dict(),
        }
        for eps, key in ((data.headline.value, "robust_headline"), (2 / 255, "robust_2/255")):
            set_seed(data.seed)
            robust, _ = robust_accuracy(defense, defense, PGD(eps=eps, steps=steps), data.sets, data.batch_size)
            row[key] = robust.as_dict()
        rows.append(row)
    return rows
