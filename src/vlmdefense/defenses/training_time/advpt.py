"""AdvPT — adversarial prompt tuning against a bank of adversarial image embeddings (Zhang et al., ECCV 2024).

Both encoders stay frozen. Before any tuning, every training image is attacked *once* on the frozen
image tower alone, without labels or text: an L∞ PGD (positive-only random start ``U(0, ε)``,
``bank_steps`` signed steps of ``1.25 · ε / bank_steps``) maximises ``KL(softmax(e_clean) ‖ softmax(e_adv))``
between the raw (unnormalised) image embeddings of the clean and the perturbed image — the official ``attackFeature``
objective, read at the input of the surrogate's ``fc`` layer. The adversarial embeddings are stored
(the "adversarial embedding bank"), and CoOp-style context vectors
(:class:`~vlmdefense.defenses.prompt_learner.PromptLearner`) are then tuned with the cross-entropy of
the zero-shot logits of these stored embeddings only — no image-tower pass per step, which is what
makes AdvPT cheap. At inference the learned prompt replaces the hand-written templates: one image-tower
pass, attacked white-box end to end as a ``static`` defense (a stronger threat than the paper's, whose
test attack is the same prompt-agnostic embedding attack; :func:`embedding_attack_robustness` measures
that one as well).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vlmdefense.defenses.base import ConfiguredDefense
from vlmdefense.defenses.prompt_learner import ContextInit, PromptLearner
from vlmdefense.defenses.training_loop import training_classes, training_labels, with_training_eps
from vlmdefense.defenses.training_time.adversarial_prompts import kl_per_sample
from vlmdefense.workbench.attacks import objective_gradient
from vlmdefense.workbench.evaluation import ZeroShotClassifier
from vlmdefense.workbench.models import LoadedClip, set_seed
from vlmdefense.workbench.schedule import dassl_lr

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData


@dataclass
class AdvPTConfig:
    """AdvPT's hyperparameters (official ``train.py`` defaults and ``configs/trainers/AdvPT/vit_b16.yaml``).

    Official: 32 random-start context vectors (``N_CTX`` 32, ``CTX_INIT`` empty), class token at the end,
    unified context; SGD lr 0.002 with Dassl's constant warm-up epoch at 1e-5 then cosine, 100 epochs,
    32 embeddings per batch; the bank attack is PGD-10 at ε = 8/255 (``TRAIN_EPS``).

    Attributes:
        n_ctx: context vectors (the small CLIP's 16-token context holds at most 12; 8 as APT).
        csc: class-specific contexts.
        epochs, train_batch_size: passes over the bank and embeddings per step.
        lr, momentum, weight_decay, warmup_epochs, warmup_lr: SGD and the schedule.
        train_eps: ε of the bank attack; default the profile's headline ε (8/255 as the official).
        bank_steps: PGD steps of the bank attack (official 10; step ``1.25 · ε / bank_steps``).
        train_text: classes of the training softmax (``all`` class names, or ``seen``).
        seed: seed of the bank's random start, the context start and the batch order.
    """

    n_ctx: int = 8
    csc: bool = False
    epochs: int = 100
    train_batch_size: int = 32
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    train_eps: float | None = None
    bank_steps: int = 10
    train_text: str = "all"
    seed: int = 0


def raw_embeddings(clip: LoadedClip, images: torch.Tensor) -> torch.Tensor:
    """The image tower's unnormalised embeddings of [0, 1] images."""
    return clip.model.encode_image(clip.normalize(images))


def feature_attack(
    clip: LoadedClip, images: torch.Tensor, eps: float, steps: int, batch_size: int = 256
) -> torch.Tensor:
    """AdvPT's label-free attack on the image tower (the official ``attackFeature.PGD``): L∞ PGD maximising
    ``KL(softmax(e_clean) ‖ softmax(e_adv))`` of the raw embeddings, started at ``x + U(0, eps)`` (the
    official positive-only start, not clipped before the first step), signed steps of
    ``1.25 · eps / steps``, each projected onto the ε-ball and [0, 1]; returns the adversarial images."""
    step = 1.25 * eps / max(1, steps)
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].detach()
        with torch.no_grad():
            clean = raw_embeddings(clip, x)

        def objective(z: torch.Tensor, clean: torch.Tensor = clean) -> torch.Tensor:
            return kl_per_sample(clean, raw_embeddings(clip, z)).sum()

        delta = torch.rand_like(x) * eps
        for _ in range(steps):
            delta = delta + step * objective_gradient(objective, x + delta).sign()
            delta = ((x + delta.clamp(-eps, eps)).clamp(0, 1) - x).detach()
        out.append((x + delta).clamp(0, 1))
    return torch.cat(out) if out else images.clone()


