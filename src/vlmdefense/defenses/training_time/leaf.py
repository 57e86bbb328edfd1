"""LEAF — Levenshtein efficient adversarial fine-tuning of CLIP's text encoder (Abad Rocamora et al., 2025).

FARE carried over to text: only the text tower is trained, on captions alone. For every caption the
inner attack (:func:`~.text_attacks.character_attack`: ``rho`` candidate slots, then ``rho`` candidate
characters, ``k`` edits, optionally constrained to edits that create no new dictionary word) maximises
the squared L2 distance between the trained tower's embedding of the edited caption and the frozen
original tower's embedding of the clean caption; the optimiser minimises that same distance (the
official ``train_one_epoch_text_only``, unnormalised embeddings).

The captions are the seen classes' prompts (every template); the image tower is not touched by LEAF.
As the released LEAF models pair the robust text tower with a FARE image tower, ``image_tower: fare``
first fits :class:`~.fare.FARE` on the seen classes' images and uses its tower; ``original`` keeps the
original image tower. At inference the class embeddings come from the tuned text tower.

The findings measure the text side as the paper does, by zero-shot text classification under Charmer
(:func:`~.text_attacks.attacked_text_classification`: the class prompts against image prototypes); the
harness measures the image side.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from vlmdefense.defenses.base import ConfiguredDefense
from vlmdefense.defenses.training_time.fare import FARE
from vlmdefense.defenses.training_time.text_attacks import (
    attacked_text_classification,
    caption_vocabulary,
    character_attack,
    text_encoder,
)
from vlmdefense.workbench.evaluation import ZeroShotClassifier
from vlmdefense.workbench.models import set_seed
from vlmdefense.workbench.schedule import warmup_cosine_lr

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData

IMAGE_TOWERS = ("fare", "original")


@dataclass
class LEAFConfig:
    """LEAF's budget and the evaluation's text attack. The released ViT-L script: 30 epochs, batch 128,
    AdamW lr 1e-5, wd 1e-4, k 1, rho 50, constrained; here a larger step for the small model and rho 25;
    the evaluation is Charmer on the class prompts' zero-shot text classification.

    Attributes:
        epochs: passes over the captions.
        train_batch_size: captions per optimiser step.
        lr: peak learning rate (cosine schedule after a linear warm-up).
        weight_decay: AdamW weight decay.
        warmup_fraction: share of the steps spent warming up.
        k: character edits of the training attack (Levenshtein distance).
        rho: candidate slots, then candidate characters, per edit.
        constrain: keep only edits that leave fewer dictionary words (no new word is created).
        image_tower: ``fare`` (fit FARE first, as the released models) or ``original``.
        eval_k: the findings' Charmer attack on the text classification uses 1 … ``eval_k`` edits.
        eval_rho: slots Charmer tries every character at, per edit (the code's default: 20; 5 keeps the
            smoke notebook within its CPU budget).
        seed: seed of the caption order and of the attack's draws.
    """

    epochs: int = 30
    train_batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.1
    k: int = 1
    rho: int = 25
    constrain: bool = True
    image_tower: str = "fare"
    eval_k: int = 2
    eval_rho: int = 5
    seed: int = 0


def is_text_parameter(name: str) -> bool:
    """A text-tower weight of open_clip's ``CLIP`` (everything outside ``visual.`` and the logit scale)."""
    return not name.startswith(("visual.", "logit_"))


