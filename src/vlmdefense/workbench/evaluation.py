"""Zero-shot classification and the clean / robust accuracy of any ``images -> logits`` pipeline."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmdefense.runs.records import Accuracy
from vlmdefense.workbench.clip import LoadedClip
from vlmdefense.workbench.data import ImageSet, PromptSpec, seen_mask
from vlmdefense.workbench.progress import progress_bar

logger = logging.getLogger(__name__)

Predictor = Callable[[torch.Tensor], torch.Tensor]


def text_classifier_weights(clip: LoadedClip, prompts: PromptSpec) -> torch.Tensor:
    """Prompt-ensembled class embeddings (classes, dim): mean of unit text embeddings, renormalised."""
    weights = []
    with torch.no_grad():
        for index in range(len(prompts.classnames)):
            embeddings = clip.encode_texts(prompts.prompts(index))
            weights.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    return torch.stack(weights)


class ZeroShotClassifier(nn.Module):
    """[0, 1] images → zero-shot logits; normalisation inside, text embeddings computed once.

    Args:
        clip: the model; its image tower is used as it is (fine-tuned towers may be swapped in).
        prompts: class names and templates.
        text_weights: precomputed class embeddings (e.g. from tuned prompts); default: the ensemble.
    """

    def __init__(self, clip: LoadedClip, prompts: PromptSpec, text_weights: torch.Tensor | None = None) -> None:
        super().__init__()
        self.clip = clip
        self.model = clip.model  # registered, so .parameters() and .to() reach the CLIP weights
        self.prompts = prompts
        weights = text_weights if text_weights is not None else text_classifier_weights(clip, prompts)
        self.text_weights: torch.Tensor
        self.register_buffer("text_weights", weights.detach())
        self.logit_scale = float(clip.model.logit_scale.exp().item())

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings."""
        return self.clip.encode_images(images)

    def logits_from_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarities to the class embeddings."""
        return self.logit_scale * embeddings @ self.text_weights.T

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_from_embeddings(self.embed(images))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    if labels.numel() == 0:
        return float("nan")
    return 100.0 * (logits.argmax(dim=-1) == labels).float().mean().item()


def batched_correct(predict: Predictor, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Boolean tensor: which images ``predict`` classifies correctly (no gradients)."""
    out = []
    for start in range(0, len(labels), batch_size):
        x = images[start : start + batch_size]
        y = labels[start : start + batch_size]
        with torch.no_grad():
            out.append(predict(x).argmax(dim=-1).cpu() == y.cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def split_accuracy(
    correct: torch.Tensor,
    labels: torch.Tensor,
    seen_classes: Sequence[int],
    transfer_correct: torch.Tensor | None = None,
) -> Accuracy:
    """Accuracies (percent, two decimals) from per-image correctness. A split without images is absent
    (``None``), and so are seen and unseen when there are no seen classes (a zero-shot suite's datasets)."""
    mask = seen_mask(labels, tuple(seen_classes))
    split = bool(seen_classes)

    def pct(values: torch.Tensor) -> float | None:
        return round(100.0 * values.float().mean().item(), 2) if values.numel() else None

    return Accuracy(
        all=pct(correct),
        seen=pct(correct[mask]) if split else None,
        unseen=pct(correct[~mask]) if split else None,
        transfer=None if transfer_correct is None else pct(transfer_correct),
    )


AttackFn = Callable[[Predictor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class PassCounter:
    """Counts forward and backward passes of the base model per image during defended inference."""

    forward: int = 0
    backward: int = 0
    images: int = 0

    def per_image(self) -> tuple[float, float]:
        """(forward, backward) passes per image."""
        if not self.images:
            return 0.0, 0.0
        return self.forward / self.images, self.backward / self.images


@dataclass
class EvalSets:
    """The test split (seen/unseen) and the zero-shot transfer set."""

    test: ImageSet
    transfer: ImageSet | None
    seen_classes: tuple[int, ...]


def clean_accuracy(predict: Predictor, sets: EvalSets, batch_size: int = 256) -> Accuracy:
    """Clean accuracy of ``predict`` on all splits."""
    correct = batched_correct(predict, sets.test.images, sets.test.labels, batch_size)
    transfer = None
    if sets.transfer is not None:
        transfer = batched_correct(predict, sets.transfer.images, sets.transfer.labels, batch_size)
    return split_accuracy(correct, sets.test.labels, sets.seen_classes, transfer)


def robust_correct(
    predict: Predictor,
    attack_target: Predictor,
    attack: AttackFn,
    data: ImageSet,
    batch_size: int,
    desc: str = "attack",
) -> torch.Tensor:
    """Which images ``predict`` still classifies correctly after ``attack`` crafted them against
    ``attack_target`` (the base model for a non-adaptive attack, the defended pipeline for an adaptive one)."""
    out = []
    batches = range(0, len(data), batch_size)
    for start in progress_bar(batches, desc=desc, disable=len(data) <= batch_size):
        x = data.images[start : start + batch_size]
        y = data.labels[start : start + batch_size]
        adversarial = attack(attack_target, x, y)
        with torch.no_grad():
            out.append(predict(adversarial).argmax(dim=-1).cpu() == y.cpu())
    return torch.cat(out)


def robust_accuracy(
    predict: Predictor,
    attack_target: Predictor,
    attack: AttackFn,
    sets: EvalSets,
    batch_size: int = 256,
    desc: str = "attack",
) -> tuple[Accuracy, float]:
    """Robust accuracy on test (seen/unseen/all) and transfer; returns it with the seconds it took."""
    start = time.perf_counter()
    correct = robust_correct(predict, attack_target, attack, sets.test, batch_size, desc)
    transfer = None
    if sets.transfer is not None:
        transfer = robust_correct(predict, attack_target, attack, sets.transfer, batch_size, desc + " (transfer)")
    return split_accuracy(correct, sets.test.labels, sets.seen_classes, transfer), time.perf_counter() - start


@dataclass
class Timing:
    """Inference cost of a predictor."""

    seconds_per_image: float
    forward_passes: float
    backward_passes: float
    extra: dict[str, Any] = field(default_factory=dict)


def time_inference(
    predict: Predictor, images: torch.Tensor, counter: PassCounter | None = None, batch_size: int = 256
) -> Timing:
    """Seconds per image (and passes per image, when the predictor counts them) of clean inference."""
    if counter is not None:
        counter.forward = counter.backward = counter.images = 0
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        with torch.no_grad():
            predict(images[i : i + batch_size])
    seconds = (time.perf_counter() - start) / max(1, len(images))
    forward, backward = counter.per_image() if counter is not None else (1.0, 0.0)
    return Timing(seconds, forward, backward)