class AdvPT(ConfiguredDefense):
    """Adversarial prompt tuning on a bank of adversarial image embeddings (Zhang et al., ECCV 2024)."""

    id = "advpt"
    kind = "static"
    config_class = AdvPTConfig
    config: AdvPTConfig

    def __init__(self, config: AdvPTConfig | None = None) -> None:
        super().__init__(config)
        self.learner: PromptLearner | None = None
        self.ctx: torch.Tensor | None = None
        self.classifier: ZeroShotClassifier | None = None
        self.history: list[dict[str, float]] = []

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        """The quick profile: a 2-step bank attack, 2 epochs without warm-up, batches of 128."""
        return {"bank_steps": 2, "epochs": 2, "warmup_epochs": 0, "train_batch_size": 128}

    def build_bank(self, clip: LoadedClip, images: torch.Tensor) -> torch.Tensor:
        """The adversarial embedding bank: unit embeddings of the feature-attacked training images."""
        c = self.config
        assert c.train_eps is not None
        adversarial = feature_attack(clip, images, c.train_eps, c.bank_steps)
        with torch.no_grad():
            return F.normalize(raw_embeddings(clip, adversarial), dim=-1)

    def fit(self, data: FitData) -> dict[str, Any]:
        """Build the bank from the seen classes' training images, then tune the context on it."""
        start = time.perf_counter()
        c = self.config = with_training_eps(self.config, data.headline.value)
        set_seed(c.seed)
        train = data.seen_train
        bank = self.build_bank(data.clip, train.images)
        with torch.no_grad():
            clean = data.clip.encode_images(train.images)
        bank_seconds = time.perf_counter() - start
        self.learner = PromptLearner(data.clip, data.prompts, ContextInit(n_ctx=c.n_ctx, random=True)).to(data.device)
        start_ctx = self.learner.ctx_init.clone()
        if c.csc:
            start_ctx = start_ctx.unsqueeze(0).repeat(self.learner.n_classes, 1, 1)
        context = torch.nn.Parameter(start_ctx)
        classes = training_classes(data.prompts, c.train_text)
        labels = training_labels(train, data.prompts, classes)
        tune_start = time.perf_counter()
        self.history = self.tune(context, bank, clean, labels, classes, float(data.base.logit_scale))
        self.ctx = context.detach()
        with torch.no_grad():
            weights = self.learner(self.ctx)
        self.classifier = ZeroShotClassifier(data.clip, data.prompts, text_weights=weights).to(data.device)
        for parameter in self.classifier.parameters():
            parameter.requires_grad_(False)
        shift = F.cosine_similarity(bank, clean, dim=-1)
        return {
            "method": self.id,
            "hyperparameters": self.hyperparameters(),
            "train_images": len(train),
            "train_classes": list(data.prompts.seen_classes),
            "bank_seconds": round(bank_seconds, 2),
            "prompt_tuning_seconds": round(time.perf_counter() - tune_start, 2),
            "prompt_parameters": int(self.ctx.numel()),
            "bank_cosine_to_clean": {"mean": round(float(shift.mean()), 4), "min": round(float(shift.min()), 4)},
            "loss_curve": self.history,
            "first_epoch": self.history[0] if self.history else None,
            "last_epoch": self.history[-1] if self.history else None,
        }

    def tune(
        self,
        context: torch.nn.Parameter,
        bank: torch.Tensor,
        clean: torch.Tensor,
        labels: torch.Tensor,
        classes: list[int],
        scale: float,
    ) -> list[dict[str, float]]:
        """CoOp on the stored adversarial embeddings: SGD on their cross-entropy (the bank is never
        re-attacked); logs the loss and the accuracy on the bank and on the clean embeddings per epoch."""
        c = self.config
        assert self.learner is not None
        optimizer = torch.optim.SGD([context], lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        generator = torch.Generator().manual_seed(c.seed)
        history = []
        n = len(labels)
        for epoch in range(c.epochs):
            for group in optimizer.param_groups:
                group["lr"] = dassl_lr(epoch, c.epochs, c.lr, c.warmup_epochs, c.warmup_lr)
            order = torch.randperm(n, generator=generator).to(bank.device)
            loss_sum = correct = 0.0
            for b in range(0, n, c.train_batch_size):
                index = order[b : b + c.train_batch_size]
                logits = scale * bank[index] @ self.learner(context)[classes].T
                loss = F.cross_entropy(logits, labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() * len(index)
                correct += (logits.argmax(-1) == labels[index]).float().sum().item()
            with torch.no_grad():
                clean_acc = (clean @ self.learner(context)[classes].T).argmax(-1).eq(labels).float().mean().item()
            history.append(
                {
                    "epoch": epoch + 1,
                    "loss": round(loss_sum / n, 4),
                    "train_adv_acc": round(100.0 * correct / n, 4),
                    "train_clean_acc": round(100.0 * clean_acc, 4),
                }
            )
        return history

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            raise RuntimeError("AdvPT: call fit first")
        self.counter.forward += len(images)
        self.counter.images += len(images)
        return self.classifier(images)


def embedding_attack_robustness(data: FitData, defense: AdvPT, steps: int = 40) -> dict[str, Any]:
    """The paper's threat model: the test images attacked on the image tower alone (AdvPT's label-free
    KL feature attack, PGD-40 as the official test attack, at the headline ε; prompt-agnostic), then
    classified with the hand-written ensemble and with the learned prompt (accuracy in percent per split)."""
    from vlmdefense.workbench.evaluation import batched_correct, split_accuracy

    assert defense.classifier is not None
    set_seed(data.seed)
    test, transfer = data.sets.test, data.sets.transfer
    adv_test = feature_attack(data.clip, test.images, data.headline.value, steps)
    adv_transfer = None if transfer is None else feature_attack(data.clip, transfer.images, data.headline.value, steps)
    out: dict[str, Any] = {"eps": data.headline.display, "attack": f"feature-KL PGD-{steps} on the image tower"}
    for name, predictor in (("hand_prompts", data.base), ("learned_prompt", defense.predict)):
        correct = batched_correct(predictor, adv_test, test.labels, data.batch_size)
        transfer_correct = None
        if transfer is not None and adv_transfer is not None:
            transfer_correct = batched_correct(predictor, adv_transfer, transfer.labels, data.batch_size)
        out[name] = split_accuracy(correct, test.labels, data.prompts.seen_classes, transfer_correct).as_dict()
    return out
