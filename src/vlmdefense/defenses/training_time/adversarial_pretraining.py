"""Adversarial contrastive pre-training from scratch: the mechanism shared by ΔCLIP and Robust-LLaVA.

Instead of fine-tuning the pretrained CLIP, a CLIP of the same architecture is trained contrastively
*from a random initialisation*, with the small CLIP's own recipe (:class:`~vlmdefense.workbench.models.Recipe`:
optimiser, schedule, batch size, augmentation, captions from the prompt templates), except that every
batch's images are first replaced by adversarial ones: an L∞ PGD attack with a random start maximises
the model's image-text contrastive loss (open_clip's ``ClipLoss``, the text embeddings of the batch's
captions held fixed during the attack), and the optimiser then minimises the same loss on the perturbed
images (the min-max of adversarial pre-training; AdvXL's and ΔCLIP's objective). The number of attack
steps may rise for the last epochs (AdvXL's weak-to-strong schedule).

The pre-training data default to the undefended small CLIP's own pre-training data (the digits training
split, all ten classes), so that the defended and the undefended model differ only in the adversarial
images; ``pretrain_data: seen`` restricts them to the seen classes. What each method builds on top of
the pre-trained model (ΔCLIP: the model itself; Robust-LLaVA: the frozen image tower aligned to the
original CLIP) is :meth:`AdversarialPretraining.build`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import open_clip
import torch
import torch.nn.functional as F

from vlmdefense.defenses.base import ConfiguredDefense
from vlmdefense.defenses.training_loop import inner_attack, with_training_eps
from vlmdefense.workbench.clip import LoadedClip
from vlmdefense.workbench.data import ImageSet, PromptSpec, load_digits_split, seen_mask
from vlmdefense.workbench.evaluation import ZeroShotClassifier, accuracy
from vlmdefense.workbench.models import Recipe, configure_threads, set_seed
from vlmdefense.workbench.progress import progress_bar
from vlmdefense.workbench.random_init import fresh_clip
from vlmdefense.workbench.schedule import warmup_cosine_lr

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData

PRETRAIN_DATA = ("pretraining", "seen")
_RECIPE = Recipe()
_CLIP_LOSS = open_clip.loss.ClipLoss()


@dataclass
class PretrainConfig:
    """The pre-training budget: the small CLIP's recipe plus the inner attack.

    Attributes:
        epochs: passes over the pre-training images (the small CLIP's recipe: 40).
        lr: peak learning rate of AdamW (cosine schedule after a linear warm-up), as the recipe.
        weight_decay: AdamW weight decay on matrices (not on embeddings, norms, biases), as the recipe.
        train_batch_size: images per optimiser step, as the recipe (not the profile's evaluation ``batch_size``).
        warmup_fraction: share of the steps spent warming up, as the recipe.
        translate_px: random translation of each image by up to this many pixels, as the recipe.
        max_logit_scale: clamp of the learnt temperature, as the recipe.
        train_eps: L∞ budget of the inner attack; default: the profile's headline ε.
        steps: PGD steps of the inner attack (before the strong stage).
        step_size: PGD step size; default: ``train_eps``.
        eps_warmup_epochs: the first epochs, over which the inner attack's budget (and its step size) rises
            linearly from ``train_eps / eps_warmup_epochs`` to ``train_eps`` (0: the full budget from the
            first step).
        strong_epochs: the last epochs, run with ``strong_steps`` attack steps (AdvXL's weak-to-strong
            schedule; 0: one attack throughout).
        strong_steps: PGD steps in the strong stage.
        pretrain_data: ``pretraining`` — the undefended small CLIP's pre-training data (the digits
            training split, all classes; other datasets: the seen classes' training images); ``seen`` —
            the seen classes' training images only.
        train_limit: pre-train on the first ``train_limit`` images only (the quick profile).
        seed: seed of the initialisation, the batch order, the captions and PGD's random start.
    """

    epochs: int = _RECIPE.epochs
    lr: float = _RECIPE.lr
    weight_decay: float = _RECIPE.weight_decay
    train_batch_size: int = _RECIPE.batch_size
    warmup_fraction: float = _RECIPE.warmup_fraction
    translate_px: int = _RECIPE.translate_px
    max_logit_scale: float = _RECIPE.max_logit_scale
    train_eps: float | None = None
    steps: int = 2
    step_size: float | None = None
    eps_warmup_epochs: int = 20
    strong_epochs: int = 0
    strong_steps: int = 3
    pretrain_data: str = "pretraining"
    train_limit: int | None = None
    seed: int = 0


def caption_tokens(tokenizer: Any, prompts: PromptSpec) -> torch.Tensor:
    """Token ids of every template of every class: (classes, templates, context)."""
    return torch.stack([tokenizer(prompts.prompts(c)) for c in range(len(prompts.classnames))])


def translate(images: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Each image shifted by a random offset of up to ``pixels`` in x and y, zeros shifted in."""
    if pixels <= 0:
        return images
    size = images.shape[-1]
    padded = F.pad(images, (pixels,) * 4)
    offsets = torch.randint(0, 2 * pixels + 1, (len(images), 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + size, dx : dx + size] for i, (dx, dy) in enumerate(offsets)])


def contrastive_loss(
    model: open_clip.CLIP, clip: LoadedClip, images: torch.Tensor, text_features: torch.Tensor
) -> torch.Tensor:
    """open_clip's symmetric image-text contrastive loss of [0, 1] ``images`` against the batch's unit
    text embeddings (row ``i`` is image ``i``'s caption), at the model's learnt temperature."""
    image_features = F.normalize(model.encode_image(clip.normalize(images)), dim=-1)
    loss: torch.Tensor = _CLIP_LOSS(image_features, text_features, model.logit_scale.exp())
    return loss


def attack_steps(config: PretrainConfig, epoch: int) -> int:
    """PGD steps of epoch ``epoch`` (from 0): ``strong_steps`` in the last ``strong_epochs``."""
    return config.strong_steps if epoch >= config.epochs - config.strong_epochs else config.steps


def epoch_eps(config: PretrainConfig, epoch: int) -> float:
    """The inner attack's budget in epoch ``epoch`` (from 0): linear warm-up, then ``train_eps``."""
    assert config.train_eps is not None
    if epoch >= config.eps_warmup_epochs:
        return config.train_eps
    return config.train_eps * (epoch + 1) / config.eps_warmup_epochs


def adversarial_pretrain(
    model: open_clip.CLIP,
    clip: LoadedClip,
    train: ImageSet,
    captions: torch.Tensor,
    config: PretrainConfig,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train ``model`` (both towers) contrastively on adversarial images; returns one row per epoch:
    the mean contrastive loss on the adversarial images (``loss_adv``, the one minimised), on the clean
    images before the step (``loss_clean``, logged only) and the attack steps used."""
    assert config.train_eps is not None
    step_size = config.step_size if config.step_size is not None else config.train_eps
    device = train.images.device
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=config.lr
    )
    generator = torch.Generator().manual_seed(config.seed)
    n = len(train)
    per_epoch = math.ceil(n / config.train_batch_size)
    total = config.epochs * per_epoch
    history: list[dict[str, float]] = []
    bar = progress_bar(total=total, desc="adversarial pre-training", disable=not progress)
    step = 0
    for epoch in range(config.epochs):
        eps = epoch_eps(config, epoch)
        scale = eps / config.train_eps if config.train_eps > 0 else 1.0
        attack = inner_attack(eps, attack_steps(config, epoch), step_size * scale)
        order = torch.randperm(n, generator=generator)
        sums = {"loss_adv": 0.0, "loss_clean": 0.0}
        for b in range(per_epoch):
            index = order[b * config.train_batch_size : (b + 1) * config.train_batch_size]
            images = translate(train.images[index.to(device)].cpu(), config.translate_px, generator).to(device)
            template = torch.randint(0, captions.shape[1], (len(index),), generator=generator)
            texts = captions[train.labels[index.to(device)].cpu(), template].to(device)
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine_lr(step, total, config.lr, config.warmup_fraction)
            model.eval()  # the attack sees the model as it predicts (AdvXL's attacker does the same)
            with torch.no_grad():
                fixed_text = F.normalize(model.encode_text(texts), dim=-1)
                clean = contrastive_loss(model, clip, images, fixed_text).item()
            x_adv = attack.maximise(functools.partial(contrastive_loss, model, clip, text_features=fixed_text), images)
            model.train()
            text_features = F.normalize(model.encode_text(texts), dim=-1)
            loss = contrastive_loss(model, clip, x_adv, text_features)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(config.max_logit_scale))
            sums["loss_adv"] += loss.item() * len(index)
            sums["loss_clean"] += clean * len(index)
            step += 1
            bar.update(1)
        history.append(
            {
                "epoch": epoch + 1,
                "eps": round(eps, 6),
                "attack_steps": attack.steps,
                **{k: round(v / n, 4) for k, v in sums.items()},
            }
        )
    bar.close()
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return history


def pretraining_set(data: FitData, source: str) -> tuple[ImageSet, str]:
    """The images to pre-train on and a description of them (see :attr:`PretrainConfig.pretrain_data`)."""
    if source not in PRETRAIN_DATA:
        raise ValueError(f"unknown pretrain_data {source!r}: use one of {PRETRAIN_DATA}")
    if source == "pretraining" and data.params.get("dataset") == "sklearn-digits":
        train, _ = load_digits_split(data.clip.image_size, seed=int(data.params.get("split_seed", 0)))
        images = ImageSet(train.name, train.images.to(data.device), train.labels.to(data.device), train.classnames)
        return images, "the small CLIP's pre-training data: the digits training split, all classes"
    return data.seen_train, "the seen classes' training images"


class AdversarialPretraining(ConfiguredDefense):
    """A CLIP pre-trained adversarially from scratch; subclasses build the classifier on top (:meth:`build`).

    After :meth:`fit`, ``self.pretrained`` is the adversarially pre-trained CLIP and ``self.classifier``
    the zero-shot classifier that is evaluated (attacked white-box as a ``static`` defense).
    """

    kind = "static"
    config_class: ClassVar[type] = PretrainConfig
    config: PretrainConfig

    def __init__(self, config: PretrainConfig | None = None) -> None:
        super().__init__(config)
        self.pretrained: open_clip.CLIP | None = None
        self.classifier: ZeroShotClassifier | None = None
        self.history: list[dict[str, float]] = []

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        """The quick profile's budget: one epoch over 128 images, one PGD step."""
        return {"epochs": 1, "steps": 1, "strong_epochs": 0, "train_limit": 128}

    def build(self, data: FitData, model: open_clip.CLIP) -> tuple[ZeroShotClassifier, dict[str, Any]]:
        """The evaluated classifier made from the pre-trained ``model``, and its findings."""
        raise NotImplementedError

    def fit(self, data: FitData) -> dict[str, Any]:
        """Pre-train a fresh CLIP adversarially, then build the classifier on it."""
        c = self.config = with_training_eps(self.config, data.headline.value)
        configure_threads()
        train, described = pretraining_set(data, c.pretrain_data)
        train = train.head(c.train_limit)
        model = fresh_clip(data.clip.name, c.seed, data.device)
        clip = dataclasses.replace(data.clip, model=model, pretrained="none (adversarial pre-training)")
        captions = caption_tokens(data.clip.tokenizer, data.prompts)
        test = data.sets.test
        with torch.no_grad():
            initial = accuracy(ZeroShotClassifier(clip, data.prompts).to(data.device)(test.images), test.labels)
        set_seed(c.seed)
        start = time.perf_counter()
        self.history = adversarial_pretrain(model, clip, train, captions, c)
        pretrain_seconds = time.perf_counter() - start
        self.pretrained = model
        self.classifier, built = self.build(data, model)
        for parameter in self.classifier.parameters():
            parameter.requires_grad_(False)
        classes = sorted({int(v) for v in train.labels.tolist()})
        return {
            "method": self.id,
            "hyperparameters": self.hyperparameters(),
            "pretrain_data": described,
            "pretrain_images": len(train),
            "pretrain_classes": classes,
            "pretrain_seen_only": set(classes) <= set(data.prompts.seen_classes),
            "pretrain_seconds": round(pretrain_seconds, 2),
            "initial_zero_shot_test_accuracy": round(initial, 2),
            "loss_curve": self.history,
            "first_epoch": self.history[0] if self.history else None,
            "last_epoch": self.history[-1] if self.history else None,
            **built,
            **self._seen_bias(data),
        }

    def _seen_bias(self, data: FitData) -> dict[str, Any]:
        """How often clean unseen-class test digits are labelled with a seen class (%), as the
        fine-tuning methods report it."""
        assert self.classifier is not None
        test = data.sets.test
        mask = seen_mask(test.labels.cpu(), data.prompts.seen_classes).to(test.images.device)
        seen_ids = torch.tensor(data.prompts.seen_classes, device=test.images.device)
        with torch.no_grad():
            unseen = test.images[~mask]
            as_seen = {
                name: round(100.0 * torch.isin(model(unseen).argmax(-1), seen_ids).float().mean().item(), 2)
                for name, model in (("original", data.base), ("defended", self.classifier))
            }
        return {"unseen_test_predicted_as_seen_class": as_seen}

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            raise RuntimeError(f"{self.id}: call fit first")
        self.counter.forward += len(images)
        self.counter.images += len(images)
        return self.classifier(images)
