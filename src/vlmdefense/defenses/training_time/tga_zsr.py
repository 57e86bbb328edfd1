"""TGA-ZSR — text-guided attention for zero-shot robustness (Yu, Zhang and Xu, NeurIPS 2024).

The inner attack is TeCoA's (PGD on the class-prompt cross-entropy of the model being trained). The
training loss adds two terms on text-guided attention maps (:mod:`.attention_maps`; the text is the true
class's embedding): the *attention refinement* term pulls the fine-tuned model's map of the adversarial
image towards the frozen original model's map of the clean image (weight ``alpha``), and the
*attention-based model constraint* pulls the fine-tuned model's map of the clean image towards that
same original map (weight ``beta``). Inference is plain zero-shot CLIP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from vlmdefense.defenses.training_time.attention_maps import (
    attention_from_patches,
    attention_maps,
    embed_with_patches,
    map_distance,
)
from vlmdefense.defenses.training_time.finetuning import AdversarialFineTuning, Batch, FineTuneConfig
from vlmdefense.workbench.attacks import PGD
from vlmdefense.workbench.data import seen_mask
from vlmdefense.workbench.evaluation import ZeroShotClassifier

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData


@dataclass
class TGAZSRConfig(FineTuneConfig):
    """The fine-tuning budget plus TGA-ZSR's attention terms (official code defaults).

    Attributes:
        alpha: weight of the attention-refinement term d(A_tuned(x_adv), A_original(x)).
        beta: weight of the attention-based model constraint d(A_tuned(x), A_original(x)).
        distance: ``l2`` (code default: per-image Euclidean norm of the map difference), ``l1`` or ``cos``.
        map_size: side in pixels of the upsampled maps the distance compares; the code upsamples to its
            input size, 224, which sets the scale of the l2 term that ``alpha`` and ``beta`` weigh.
    """

    alpha: float = 0.08
    beta: float = 0.05
    distance: str = "l2"
    map_size: int = 224


class TGAZSR(AdversarialFineTuning):
    """TGA-ZSR: TeCoA plus text-guided attention refinement and an attention-based model constraint."""

    id = "tga-zsr"
    config_class: ClassVar[type] = TGAZSRConfig
    config: TGAZSRConfig

    def __init__(self, config: TGAZSRConfig | None = None) -> None:
        super().__init__(config)
        if self.config.distance not in {"l2", "l1", "cos"}:
            raise ValueError(f"distance must be 'l2', 'l1' or 'cos', not {self.config.distance!r}")

    def _class_text(self, labels: torch.Tensor, classifier: ZeroShotClassifier | None = None) -> torch.Tensor:
        """The unit class text embedding of each image's true class (labels index ``train_classes``)."""
        classifier = classifier or self.classifier
        assert classifier is not None
        return classifier.text_weights[self.train_classes][labels]

    def reference(self, batch: Batch) -> Batch:
        """The frozen original model's attention maps of the clean images (computed without gradients)."""
        assert self.original is not None
        text = self._class_text(batch["labels"], self.original)
        maps = attention_maps(self.original.clip, batch["images"], text)
        return {**batch, "text": text, "original_clean_map": maps}

    def attack_objective(self, batch: Batch, x_adv: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self._logits(x_adv), batch["labels"])

    def attention_terms(self, batch: Batch, x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits of x_adv, refinement distance, constraint distance)``, differentiable in the tuned tower."""
        assert self.classifier is not None
        clip, size = self.classifier.clip, self.config.map_size
        embedding, patches = embed_with_patches(clip, x_adv)
        logits = self.classifier.logits_from_embeddings(embedding)[:, self.train_classes]
        adv_map = attention_from_patches(patches, batch["text"])
        clean_map = attention_maps(clip, batch["images"], batch["text"])
        target, metric = batch["original_clean_map"], self.config.distance
        return logits, map_distance(adv_map, target, metric, size), map_distance(clean_map, target, metric, size)

    def training_loss(self, batch: Batch, x_adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        logits, refinement, constraint = self.attention_terms(batch, x_adv)
        ce = F.cross_entropy(logits, batch["labels"])
        loss = ce + self.config.alpha * refinement + self.config.beta * constraint
        parts: dict[str, Any] = {
            "ce_adv": ce.item(),
            "attention_refinement": refinement.item(),
            "attention_constraint": constraint.item(),
        }
        return loss, parts

    def attention_shift(self, images: torch.Tensor, labels: torch.Tensor, eps: float) -> dict[str, float]:
        """How far a PGD-10 attack at ``eps`` on each model moves where that model looks: the mean
        distance (the configured metric) between the model's attention map of its own adversarial image
        and the original model's map of the clean image, for the original and the fine-tuned model
        (``labels`` are dataset class ids; the text is the true class's)."""
        assert self.original is not None and self.classifier is not None
        size, metric = self.config.map_size, self.config.distance
        attack = PGD(eps=eps, steps=10)
        with torch.no_grad():
            text = self.original.text_weights[labels]
            target = attention_maps(self.original.clip, images, text)
        out = {}
        for name, model in (("original", self.original), ("fine_tuned", self.classifier)):
            x_adv = attack(model, images, labels)
            with torch.no_grad():
                shifted = attention_maps(model.clip, x_adv, text)
                out[name] = round(map_distance(shifted, target, metric, size).item(), 4)
        return out

    def summary(self, data: FitData, seconds: float) -> dict[str, Any]:
        """The shared findings plus the attention shift under attack on the seen and unseen test digits."""
        out = super().summary(data, seconds)
        test = data.sets.test
        mask = seen_mask(test.labels.cpu(), data.prompts.seen_classes).to(test.images.device)
        out["attention_shift_under_pgd10"] = {
            split: self.attention_shift(test.images[m], test.labels[m], data.headline.value)
            for split, m in (("seen", mask), ("unseen", ~mask))
        }
        return out


@runtime_checkable
class FitSource(Protocol):
    """Anything that builds the :class:`FitData` of a run (a notebook's context)."""

    def fit_data(self) -> FitData: ...


def settings_tradeoff(
    source: FitData | FitSource, method: str, settings: dict[str, dict[str, Any]], keep: tuple[str, ...] = ()
) -> dict[str, dict[str, Any]]:
    """Fit ``method`` once per named setting (parameters on top of the run's) and measure clean and
    PGD-10 accuracy at the headline ε (%) on the seen and the unseen test digits: the trade-off of a
    regulariser's weight, cheaper than a full evaluation per setting. ``source`` is the run's fit data or
    its context; ``keep`` names findings of each fit to copy beside the accuracies."""
    from vlmdefense.defenses import create_defense

    data = source.fit_data() if isinstance(source, FitSource) else source

    test = data.sets.test
    mask = seen_mask(test.labels.cpu(), data.prompts.seen_classes).to(test.images.device)
    attack = PGD(eps=data.headline.value, steps=10)
    out: dict[str, dict[str, Any]] = {}
    for name, params in settings.items():
        defense = create_defense(method, **{**data.params, **params})
        findings = defense.fit(data) or {}
        x_adv = attack(defense.predict, test.images, test.labels)
        with torch.no_grad():
            clean = defense.predict(test.images).argmax(-1) == test.labels
            robust = defense.predict(x_adv).argmax(-1) == test.labels
        out[name] = {
            f"{kind}_{split}": round(100.0 * hits[m].float().mean().item(), 2)
            for kind, hits in (("clean", clean), ("pgd10", robust))
            for split, m in (("seen", mask), ("unseen", ~mask))
        }
        out[name].update({key: findings[key] for key in keep})
    return out
