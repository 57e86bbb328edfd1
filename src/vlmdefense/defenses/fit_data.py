"""What a defense may use to fit: the frozen base model, the seen-class training images, the evaluation
sets (for findings only) and the profile's parameters — and nothing of the harness."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmdefense.units import Epsilon
from vlmdefense.workbench.data import ImageSet, PromptSpec
from vlmdefense.workbench.evaluation import EvalSets, ZeroShotClassifier
from vlmdefense.workbench.models import LoadedClip


@dataclass(frozen=True)
class FitData:
    """The inputs of :meth:`~vlmdefense.defenses.base.Defense.fit` (built by ``Context.fit_data``).

    Attributes:
        base: the frozen undefended zero-shot classifier.
        clip: the loaded CLIP (never modified; training-time defenses fine-tune copies).
        prompts: class names, templates and the seen classes.
        train: the seen classes' training images, all a defense may train or calibrate on; ``None``
            when the profile has no training split.
        sets: the evaluation sets (test, transfer), for findings only.
        headline: the headline ε (the default training ε of adversarial training).
        params: the profile's parameters for the method.
        device: ``cpu`` or ``cuda``.
    """

    base: ZeroShotClassifier
    clip: LoadedClip
    prompts: PromptSpec
    train: ImageSet | None
    sets: EvalSets
    headline: Epsilon
    params: dict[str, Any]
    device: str

    @property
    def seen_train(self) -> ImageSet:
        """The seen classes' training images.

        Raises:
            RuntimeError: the profile has no training split.
        """
        if self.train is None:
            raise RuntimeError("this profile has no training split: set train_dataset (and n_train) in its parameters")
        return self.train

    @property
    def seed(self) -> int:
        """The profile's seed (``seed``, default 0)."""
        return int(self.params.get("seed", 0))

    @property
    def sweep_steps(self) -> int:
        """Steps of the profile's sweep attack (``sweep_attack.steps``)."""
        return int(self.params["sweep_attack"]["steps"])

    @property
    def batch_size(self) -> int:
        """The evaluation batch size (``batch_size``)."""
        return int(self.params["batch_size"])
