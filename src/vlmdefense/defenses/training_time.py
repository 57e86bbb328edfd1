"""Adversarial fine-tuning of CLIP's image encoder: TeCoA, PMG-AFT and FARE.

The three methods share one loop (:meth:`AdversarialFineTuning.fit`): a copy of the image tower is
fine-tuned on the seen classes' training images; every batch, an L∞ PGD attack *maximises* the
method's inner objective inside the ε-ball, then the optimiser *minimises* the method's training loss
on the perturbed images. The text tower, the class embeddings and the original model stay frozen.
They differ only in two functions:

* TeCoA (Mao et al., ICLR 2023): both objectives are the text-guided contrastive cross-entropy — the
  softmax over the scaled cosine similarities between the image embedding and the frozen class text
  embeddings, against the true class.
* PMG-AFT (Wang et al., CVPR 2024): the inner attack is TeCoA's; the training loss adds two KL terms
  that pull the fine-tuned model's class distribution on the adversarial image towards the frozen
  pre-trained model's distribution on the same adversarial image (``alpha``) and towards the
  fine-tuned model's own distribution on the clean image (``beta``).
* FARE (Schlarmann et al., ICML 2024): unsupervised; both objectives are the squared L2 distance
  between the fine-tuned encoder's (unnormalised) embedding of the perturbed image and the original
  encoder's embedding of the clean image. No labels, no text.

At inference each is a plain zero-shot classifier (one forward pass of the fine-tuned tower), attacked
white-box as a ``static`` defense.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from vlmdefense.defenses.base import Defense, override_config, with_training_eps
from vlmdefense.workbench.attacks import project, random_start
from vlmdefense.workbench.data import seen_mask
from vlmdefense.workbench.evaluation import ZeroShotClassifier
from vlmdefense.workbench.models import set_seed, warmup_cosine_lr

if TYPE_CHECKING:
    from collections.abc import Callable

    from vlmdefense.workbench.harness import Context

Batch = dict[str, torch.Tensor]


@dataclass
class FineTuneConfig:
    """The shared fine-tuning budget (the keys of ``ctx.params`` that override it have the same names).

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


