"""R-Adapt — adversarial robustness adaptation of CLIP's first layers (Nie et al., arXiv 2603.12799).

Every pre-trained weight stays frozen; two light pieces are added at the front of the image tower:

* a **Gaussian input filter**: the [0, 1] image is low-pass filtered in the frequency domain,
  ``H(u, v) = exp(-D(u, v)² / (2·D0²))`` with ``D`` the distance of a frequency from the DC term
  (cycles per image), before normalisation and the patch embedding;
* a **fixed robustness anchor** in the first transformer block only: the multi-head self-attention
  output ``A`` (one vector per token) is replaced by the linear combination ``A + α·anchor``
  (``mix: additive``, the default) or ``(1 - α)·A + α·anchor`` (``mix: convex``) before the block's
  residual addition.

The anchor comes from the standard CLIP's first-block attention response to a uniform white image
(``variant: clip``, training-free) or is optimised from that start on adversarial images of the seen
classes with the backbone frozen (``variant: plus``, R-Adapt+): every batch is attacked on the fly (L∞
PGD through the whole adapted pipeline) and only the anchor takes an optimiser step. The paper's anchor
objective is not public; ``loss: embedding`` (default) pulls the adapted embedding of the adversarial
image towards the original model's embedding of the clean image (FARE's objective, no labels), ``loss:
ce`` is the zero-shot cross-entropy against the class prompts (TeCoA's). No code has been released, so
every such choice is an assumption listed in the catalog entry.

At inference: one forward pass of the adapted tower against the frozen class text embeddings, attacked
white-box through the filter and the anchor as a ``static`` defense.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

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
from vlmdefense.workbench.models import set_seed
from vlmdefense.workbench.schedule import warmup_cosine_lr

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData
    from vlmdefense.workbench.clip import LoadedClip
    from vlmdefense.workbench.evaluation import ZeroShotClassifier


@dataclass
class RAdaptConfig:
    """R-Adapt's hyperparameters (the profile's parameters of the same names override them).

    Attributes:
        variant: ``plus`` (R-Adapt+, the anchor optimised on adversarial images) or ``clip`` (the
            training-free anchor read off the standard CLIP with a white image).
        alpha: mixing weight of the anchor (the paper's ablation sweeps 0-2 and marks 0.8-1.2).
        mix: ``additive`` — ``A + α·anchor`` — or ``convex`` — ``(1 - α)·A + α·anchor``. The paper's α
            sweep (0-2) keeps the white-image variant's clean accuracy nearly flat while robustness
            rises, which fits the additive reading; the convex one replaces ``A`` entirely at α = 1.
        cutoff: the filter's D0 in cycles per image; ``0`` switches the filter off. The paper's
            ablation marks D0 = 30-40 at 224 px; 2.5 is 35 scaled to the 16-px images.
        loss: anchor objective of R-Adapt+: ``embedding`` (squared L2 to the original clean embedding)
            or ``ce`` (zero-shot cross-entropy against the class prompts).
        epochs, train_batch_size, lr, weight_decay, warmup_fraction: the anchor's Adam schedule.
        train_eps: ε of the training attack; default the profile's headline ε.
        steps, step_size: PGD of the training attack (step default: ``train_eps``).
        train_text: classes in the ``ce`` softmax: ``all`` class names or ``seen``.
        train_limit: train on the first ``train_limit`` seen-class images (the paper: about 2k images).
        seed: seed of the batch order and PGD's random start.
    """

    variant: str = "plus"
    alpha: float = 1.0
    mix: str = "additive"
    cutoff: float = 2.5
    loss: str = "embedding"
    epochs: int = 10
    train_batch_size: int = 64
    lr: float = 0.01
    weight_decay: float = 0.0
    warmup_fraction: float = 0.1
    train_eps: float | None = None
    steps: int = 2
    step_size: float | None = None
    train_text: str = "all"
    train_limit: int | None = None
    seed: int = 0


def gaussian_lowpass(images: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Images filtered by ``exp(-D²/(2·cutoff²))`` in the frequency domain (``D``: cycles per image
    from the DC term; the DC gain is 1, so a constant image is unchanged). Differentiable."""
    h, w = images.shape[-2:]
    fy = torch.fft.fftfreq(h, d=1.0 / h, device=images.device)
    fx = torch.fft.fftfreq(w, d=1.0 / w, device=images.device)
    transfer = torch.exp(-(fy[:, None] ** 2 + fx[None, :] ** 2) / (2.0 * cutoff**2))
    return torch.fft.ifft2(torch.fft.fft2(images) * transfer.to(images.dtype)).real


class AdaptedTower(nn.Module):
    """The frozen image tower of an open_clip ViT with R-Adapt's filter and first-block anchor.

    Args:
        clip: the model (its weights are used, never changed or copied).
        cutoff: D0 of the input filter; ``0``: no filter.
        alpha: the anchor's mixing weight; ``0``: the original first block.
        mix: ``convex`` or ``additive``.
    """

    def __init__(self, clip: LoadedClip, cutoff: float, alpha: float, mix: str) -> None:
        super().__init__()
        visual = clip.model.visual
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise ValueError("R-Adapt's tower supports ViTs pooled at the class token")
        if mix not in {"convex", "additive"}:
            raise ValueError(f"mix must be 'convex' or 'additive', not {mix!r}")
        self.clip = clip
        self.visual = visual
        self.cutoff = cutoff
        self.alpha = alpha
        self.mix = mix

    def blocks(self) -> list[Any]:
        """The residual attention blocks of the tower."""
        return list(self.visual.transformer.resblocks)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Filtered, normalised images → the first block's input tokens ``(N, T, width)``."""
        v = self.visual
        x = gaussian_lowpass(images, self.cutoff) if self.cutoff > 0 else images
        x = v.conv1(self.clip.normalize(x))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(v.patch_dropout(x))

    def first_attention(self, tokens: torch.Tensor) -> torch.Tensor:
        """The first block's self-attention output (before the residual addition)."""
        block = self.blocks()[0]
        return block.attention(q_x=block.ln_1(tokens))

    def mixed(self, attention: torch.Tensor, anchor: torch.Tensor | None) -> torch.Tensor:
        """The attention response with the anchor mixed in."""
        if anchor is None or self.alpha == 0:
            return attention
        anchor = anchor.unsqueeze(0).to(attention.dtype)
        if self.mix == "convex":
            return (1.0 - self.alpha) * attention + self.alpha * anchor
        return attention + self.alpha * anchor

    def forward(self, images: torch.Tensor, anchor: torch.Tensor | None, normalize: bool = True) -> torch.Tensor:
        """Image embeddings of [0, 1] ``images`` with ``anchor`` ``(T, width)`` in the first block."""
        v = self.visual
        blocks = self.blocks()
        x = self.tokens(images)
        first = blocks[0]
        x = x + first.ls_1(self.mixed(self.first_attention(x), anchor))
        x = x + first.ls_2(first.mlp(first.ln_2(x)))
        for block in blocks[1:]:
            x = block(x)
        pooled = v.ln_post(x)[:, 0]
        if v.proj is not None:
            pooled = pooled @ v.proj
        return F.normalize(pooled, dim=-1) if normalize else pooled


def white_image_anchor(tower: AdaptedTower) -> torch.Tensor:
    """The training-free anchor: the first-block attention response ``(T, width)`` to a uniform white
    image (the filter leaves a constant image unchanged)."""
    size = tower.clip.image_size
    white = torch.ones(1, 3, size, size, device=tower.clip.device)
    with torch.no_grad():
        return tower.first_attention(tower.tokens(white))[0].detach().clone()


class RAdapt(ConfiguredDefense):
    """R-Adapt: a Gaussian input filter and a first-block robustness anchor on the frozen CLIP."""

    id = "r-adapt"
    kind = "static"
    needs_labels: ClassVar[bool] = False
    config_class: ClassVar[type] = RAdaptConfig
    config: RAdaptConfig

    def __init__(self, config: RAdaptConfig | None = None) -> None:
        super().__init__(config)
        c = self.config
        if c.variant not in {"plus", "clip"}:
            raise ValueError(f"variant must be 'plus' or 'clip', not {c.variant!r}")
        if c.loss not in {"embedding", "ce"}:
            raise ValueError(f"loss must be 'embedding' or 'ce', not {c.loss!r}")
        self.tower: AdaptedTower | None = None
        self.base: ZeroShotClassifier | None = None
        self.anchor: torch.Tensor | None = None
        self.initial_anchor: torch.Tensor | None = None
        self.history: list[dict[str, float]] = []

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        """The quick profile's budget: one epoch over 128 images, one PGD step."""
        return {"epochs": 1, "steps": 1, "train_limit": 128}

    def bind(self, base: ZeroShotClassifier, anchor: torch.Tensor | None = None) -> None:
        """Adapt the frozen ``base`` classifier with ``anchor`` (default: the white-image anchor)."""
        c = self.config
        self.base = base
        self.tower = AdaptedTower(base.clip, c.cutoff, c.alpha, c.mix)
        self.initial_anchor = white_image_anchor(self.tower)
        self.anchor = (self.initial_anchor if anchor is None else anchor).detach().clone()

    def logits(self, images: torch.Tensor, anchor: torch.Tensor | None = None) -> torch.Tensor:
        """Zero-shot logits over all classes of the adapted tower (``anchor``: default the fitted one)."""
        if self.tower is None or self.base is None:
            raise RuntimeError("R-Adapt: call fit first")
        return self.base.logits_from_embeddings(self.tower(images, self.anchor if anchor is None else anchor))

    def fit(self, data: FitData) -> dict[str, Any]:
        """Read the white-image anchor; for R-Adapt+ optimise it on adversarial seen-class images."""
        start = time.perf_counter()
        c = self.config = with_training_eps(self.config, data.headline.value)
        assert c.train_eps is not None
        set_seed(c.seed)
        self.bind(data.base)
        assert self.tower is not None and self.anchor is not None
        self.history = []
        if c.variant == "plus":
            train = data.seen_train.head(c.train_limit)
            classes = training_classes(data.prompts, c.train_text)
            anchor = nn.Parameter(self.anchor.clone())
            loop = AdversarialLoop(
                epochs=c.epochs,
                batch_size=c.train_batch_size,
                seed=c.seed,
                attack=inner_attack(c.train_eps, c.steps, c.step_size if c.step_size is not None else c.train_eps),
                optimizer=torch.optim.Adam([anchor], lr=c.lr, weight_decay=c.weight_decay),
                schedule=lambda step, epoch, total: warmup_cosine_lr(step, total, c.lr, c.warmup_fraction),
            )
            task = AnchorTask(self, anchor, classes, c.loss)
            self.history = loop.run(task, train.images, training_labels(train, data.prompts, classes))
            self.anchor = anchor.detach().clone()
        return self.summary(data, time.perf_counter() - start)

    # ---- inference -------------------------------------------------------------------------------

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        self.counter.forward += len(images)
        self.counter.images += len(images)
        return self.logits(images)

    # ---- findings --------------------------------------------------------------------------------

    def summary(self, data: FitData, seconds: float) -> dict[str, Any]:
        """Hyperparameters, the loss curve, how far the anchor moved, and how far the adapted clean
        embeddings are from the original's (seen vs unseen test digits)."""
        assert self.tower is not None and self.anchor is not None and self.initial_anchor is not None
        test = data.sets.test
        mask = seen_mask(test.labels.cpu(), data.prompts.seen_classes).to(test.images.device)
        with torch.no_grad():
            cosine = F.cosine_similarity(self.tower(test.images, self.anchor), data.base.embed(test.images), dim=-1)
            response = self.tower.first_attention(self.tower.tokens(test.images))
        moved = (self.anchor - self.initial_anchor).norm(dim=-1)
        return {
            "method": self.id,
            "hyperparameters": self.hyperparameters(),
            "train_images": len(data.seen_train.head(self.config.train_limit)) if self.config.variant == "plus" else 0,
            "train_classes": list(data.prompts.seen_classes),
            "fit_seconds": round(seconds, 2),
            "anchor_parameters": int(self.anchor.numel()),
            "loss_curve": self.history,
            "first_epoch": self.history[0] if self.history else None,
            "last_epoch": self.history[-1] if self.history else None,
            "anchor_norm": {
                "white_image": round(float(self.initial_anchor.norm(dim=-1).mean()), 4),
                "learned": round(float(self.anchor.norm(dim=-1).mean()), 4),
                "moved": round(float(moved.mean()), 4),
                "test_attention_response": round(float(response.norm(dim=-1).mean()), 4),
            },
            "clean_embedding_cosine_to_original": {
                "seen": round(cosine[mask].mean().item(), 4),
                "unseen": round(cosine[~mask].mean().item(), 4),
            },
        }


AnchorBatch = dict[str, torch.Tensor]


class AnchorTask(AdversarialTask[AnchorBatch]):
    """R-Adapt+ in the shared loop: PGD through the adapted pipeline with the current anchor, then one
    step on the anchor only (the towers and the class embeddings are frozen)."""

    def __init__(self, defense: RAdapt, anchor: nn.Parameter, classes: list[int], loss: str) -> None:
        assert defense.base is not None and defense.tower is not None
        self.defense = defense
        self.anchor = anchor
        self.classes = classes
        self.loss = loss

    def prepare(self, images: torch.Tensor, labels: torch.Tensor) -> AnchorBatch:
        assert self.defense.base is not None
        clip = self.defense.base.clip
        return {"images": images, "labels": labels, "original": clip.model.encode_image(clip.normalize(images))}

    def objective(self, state: AnchorBatch, x: torch.Tensor) -> torch.Tensor:
        """The anchor's loss at ``x`` (the attack maximises it, the anchor minimises it)."""
        assert self.defense.tower is not None and self.defense.base is not None
        if self.loss == "embedding":
            features = self.defense.tower(x, self.anchor, normalize=False)
            return (features - state["original"]).pow(2).sum(dim=-1).mean()
        logits = self.defense.base.logits_from_embeddings(self.defense.tower(x, self.anchor))
        return F.cross_entropy(logits[:, self.classes], state["labels"])

    def attack_objective(self, state: AnchorBatch, x: torch.Tensor) -> torch.Tensor:
        return self.objective(state, x)

    def training_loss(self, state: AnchorBatch, x_adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss = self.objective(state, x_adv)
        return loss, {f"{self.loss}_adv": loss.item() * len(x_adv)}

    def after_step(self, state: AnchorBatch, x_adv: torch.Tensor) -> dict[str, float]:
        logits = self.defense.logits(x_adv, self.anchor.detach())[:, self.classes]
        return {"train_adv_acc": 100.0 * (logits.argmax(-1) == state["labels"]).float().sum().item()}


def ablation(defense: RAdapt, data: FitData, alphas: tuple[float, ...] = (0.0, 1.0, 2.0)) -> dict[str, Any]:
    """Clean and PGD accuracy (headline ε, the profile's sweep steps) of the filter and anchor alone and
    together (the paper's Table 6), and of the learned and white-image anchors over ``alphas`` (the
    paper's α sweep): every configuration on the same frozen backbone, attacked white-box."""
    import dataclasses

    from vlmdefense.workbench.attacks import PGD
    from vlmdefense.workbench.evaluation import clean_accuracy, robust_accuracy

    assert defense.anchor is not None and defense.initial_anchor is not None
    attack = PGD(eps=data.headline.value, steps=data.sweep_steps)
    c = defense.config

    def measure(cutoff: float, alpha: float, anchor: torch.Tensor) -> dict[str, Any]:
        probe = RAdapt(dataclasses.replace(c, cutoff=cutoff, alpha=alpha))
        probe.bind(data.base, anchor)
        clean = clean_accuracy(probe.predict, data.sets, data.batch_size)
        set_seed(data.seed)
        robust, _ = robust_accuracy(probe.predict, probe.predict, attack, data.sets, data.batch_size)
        return {"clean": clean.as_dict(), "robust": robust.as_dict()}

    learned, white = defense.anchor, defense.initial_anchor
    return {
        "eps": data.headline.display,
        "attack": attack.name,
        "components": {
            "none": measure(0.0, 0.0, learned),
            "filter_only": measure(c.cutoff, 0.0, learned),
            "anchor_only": measure(0.0, c.alpha, learned),
            "both": measure(c.cutoff, c.alpha, learned),
        },
        "alpha_sweep": {
            name: {str(a): measure(c.cutoff, a, anchor) for a in alphas}
            for name, anchor in (("learned", learned), ("white_image", white))
        },
    }
