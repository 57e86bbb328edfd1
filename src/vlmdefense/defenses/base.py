"""The interface every defense implements: ``fit`` (may be a no-op) and ``predict`` (may adapt)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, Literal

import torch

from vlmdefense.evaluate import PassCounter

if TYPE_CHECKING:
    from vlmdefense.harness import Context

Predictor = Callable[[torch.Tensor], torch.Tensor]


class Defense:
    """A defended ``images -> logits`` pipeline.

    Class attributes:
        id: the catalog id (``baseline`` for the undefended model).
        kind: ``static`` — a deterministic model attacked directly (training-time defenses);
            ``inference`` — the defense acts at inference (test-time and training-free), attacked both
            non-adaptively (through the base model) and adaptively (through :meth:`attack_surface`).
        randomized: the prediction is random; adaptive attacks then average gradients (EOT).
    """

    id: ClassVar[str] = "defense"
    kind: ClassVar[Literal["static", "inference"]] = "static"
    randomized: ClassVar[bool] = False

    def __init__(self) -> None:
        self.counter = PassCounter()

    def fit(self, ctx: Context) -> None:
        """Train or calibrate on what the protocol allows (seen classes of the train split)."""

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for [0, 1] images."""
        raise NotImplementedError

    def attack_surface(self) -> Predictor:
        """What an adaptive attack differentiates: by default the defended pipeline itself."""
        return self.predict

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict(images)


class Undefended(Defense):
    """The base model's zero-shot classifier, unchanged (the ``baseline``)."""

    id = "baseline"

    def __init__(self, classifier: Predictor) -> None:
        super().__init__()
        self.classifier = classifier

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        self.counter.forward += len(images)
        self.counter.images += len(images)
        return self.classifier(images)
