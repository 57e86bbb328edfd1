"""Adversarial fine-tuning of CLIP's image encoder: the mechanism shared by TeCoA, PMG-AFT and FARE.

A copy of the image tower is fine-tuned on the seen classes' training images by the one adversarial
training loop (:class:`~vlmdefense.defenses.training_loop.AdversarialLoop`): every batch, an L∞ PGD
attack *maximises* the method's inner objective inside the ε-ball, then the optimiser *minimises* the
method's training loss on the perturbed images. The text tower, the class embeddings and the original
model stay frozen. The methods differ only in two functions, :meth:`AdversarialFineTuning.attack_objective`
and :meth:`AdversarialFineTuning.training_loss` (see ``tecoa.py``, ``pmg_aft.py``, ``fare.py``).

At inference each is a plain zero-shot classifier (one forward pass of the fine-tuned tower), attacked
white-box as a ``static`` defense.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from vlmdefense.defenses.base import ConfiguredDefense
from vlmdefense.defenses.training_loop import (
    AdversarialLoop,
    AdversarialTask,
    inner_attack,
    training_classes,
    training_labels,
    with_training_eps,
)
from vlmdefense.workbench.data import seen_mask
from vlmdefense.workbench.evaluation import ZeroShotClassifier
from vlmdefense.workbench.models import set_seed
from vlmdefense.workbench.schedule import warmup_cosine_lr

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData

Batch = dict[str, torch.Tensor]


@dataclass
class FineTuneConfig:
    """The shared fine-tuning budget (the profile's parameters of the same names override it).

    Attributes:
        epochs: passes over the seen classes' training images.
        train_batch_size: images per optimiser step.
        optimizer: ``sgd`` (momentum, as TeCoA's and PMG-AFT's code) or ``adamw`` (as FARE's code).
        lr: peak learning rate (cosine schedule after a linear warm-up, as in all three codes).
        weight_decay: optimiser weight decay.
        momentum: SGD momentum.
        warmup_fraction: share of the steps spent warming up.
        train_eps: L∞ budget of the inner attack; default: the profile's headline ε.
        steps: PGD steps of the inner attack.
        step_size: PGD step size; default: ``train_eps`` (TeCoA's command line: 2 steps of size ε).
        train_text: the classes whose text embeddings form the training softmax: ``all`` class names
            of the dataset (images still come from the seen classes only) or ``seen`` only.
        train_limit: fine-tune on the first ``train_limit`` seen-class images only (the quick profile);
            ``None``: all of them.
        seed: seed of the batch order and of PGD's random start.
    """

    epochs: int = 15
    train_batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    warmup_fraction: float = 0.1
    train_eps: float | None = None
    steps: int = 2
    step_size: float | None = None
    train_text: str = "all"
    train_limit: int | None = None
    seed: int = 0


class AdversarialFineTuning(ConfiguredDefense):
    """The shared fine-tuning; subclasses give the inner (attack) and outer (training) objectives.

    After :meth:`fit`, ``self.classifier`` is the zero-shot classifier of the fine-tuned copy (the
    class text embeddings are the frozen base model's); the base CLIP is never modified.
    """

    kind = "static"
    needs_labels: ClassVar[bool] = True
    config_class: ClassVar[type] = FineTuneConfig
    config: FineTuneConfig

    def __init__(self, config: FineTuneConfig | None = None) -> None:
        super().__init__(config)
        self.classifier: ZeroShotClassifier | None = None
        self.original: ZeroShotClassifier | None = None
        self.train_classes: list[int] = []
        self.history: list[dict[str, float]] = []

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        """The quick profile's budget (``fast: true``): one epoch over 128 images, one PGD step."""
        return {"epochs": 1, "steps": 1, "train_limit": 128}

    # ---- the two objectives (per method) ---------------------------------------------------------

    def reference(self, batch: Batch) -> Batch:
        """Per-batch quantities of the frozen original model (``self.original``), computed once
        before the attack."""
        return batch

    def attack_objective(self, batch: Batch, x_adv: torch.Tensor) -> torch.Tensor:
        """The scalar the inner attack maximises."""
        raise NotImplementedError

    def training_loss(self, batch: Batch, x_adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar the optimiser minimises, with its components (batch means) for the loss curve."""
        raise NotImplementedError

    # ---- helpers the objectives use --------------------------------------------------------------

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings of the fine-tuned tower."""
        assert self.classifier is not None
        clip = self.classifier.clip
        return clip.model.encode_image(clip.normalize(images))

    def _logits(self, images: torch.Tensor, classifier: ZeroShotClassifier | None = None) -> torch.Tensor:
        """Zero-shot logits over the training label space ``self.train_classes`` (labels index it)."""
        classifier = classifier or self.classifier
        assert classifier is not None
        return classifier.logits_from_embeddings(classifier.embed(images))[:, self.train_classes]

    # ---- fitting ---------------------------------------------------------------------------------

    def _tuned_copy(self, data: FitData) -> ZeroShotClassifier:
        model = copy.deepcopy(data.clip.model)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for parameter in model.visual.parameters():
            parameter.requires_grad_(True)
        clip = dataclasses.replace(data.clip, model=model)
        return ZeroShotClassifier(clip, data.prompts, text_weights=data.base.text_weights).to(data.device)

    def _optimizer(self, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        c = self.config
        if c.optimizer == "sgd":
            return torch.optim.SGD(parameters, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        if c.optimizer == "adamw":
            return torch.optim.AdamW(parameters, lr=c.lr, weight_decay=c.weight_decay)
        raise ValueError(f"unknown optimizer {c.optimizer!r}: use 'sgd' or 'adamw'")

    def fit(self, data: FitData) -> dict[str, Any]:
        """Adversarially fine-tune a copy of the image tower on the seen classes' training images."""
        c = self.config = with_training_eps(self.config, data.headline.value)
        assert c.train_eps is not None
        step_size = c.step_size if c.step_size is not None else c.train_eps
        train = data.seen_train.head(c.train_limit)
        self.train_classes = training_classes(data.prompts, c.train_text)
        labels = training_labels(train, data.prompts, self.train_classes)
        set_seed(c.seed)
        self.original = data.base
        self.classifier = self._tuned_copy(data)
        model = self.classifier.model
        parameters = [p for p in model.visual.parameters() if p.requires_grad]
        loop = AdversarialLoop(
            epochs=c.epochs,
            batch_size=c.train_batch_size,
            seed=c.seed,
            attack=inner_attack(c.train_eps, c.steps, step_size),
            optimizer=self._optimizer(parameters),
            schedule=lambda step, epoch, total: warmup_cosine_lr(step, total, c.lr, c.warmup_fraction),
        )
        start = time.perf_counter()
        self.history = loop.run(_FineTuningTask(self), train.images, labels)
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return self.summary(data, time.perf_counter() - start)

    def tuned_state(self) -> dict[str, torch.Tensor]:
        """The fine-tuned image tower's weights (what :meth:`restore` takes back)."""
        if self.classifier is None:
            raise RuntimeError(f"{self.id}: call fit first")
        return {k: v.detach().cpu() for k, v in self.classifier.model.visual.state_dict().items()}

    def restore(self, data: FitData, state: dict[str, torch.Tensor]) -> None:
        """Take the image tower of an earlier :meth:`fit` (same base model) instead of fitting again."""
        self.original = data.base
        self.train_classes = training_classes(data.prompts, self.config.train_text)
        self.classifier = self._tuned_copy(data)
        self.classifier.model.visual.load_state_dict(state)
        self.classifier.model.eval()
        for parameter in self.classifier.model.parameters():
            parameter.requires_grad_(False)

    # ---- inference -------------------------------------------------------------------------------

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            raise RuntimeError(f"{self.id}: call fit first")
        self.counter.forward += len(images)
        self.counter.images += len(images)
        return self.classifier(images)

    # ---- findings --------------------------------------------------------------------------------

    def summary(self, data: FitData, seconds: float) -> dict[str, Any]:
        """The loss curve, the hyperparameters, and how far the clean embeddings moved (seen vs unseen)."""
        assert self.classifier is not None
        test = data.sets.test
        mask = seen_mask(test.labels.cpu(), data.prompts.seen_classes).to(test.images.device)
        with torch.no_grad():
            cosine = F.cosine_similarity(self.classifier.embed(test.images), data.base.embed(test.images), dim=-1)
        out: dict[str, Any] = {
            "method": self.id,
            "hyperparameters": self.hyperparameters(),
            "train_images": len(data.seen_train.head(self.config.train_limit)),
            "train_classes": list(data.prompts.seen_classes),
            "fit_seconds": round(seconds, 2),
            "loss_curve": self.history,
            "first_epoch": self.history[0] if self.history else None,
            "last_epoch": self.history[-1] if self.history else None,
            "clean_embedding_cosine_to_original": {
                "seen": round(cosine[mask].mean().item(), 4),
                "unseen": round(cosine[~mask].mean().item(), 4),
            },
        }
        seen_ids = torch.tensor(data.prompts.seen_classes, device=test.images.device)
        with torch.no_grad():
            unseen = test.images[~mask]
            as_seen = {
                name: round(100.0 * torch.isin(model(unseen).argmax(-1), seen_ids).float().mean().item(), 2)
                for name, model in (("original", data.base), ("fine_tuned", self.classifier))
            }
        # How often clean unseen-class test digits are labelled with a seen class (%): the label prior
        # that fine-tuning on seen classes only can teach.
        out["unseen_test_predicted_as_seen_class"] = as_seen
        if data.sets.transfer is not None:
            with torch.no_grad():
                t = data.sets.transfer.images
                out["clean_embedding_cosine_to_original"]["transfer"] = round(
                    F.cosine_similarity(self.classifier.embed(t), data.base.embed(t), dim=-1).mean().item(), 4
                )
        return out


class _FineTuningTask(AdversarialTask[Batch]):
    """The loop's view of a fine-tuning defense: the fine-tuned tower is in eval mode during the attack,
    the components of the loss are logged weighted by the batch size."""

    def __init__(self, defense: AdversarialFineTuning) -> None:
        assert defense.classifier is not None
        self.defense = defense
        self.model = defense.classifier.model

    def prepare(self, images: torch.Tensor, labels: torch.Tensor) -> Batch:
        return self.defense.reference({"images": images, "labels": labels})

    def attack_objective(self, state: Batch, x: torch.Tensor) -> torch.Tensor:
        return self.defense.attack_objective(state, x)

    def before_attack(self) -> None:
        self.model.eval()

    def after_attack(self) -> None:
        self.model.train()

    def training_loss(self, state: Batch, x_adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss, parts = self.defense.training_loss(state, x_adv)
        n = len(state["images"])
        return loss, {key: value * n for key, value in parts.items()}

    def after_step(self, state: Batch, x_adv: torch.Tensor) -> dict[str, float]:
        correct = self.defense._logits(x_adv).argmax(-1) == state["labels"]
        return {"train_adv_acc": 100.0 * correct.float().mean().item() * len(state["images"])}