def maximise(
    objective: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float,
) -> torch.Tensor:
    """L∞ PGD with random start that maximises a scalar ``objective(images)`` (the inner attack of
    adversarial training; only the input receives gradients)."""
    images = images.detach()
    if eps == 0 or steps == 0:
        return images.clone()
    x = random_start(images, eps, "linf")
    for _ in range(steps):
        x_ = x.detach().requires_grad_(True)
        grad = torch.autograd.grad(objective(x_), x_)[0]
        x = (images + project(x_.detach() + step_size * grad.sign() - images, eps, "linf")).clamp(0, 1)
    return x.detach()


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor, reduction: str) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) per image, summed (``sum``) or averaged (``batchmean``) over the batch."""
    return F.kl_div(
        F.log_softmax(q_logits, dim=-1), F.log_softmax(p_logits, dim=-1), reduction=reduction, log_target=True
    )


class AdversarialFineTuning(Defense):
    """The shared fine-tuning loop; subclasses give the inner (attack) and outer (training) objectives.

    After :meth:`fit`, ``self.classifier`` is the zero-shot classifier of the fine-tuned copy (the
    class text embeddings are the frozen base model's); ``ctx.clip.model`` is never modified.
    """

    kind = "static"
    needs_labels: ClassVar[bool] = True

    def __init__(self, config: FineTuneConfig | None = None) -> None:
        super().__init__()
        self.config = config or FineTuneConfig()
        self.classifier: ZeroShotClassifier | None = None
        self.original: ZeroShotClassifier | None = None
        self.train_classes: list[int] = []
        self.history: list[dict[str, float]] = []

    # ---- hyperparameters -------------------------------------------------------------------------

    @classmethod
    def default_config(cls) -> FineTuneConfig:
        """The method's paper-faithful defaults, scaled to the small CLIP."""
        return FineTuneConfig()

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        """The quick profile's budget (``fast: true``): one epoch over 128 images, one PGD step."""
        return {"epochs": 1, "steps": 1, "train_limit": 128}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> AdversarialFineTuning:
        """An instance with the defaults, shrunk when ``params['fast']``, then ``params``' overrides."""
        config = cls.default_config()
        if params.get("fast"):
            config = override_config(config, cls.fast_overrides())
        config = override_config(config, params)
        extra = {k: params[k] for k in cls.extra_keys() if k in params}
        return cls(config, **extra)

    @classmethod
    def extra_keys(cls) -> tuple[str, ...]:
        """Method-specific hyperparameters read from ``ctx.params``."""
        return ()

    def hyperparameters(self) -> dict[str, Any]:
        """Everything that defines the run (stored in the findings)."""
        return dataclasses.asdict(self.config)

    # ---- the two objectives (per method) ---------------------------------------------------------

    def reference(self, batch: Batch) -> Batch:
        """Per-batch quantities of the frozen original model (``self.original``), computed once
        before the attack."""
        return batch

    def attack_objective(self, batch: Batch, x_adv: torch.Tensor) -> torch.Tensor:
        """The scalar the inner attack maximises."""
        raise NotImplementedError

    def training_loss(self, batch: Batch, x_adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar the optimiser minimises, with its components for the loss curve."""
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

    # ---- the shared loop -------------------------------------------------------------------------

    def _tuned_copy(self, ctx: Context) -> ZeroShotClassifier:
        model = copy.deepcopy(ctx.clip.model)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for parameter in model.visual.parameters():
            parameter.requires_grad_(True)
        clip = dataclasses.replace(ctx.clip, model=model)
        return ZeroShotClassifier(clip, ctx.prompts, text_weights=ctx.base.text_weights).to(ctx.device)

    def _optimizer(self, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        c = self.config
        if c.optimizer == "sgd":
            return torch.optim.SGD(parameters, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        if c.optimizer == "adamw":
            return torch.optim.AdamW(parameters, lr=c.lr, weight_decay=c.weight_decay)
        raise ValueError(f"unknown optimizer {c.optimizer!r}: use 'sgd' or 'adamw'")

    def fit(self, ctx: Context) -> None:
        """Adversarially fine-tune a copy of the image tower on ``ctx.seen_train``."""
        c = self.config
        c = self.config = with_training_eps(c, ctx)
        step_size = c.step_size if c.step_size is not None else c.train_eps
        train = ctx.seen_train.head(c.train_limit)
        self.train_classes = (
            list(ctx.prompts.seen_classes) if c.train_text == "seen" else list(range(len(ctx.prompts.classnames)))
        )
        to_train_label = torch.full((len(ctx.prompts.classnames),), -1, dtype=torch.long, device=train.labels.device)
        to_train_label[self.train_classes] = torch.arange(len(self.train_classes), device=train.labels.device)
        set_seed(c.seed)
        self.original = ctx.base
        self.classifier = self._tuned_copy(ctx)
        model = self.classifier.model
        parameters = [p for p in model.visual.parameters() if p.requires_grad]
        optimizer = self._optimizer(parameters)
        generator = torch.Generator().manual_seed(c.seed)
        n = len(train)
        per_epoch = math.ceil(n / c.train_batch_size)
        total = c.epochs * per_epoch
        step = 0
        self.history = []
        start = time.perf_counter()
        for epoch in range(c.epochs):
            order = torch.randperm(n, generator=generator).to(train.images.device)
            sums: dict[str, float] = {}
            for b in range(per_epoch):
                index = order[b * c.train_batch_size : (b + 1) * c.train_batch_size]
                batch = {"images": train.images[index], "labels": to_train_label[train.labels[index]]}
                with torch.no_grad():
                    batch = self.reference(batch)
                model.eval()
                x_adv = maximise(
                    lambda x, b=batch: self.attack_objective(b, x), batch["images"], c.train_eps, c.steps, step_size
                )
                model.train()
                for group in optimizer.param_groups:
                    group["lr"] = warmup_cosine_lr(step, total, c.lr, c.warmup_fraction)
                loss, parts = self.training_loss(batch, x_adv)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                with torch.no_grad():
                    parts["train_adv_acc"] = (
                        100.0 * (self._logits(x_adv).argmax(-1) == batch["labels"]).float().mean().item()
                    )
                for key, value in {"loss": loss.item(), **parts}.items():
                    sums[key] = sums.get(key, 0.0) + value * len(index)
            self.history.append({"epoch": epoch + 1, **{k: round(v / n, 4) for k, v in sums.items()}})
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        ctx.findings.update(self.summary(ctx, time.perf_counter() - start))

    # ---- inference -------------------------------------------------------------------------------

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            raise RuntimeError(f"{self.id}: call fit first")
        self.counter.forward += len(images)
        self.counter.images += len(images)
        return self.classifier(images)

    # ---- findings --------------------------------------------------------------------------------

    def summary(self, ctx: Context, seconds: float) -> dict[str, Any]:
        """The loss curve, the hyperparameters, and how far the clean embeddings moved (seen vs unseen)."""
        assert self.classifier is not None
        test = ctx.sets.test
        mask = seen_mask(test.labels.cpu(), ctx.prompts.seen_classes).to(test.images.device)
        with torch.no_grad():
            cosine = F.cosine_similarity(self.classifier.embed(test.images), ctx.base.embed(test.images), dim=-1)
        out: dict[str, Any] = {
            "method": self.id,
            "hyperparameters": self.hyperparameters(),
            "train_images": len(ctx.seen_train.head(self.config.train_limit)),
            "train_classes": list(ctx.prompts.seen_classes),
            "fit_seconds": round(seconds, 2),
            "loss_curve": self.history,
            "first_epoch": self.history[0] if self.history else None,
            "last_epoch": self.history[-1] if self.history else None,
            "clean_embedding_cosine_to_original": {
                "seen": round(cosine[mask].mean().item(), 4),
                "unseen": round(cosine[~mask].mean().item(), 4),
            },
        }
        seen_ids = torch.tensor(ctx.prompts.seen_classes, device=test.images.device)
        with torch.no_grad():
            unseen = test.images[~mask]
            as_seen = {
                name: round(100.0 * torch.isin(model(unseen).argmax(-1), seen_ids).float().mean().item(), 2)
                for name, model in (("original", ctx.base), ("fine_tuned", self.classifier))
            }
        # How often clean unseen-class test digits are labelled with a seen class (%): the label prior
        # that fine-tuning on seen classes only can teach.
        out["unseen_test_predicted_as_seen_class"] = as_seen
        if ctx.sets.transfer is not None:
            with torch.no_grad():
                t = ctx.sets.transfer.images
                out["clean_embedding_cosine_to_original"]["transfer"] = round(
                    F.cosine_similarity(self.classifier.embed(t), ctx.base.embed(t), dim=-1).mean().item(), 4
                )
        return out


class TeCoA(AdversarialFineTuning):
    """TeCoA: text-guided contrastive adversarial fine-tuning of the image encoder (Mao et al., 2023)."""

    id = "tecoa"

    def attack_objective(self, batch: Batch, x_adv: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self._logits(x_adv), batch["labels"])

    def training_loss(self, batch: Batch, x_adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss = F.cross_entropy(self._logits(x_adv), batch["labels"])
        return loss, {"ce_adv": loss.item()}


class PMGAFT(AdversarialFineTuning):
    """PMG-AFT: TeCoA plus KL guidance by the frozen pre-trained model and by the clean outputs
    (Wang et al., 2024).

    Args:
        alpha: weight of the generalisation term KL(p_tuned(x_adv) || p_original(x_adv)).
        beta: weight of the clean term KL(p_tuned(x_adv) || p_tuned(x)).
        kl_reduction: ``batchmean`` (the paper's formula with per-image KL averaged like the
            cross-entropy) or ``sum`` over the batch as the official code (``KLDivLoss(reduction="sum")``,
            which weights both KL terms by the batch size).
    """

    id = "pmg-aft"

    def __init__(
        self,
        config: FineTuneConfig | None = None,
        alpha: float = 1.0,
        beta: float = 1.0,
        kl_reduction: str = "batchmean",
    ) -> None:
        super().__init__(config)
        if kl_reduction not in {"sum", "batchmean"}:
            raise ValueError(f"kl_reduction must be 'sum' or 'batchmean', not {kl_reduction!r}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.kl_reduction = kl_reduction

    @classmethod
    def extra_keys(cls) -> tuple[str, ...]:
        return ("alpha", "beta", "kl_reduction")

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "alpha": self.alpha, "beta": self.beta, "kl_reduction": self.kl_reduction}

    def attack_objective(self, batch: Batch, x_adv: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self._logits(x_adv), batch["labels"])

    def training_loss(self, batch: Batch, x_adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        assert self.original is not None
        logits_adv = self._logits(x_adv)
        logits_clean = self._logits(batch["images"])
        with torch.no_grad():
            logits_original = self._logits(x_adv, self.original)
        ce = F.cross_entropy(logits_adv, batch["labels"])
        general = _kl(logits_adv, logits_original, self.kl_reduction)
        clean = _kl(logits_adv, logits_clean, self.kl_reduction)
        loss = ce + self.alpha * general + self.beta * clean
        return loss, {"ce_adv": ce.item(), "kl_general": general.item(), "kl_clean": clean.item()}


class FARE(AdversarialFineTuning):
    """FARE: unsupervised adversarial fine-tuning towards the original clean embeddings
    (Schlarmann et al., 2024). Labels are never read (only for the logged training accuracy)."""

    id = "fare"
    needs_labels = False

    @classmethod
    def default_config(cls) -> FineTuneConfig:
        return FineTuneConfig(optimizer="adamw", lr=1e-3, weight_decay=1e-4)

    def reference(self, batch: Batch) -> Batch:
        assert self.original is not None
        clip = self.original.clip
        return {**batch, "original": clip.model.encode_image(clip.normalize(batch["images"]))}

    def _distance(self, batch: Batch, x_adv: torch.Tensor) -> torch.Tensor:
        return (self._features(x_adv) - batch["original"]).pow(2).sum(dim=-1).mean()

    def attack_objective(self, batch: Batch, x_adv: torch.Tensor) -> torch.Tensor:
        return self._distance(batch, x_adv)

    def training_loss(self, batch: Batch, x_adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss = self._distance(batch, x_adv)
        return loss, {"l2_sq_adv": loss.item()}


DEFENSES: dict[str, type[AdversarialFineTuning]] = {d.id: d for d in (TeCoA, PMGAFT, FARE)}


def make_defense(method: str, params: dict[str, Any]) -> AdversarialFineTuning:
    """The defense of catalog id ``method`` with ``params``' overrides."""
    return DEFENSES[method].from_params(params)


# ---- notebook helpers ----------------------------------------------------------------------------


def seen_unseen_table(result: Any, baseline: Any | None = None) -> str:
    """Markdown: clean and worst-case robust accuracy at the headline ε on seen, unseen and transfer
    images, for the defense and the baseline (the generalisation question of adversarial fine-tuning)."""
    rows = [
        "| model | clean seen | clean unseen | clean transfer | robust seen | robust unseen | robust transfer |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def fmt(value: float | None) -> str:
        return "–" if value is None else f"{value:.1f}"

    for label, record in (("baseline (undefended)", baseline), (getattr(result, "method", "defense"), result)):
        if record is None or record.headline is None or record.clean is None:
            continue
        entries = [r for r in record.robust_at(record.headline["eps"]["value"]) if not r.adaptive]

        def worst(split: str, entries: list[Any] = entries) -> float | None:
            values = [getattr(r.acc, split) for r in entries if getattr(r.acc, split) is not None]
            return min(values) if values else None

        c = record.clean
        rows.append(
            f"| {label} | {fmt(c.seen)} | {fmt(c.unseen)} | {fmt(c.transfer)} | {fmt(worst('seen'))} | "
            f"{fmt(worst('unseen'))} | {fmt(worst('transfer'))} |"
        )
    eps = result.headline["eps"]["display"] if result.headline else "?"
    return f"Robust: worst case over the profile's attacks at ε = {eps}.\n\n" + "\n".join(rows)


def plot_training(history: list[dict[str, float]], title: str = "") -> Any:
    """Training loss (and its components) and the adversarial accuracy on training batches, per epoch."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    epochs = [h["epoch"] for h in history]
    for key in history[0] if history else []:
        if key in {"epoch", "train_adv_acc"}:
            continue
        axes[0].plot(epochs, [h[key] for h in history], marker=".", label=key)
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("mean over the epoch")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    axes[1].plot(epochs, [h.get("train_adv_acc") for h in history], marker=".")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("accuracy on PGD training images (%)")
    axes[1].set_ylim(-2, 102)
    axes[1].grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
