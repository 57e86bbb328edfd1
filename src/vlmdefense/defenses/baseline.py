"""The undefended model (id ``baseline``): the frozen base zero-shot classifier, unchanged."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vlmdefense.defenses.base import Defense, Predictor

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData


class Undefended(Defense):
    """The base model's zero-shot classifier, unchanged (the ``baseline``).

    Args:
        classifier: the classifier to wrap; ``None``: the base classifier, bound at :meth:`fit`.
    """

    id = "baseline"

    def __init__(self, classifier: Predictor | None = None) -> None:
        super().__init__()
        self.classifier = classifier

    def fit(self, data: FitData) -> dict[str, Any]:
        """Bind the base classifier unless one was given; nothing is learned."""
        if self.classifier is None:
            self.classifier = data.base
        return {}

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            raise RuntimeError("baseline: call fit before predicting")
        self.counter.forward += len(images)
        self.counter.images += len(images)
        return self.classifier(images)