class LEAF(ConfiguredDefense):
    """LEAF: label-free adversarial fine-tuning of the text tower against character edits."""

    id = "leaf"
    kind = "static"
    needs_labels: ClassVar[bool] = False
    config_class: ClassVar[type] = LEAFConfig
    config: LEAFConfig

    def __init__(self, config: LEAFConfig | None = None) -> None:
        super().__init__(config)
        if self.config.image_tower not in IMAGE_TOWERS:
            raise ValueError(f"image_tower must be one of {IMAGE_TOWERS}, not {self.config.image_tower!r}")
        self.classifier: ZeroShotClassifier | None = None
        self.history: list[dict[str, float]] = []

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        """The quick profile: one epoch, 8 candidates per training edit, one evaluation edit on 2 slots."""
        return {"epochs": 1, "rho": 8, "eval_k": 1, "eval_rho": 2}

    def fit(self, data: FitData) -> dict[str, Any]:
        """Fit the image tower (FARE or none), then fine-tune a copy of the text tower on the seen
        classes' prompts against the character attack."""
        c = self.config
        set_seed(c.seed)
        rng = random.Random(c.seed)
        model = copy.deepcopy(data.clip.model)
        out: dict[str, Any] = {"method": self.id, "hyperparameters": self.hyperparameters()}
        if c.image_tower == "fare":
            fare = FARE.from_params({"fast": bool(data.params.get("fast")), "seed": c.seed})
            image = fare.fit(data)
            out["image_tower"] = {key: image[key] for key in ("hyperparameters", "fit_seconds", "last_epoch")}
            model.visual.load_state_dict(fare.tuned_state())
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(is_text_parameter(name))
        clip = dataclasses.replace(data.clip, model=model)
        captions = [p for cls in data.prompts.seen_classes for p in data.prompts.prompts(cls)]
        dictionary = caption_vocabulary(data.prompts) if c.constrain else None
        start = time.perf_counter()
        self.history = self._train(clip, text_encoder(data.clip)(captions), captions, dictionary, rng)
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.classifier = ZeroShotClassifier(clip, data.prompts).to(data.device)
        out.update(self._findings(data, captions, dictionary, time.perf_counter() - start))
        return out

    def _train(
        self,
        clip: Any,
        anchors: torch.Tensor,
        captions: list[str],
        dictionary: frozenset[str] | None,
        rng: random.Random,
    ) -> list[dict[str, float]]:
        """The epochs: attack each batch with the current tower, then one AdamW step on the distance."""
        c = self.config
        model = clip.model
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=c.lr, weight_decay=c.weight_decay)
        per_epoch = -(-len(captions) // c.train_batch_size)
        total, step, history = c.epochs * per_epoch, 0, []
        encode = text_encoder(clip)
        for epoch in range(c.epochs):
            order = rng.sample(range(len(captions)), len(captions))
            sums = {"loss": 0.0, "captions_changed": 0.0}
            for b in range(per_epoch):
                index = order[b * c.train_batch_size : (b + 1) * c.train_batch_size]
                batch = [captions[i] for i in index]
                for group in optimizer.param_groups:
                    group["lr"] = warmup_cosine_lr(step, total, c.lr, c.warmup_fraction)
                model.eval()
                adversarial = character_attack(encode, batch, anchors[index], c.rho, c.k, rng, dictionary)
                model.train()
                embedding = model.encode_text(clip.tokenizer(adversarial).to(clip.device))
                loss = (embedding - anchors[index]).pow(2).sum(-1).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                sums["loss"] += loss.item() * len(batch)
                sums["captions_changed"] += sum(a != s for a, s in zip(adversarial, batch, strict=True))
            history.append({"epoch": epoch + 1, **{k: round(v / len(captions), 4) for k, v in sums.items()}})
        return history

    def _findings(
        self,
        data: FitData,
        captions: list[str],
        dictionary: frozenset[str] | None,
        seconds: float,
    ) -> dict[str, Any]:
        """Loss curve, and the text side as the paper measures it: zero-shot text classification of every
        class prompt against image-encoded labels under Charmer with 1 … ``eval_k`` edits (white-box on
        each model's own text tower), original model vs LEAF."""
        assert self.classifier is not None
        c = self.config
        models = {"original": data.clip, "tuned": self.classifier.clip}
        if c.image_tower != "original":  # LEAF's text tower alone, beside the original image tower
            text_only = copy.deepcopy(self.classifier.model)
            text_only.visual.load_state_dict(data.clip.model.visual.state_dict())
            models["tuned_text_original_image"] = dataclasses.replace(data.clip, model=text_only)
        test = data.sets.test
        by_model = {
            name: attacked_text_classification(
                clip, data.prompts, test.images, test.labels, c.eval_rho, c.eval_k, dictionary
            )
            for name, clip in models.items()
        }
        return {
            "train_captions": len(captions),
            "train_classes": list(data.prompts.seen_classes),
            "fit_seconds": round(seconds, 2),
            "loss_curve": self.history,
            "first_epoch": self.history[0] if self.history else None,
            "last_epoch": self.history[-1] if self.history else None,
            "text_classification": {k: {name: r[k] for name, r in by_model.items()} for k in by_model["original"]},
        }

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            raise RuntimeError(f"{self.id}: call fit first")
        self.counter.forward += len(images)
        self.counter.images += len(images)
        return self.classifier(images)
