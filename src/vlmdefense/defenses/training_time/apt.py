"""APT — adversarial prompt tuning of CLIP's text context (Li et al., CVPR 2024).

Both encoders stay frozen; only the context vectors of the class prompt
(``<SOT> ctx_1 … ctx_M <class name> . <EOT>``, :class:`~vlmdefense.defenses.prompt_learner.PromptLearner`)
are learned. Every training batch of the seen classes' images is first perturbed by an L∞ PGD attack
(uniform random start, ``steps`` signed steps of ``step_size``) against the *current* prompt-based
zero-shot classifier — the official "on-the-fly" strategy — and the context then takes one SGD step
on the cross-entropy of the zero-shot logits of the perturbed images. At inference the learned prompt
replaces the hand-written templates: one forward pass of the image tower, attacked white-box as a
``static`` defense.

The paper tunes the prompt on top of an adversarially fine-tuned (TeCoA) CLIP, which is also the
default here (``backbone: tecoa``): a TeCoA copy of the image tower is fine-tuned first on the same
seen-class images with :class:`~vlmdefense.defenses.training_time.tecoa.TeCoA`'s defaults, then frozen, and
the hand-written prompt ensemble on that backbone is the comparison that isolates the prompt's
effect. ``backbone: original`` tunes the prompt on the undefended small CLIP instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vlmdefense.defenses.base import ConfiguredDefense
from vlmdefense.defenses.prompt_learner import ContextInit, PromptLearner
from vlmdefense.defenses.training_loop import (
    AdversarialLoop,
    AdversarialTask,
    inner_attack,
    training_classes,
    training_labels,
    with_training_eps,
)
from vlmdefense.defenses.training_time.tecoa import TeCoA
from vlmdefense.workbench.evaluation import ZeroShotClassifier
from vlmdefense.workbench.models import set_seed
from vlmdefense.workbench.schedule import dassl_lr

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData


@dataclass
class APTConfig:
    """APT's hyperparameters (the profile's parameters of the same names override them).

    Official defaults (README example, ``configs/trainers/APT/vit_b32_ep50.yaml``, ``train.py``): 16
    unified context vectors, random N(0, 0.02²) start, class token at the end; SGD (momentum 0.9,
    weight decay 5e-4), lr 0.002, cosine schedule with one constant warm-up epoch at 1e-5, 50 epochs,
    batch 32; training attack PGD-3 with ε = 4/255 and step 2.67/255 (2/3 ε), on the fly against the
    current prompt.

    Attributes:
        n_ctx: context vectors (the small CLIP's 16-token text context holds at most 12 besides the
            class name; 8 is used).
        ctx_init: ``random`` (official) or a template such as ``a photo of the digit {name}.`` whose
            words before the class name start the context.
        csc: class-specific contexts instead of one unified context (the paper's CSC variant).
        epochs: passes over the seen classes' training images.
        train_batch_size: images per step.
        lr: peak SGD learning rate.
        momentum, weight_decay: SGD settings (Dassl's defaults).
        warmup_epochs: epochs at the constant warm-up rate ``warmup_lr`` before the cosine schedule.
        warmup_lr: the warm-up learning rate.
        train_eps: ε of the training attack; default the profile's headline ε.
        steps: PGD steps of the training attack.
        step_size: PGD step; default ``2/3 · train_eps`` (the official 2.67/255 at 4/255).
        train_text: classes in the training softmax: ``all`` class names (images still come from the
            seen classes only) or ``seen``.
        backbone: ``tecoa`` (the paper's frozen adversarially fine-tuned CLIP, fine-tuned here first
            on the seen classes) or ``original`` (the undefended small CLIP).
        backbone_epochs: TeCoA epochs for ``backbone: tecoa`` (default: TeCoA's own default).
        seed: seed of the batch order, the random start and PGD's noise.
    """

    n_ctx: int = 8
    ctx_init: str = "random"
    csc: bool = False
    epochs: int = 20
    train_batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    train_eps: float | None = None
    steps: int = 3
    step_size: float | None = None
    train_text: str = "all"
    backbone: str = "tecoa"
    backbone_epochs: int | None = None
    seed: int = 0


class APT(ConfiguredDefense):
    """Adversarial prompt tuning (Li et al., CVPR 2024): a learned text context on frozen encoders."""

    id = "apt"
    kind = "static"
    config_class = APTConfig
    config: APTConfig

    def __init__(self, config: APTConfig | None = None) -> None:
        super().__init__(config)
        self.learner: PromptLearner | None = None
        self.ctx: torch.Tensor | None = None
        self.classifier: ZeroShotClassifier | None = None
        self.backbone_classifier: ZeroShotClassifier | None = None
        self.history: list[dict[str, float]] = []

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        """The quick profile's budget: one epoch without warm-up, one PGD step, a one-epoch backbone."""
        return {"epochs": 1, "warmup_epochs": 0, "steps": 1, "backbone_epochs": 1, "train_batch_size": 128}

    # ---- the backbone ------------------------------------------------------------------------------

    def _backbone(self, data: FitData) -> tuple[ZeroShotClassifier, dict[str, Any]]:
        """The frozen classifier whose towers the prompt is tuned on (hand-written prompt ensemble),
        with the findings on the backbone (none for the original model)."""
        c = self.config
        if c.backbone == "original":
            return data.base, {}
        if c.backbone != "tecoa":
            raise ValueError(f"backbone must be 'tecoa' or 'original', not {c.backbone!r}")
        params: dict[str, Any] = {"fast": data.params.get("fast", False), "seed": c.seed}
        if c.backbone_epochs is not None:
            params["epochs"] = c.backbone_epochs
        tecoa = TeCoA.from_params(params)
        backbone_findings = tecoa.fit(data)
        assert tecoa.classifier is not None
        findings = {
            "backbone": {
                "method": "tecoa",
                "hyperparameters": backbone_findings.get("hyperparameters"),
                "fit_seconds": backbone_findings.get("fit_seconds"),
                "last_epoch": backbone_findings.get("last_epoch"),
            }
        }
        return tecoa.classifier, findings

    # ---- training ----------------------------------------------------------------------------------

    def text_weights(self, ctx_vectors: torch.Tensor | None = None) -> torch.Tensor:
        """Unit class embeddings of the learned (or given) context."""
        if self.learner is None:
            raise RuntimeError("APT: call fit first")
        return self.learner(self.ctx if ctx_vectors is None else ctx_vectors)

    def fit(self, data: FitData) -> dict[str, Any]:
        """Tune the context on adversarial images of the seen classes (``data.seen_train`` only)."""
        start = time.perf_counter()
        c = self.config = with_training_eps(self.config, data.headline.value)
        assert c.train_eps is not None
        step_size = c.step_size if c.step_size is not None else 2.0 * c.train_eps / 3.0
        set_seed(c.seed)
        backbone, findings = self._backbone(data)
        backbone_seconds = time.perf_counter() - start
        self.backbone_classifier = backbone
        clip = backbone.clip
        init = ContextInit(n_ctx=c.n_ctx, random=True) if c.ctx_init == "random" else ContextInit(template=c.ctx_init)
        self.learner = PromptLearner(clip, data.prompts, init).to(data.device)
        start_ctx = self.learner.ctx_init.clone()
        if c.csc:
            start_ctx = start_ctx.unsqueeze(0).repeat(self.learner.n_classes, 1, 1)
        context = torch.nn.Parameter(start_ctx)
        train = data.seen_train
        classes = training_classes(data.prompts, c.train_text)
        loop = AdversarialLoop(
            epochs=c.epochs,
            batch_size=c.train_batch_size,
            seed=c.seed,
            attack=inner_attack(c.train_eps, c.steps, step_size),
            optimizer=torch.optim.SGD([context], lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
            schedule=lambda step, epoch, total: dassl_lr(epoch, c.epochs, c.lr, c.warmup_epochs, c.warmup_lr),
        )
        tune_start = time.perf_counter()
        task = _PromptTask(backbone, self.learner, context, classes)
        self.history = loop.run(task, train.images, training_labels(train, data.prompts, classes))
        self.ctx = context.detach()
        with torch.no_grad():
            weights = self.learner(self.ctx)
        self.classifier = ZeroShotClassifier(clip, data.prompts, text_weights=weights).to(data.device)
        for parameter in self.classifier.parameters():
            parameter.requires_grad_(False)
        return {**findings, **self.summary(data, backbone_seconds, time.perf_counter() - tune_start)}

    # ---- inference ---------------------------------------------------------------------------------

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            raise RuntimeError("APT: call fit first")
        self.counter.forward += len(images)
        self.counter.images += len(images)
        return self.classifier(images)

    # ---- findings ----------------------------------------------------------------------------------

    def summary(self, data: FitData, backbone_seconds: float, tune_seconds: float) -> dict[str, Any]:
        """Hyperparameters, the loss curve, how far the context moved, and what the learned prompt
        changes in the class embeddings."""
        assert self.learner is not None and self.ctx is not None and self.backbone_classifier is not None
        init = self.learner.ctx_init
        moved = self.ctx - (init if self.ctx.dim() == 2 else init.unsqueeze(0))
        with torch.no_grad():
            learned = self.learner(self.ctx)
            hand = self.backbone_classifier.text_weights
            cosine = F.cosine_similarity(learned, hand, dim=-1)
            gram = learned @ learned.T
            off_diagonal = gram[~torch.eye(len(gram), dtype=torch.bool, device=gram.device)]
        return {
            "method": self.id,
            "hyperparameters": self.hyperparameters(),
            "train_images": len(data.seen_train),
            "train_classes": list(data.prompts.seen_classes),
            "backbone_seconds": round(backbone_seconds, 2),
            "prompt_tuning_seconds": round(tune_seconds, 2),
            "prompt_parameters": int(self.ctx.numel()),
            "initial_prompt": self.learner.prompt_texts[0],
            "loss_curve": self.history,
            "first_epoch": self.history[0] if self.history else None,
            "last_epoch": self.history[-1] if self.history else None,
            "context_norm": {
                "initial": round(float(init.norm(dim=-1).mean()), 4),
                "learned": round(float(self.ctx.norm(dim=-1).mean()), 4),
                "moved": round(float(moved.norm(dim=-1).mean()), 4),
            },
            "class_embedding_cosine_to_hand_prompts": [round(float(v), 4) for v in cosine],
            "mean_cosine_between_learned_class_embeddings": round(float(off_diagonal.mean()), 4),
        }


PromptBatch = tuple[torch.Tensor, torch.Tensor]


class _PromptTask(AdversarialTask[PromptBatch]):
    """APT in the loop: PGD against the current prompt's zero-shot classifier (on the fly), then the
    cross-entropy of the perturbed images' zero-shot logits (only the context receives gradients)."""

    def __init__(
        self, backbone: ZeroShotClassifier, learner: PromptLearner, context: torch.nn.Parameter, classes: list[int]
    ) -> None:
        self.backbone = backbone
        self.learner = learner
        self.context = context
        self.classes = classes
        self.scale = backbone.logit_scale

    def prepare(self, images: torch.Tensor, labels: torch.Tensor) -> PromptBatch:
        return self.learner(self.context)[self.classes], labels

    def attack_objective(self, state: PromptBatch, x: torch.Tensor) -> torch.Tensor:
        weights, labels = state
        return F.cross_entropy(self.scale * self.backbone.embed(x) @ weights.T, labels)

    def training_loss(self, state: PromptBatch, x_adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        _, labels = state
        with torch.no_grad():
            features = self.backbone.embed(x_adv)
        logits = self.scale * features @ self.learner(self.context)[self.classes].T
        loss = F.cross_entropy(logits, labels)
        return loss, {"train_adv_acc": 100.0 * (logits.argmax(-1) == labels).float().sum().item()}


def hand_prompt_robustness(data: FitData, defense: APT, steps: int | None = None) -> dict[str, Any]:
    """Clean and PGD accuracy (at the headline ε, the profile's sweep steps) of the *same backbone*
    with the hand-written prompt ensemble and with the learned prompt: the prompt's own contribution."""
    from vlmdefense.workbench.attacks import PGD
    from vlmdefense.workbench.evaluation import clean_accuracy, robust_accuracy

    assert defense.backbone_classifier is not None
    steps = data.sweep_steps if steps is None else steps
    attack = PGD(eps=data.headline.value, steps=steps)
    out: dict[str, Any] = {"eps": data.headline.display, "attack": attack.name}
    for name, predictor in (("hand_prompts", defense.backbone_classifier), ("learned_prompt", defense.predict)):
        clean = clean_accuracy(predictor, data.sets, data.params["batch_size"])
        set_seed(data.seed)
        robust, _ = robust_accuracy(predictor, predictor, attack, data.sets, data.params["batch_size"])
        out[name] = {"clean": clean.as_dict(), "robust": robust.as_dict()}
    return out
