"""TAPT — test-time adversarial prompt tuning (Wang et al., CVPR 2025).

Bimodal deep prompts ("VLI"), first learned by adversarial prompt tuning on the seen classes' training
images (the shared training loop); then, per test image, one AdamW step on the marginal entropy of the
most confident views plus the L1 alignment of those views' per-layer token means and variances with
reference statistics of clean and of adversarial training images; the tuned prompts classify the
unaugmented image. Adaptive attack: BPDA through the prompt update (see ``views.py``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vlmdefense.defenses.base import Predictor
from vlmdefense.defenses.prompt_learner import ContextInit, PromptLearner, Prompts, VisualOutput, VisualPromptEncoder
from vlmdefense.defenses.test_time_adaptation.views import (
    TestTimeDefense,
    accuracy,
    gather_views,
    marginal_entropy,
    most_confident,
    random_views,
)
from vlmdefense.defenses.training_loop import (
    AdversarialLoop,
    AdversarialTask,
    inner_attack,
    training_classes,
    training_labels,
    with_training_eps,
)
from vlmdefense.workbench.models import set_seed
from vlmdefense.workbench.schedule import cosine_lr

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData
    from vlmdefense.workbench.evaluation import ZeroShotClassifier


@dataclass
class TAPTConfig:
    """TAPT's hyperparameters (official TAPT-VLI defaults in brackets; the profile's parameters override).

    Prompts [``configs/trainers/TAPTVLI/*.yaml``: 2 text + 2 vision tokens, depth 9 of 12 layers in
    both towers, text start "a photo of a" with its first 2 tokens learnable]:

    Attributes:
        n_ctx_text: learnable text tokens (the first words of ``template``).
        template: the prompt template.
        depth_text: text layers receiving prompts (2 of the small CLIP's 2).
        n_ctx_vision: learnable visual tokens per layer.
        depth_vision: image layers receiving prompts (2 of 3, about the official 9 of 12).
        epochs, train_batch_size, lr, momentum, weight_decay_train: the adversarial prompt tuning
            that gives the initial prompts (the paper: 16-shot ImageNet, 100 epochs, batch 32, SGD lr
            0.035, in the authors' MMoP code).
        train_eps: ε of that training attack (default: the headline ε); train_steps, train_step_size:
            its PGD steps and step (default ``2/3 · train_eps``).
        stats_steps: PGD steps for the adversarial reference statistics.
        train_text: classes in the training softmax: ``all`` class names (images still come from the
            seen classes only; as the project's other training-time defenses) or ``seen`` only (CoOp's
            base-to-new protocol).
        n_views: inputs per test image [64].
        selection: fraction of lowest-entropy views for the entropy [TAPT_THRESHOLD 0.1].
        align_selection: fraction for the alignment statistics [ALIGN_THRESHOLD 0.1].
        steps: AdamW steps per image [1]; lr [5e-4]; weight_decay [0.01].
        align_weight: weight of the alignment term, divided by the number of aligned layers
            [DISTR_LOSS_W 100].
        align_layers: the first ``align_layers`` image blocks whose inputs are aligned [the code's
            ``range(0, 9 - 1)``: 8 of 12].
        gamma: weight of the adversarial statistics, ``1 - gamma`` of the clean ones [0.5].
        crop_scale_min: smallest area fraction of a random crop [RandomResizedCrop 0.08, plus flips].
        seed: seed of the adversarial prompt tuning.
    """

    n_ctx_text: int = 2
    template: str = "a photo of the digit {name}."
    depth_text: int = 2
    n_ctx_vision: int = 2
    depth_vision: int = 2
    epochs: int = 10
    train_batch_size: int = 32
    lr: float = 0.035
    momentum: float = 0.9
    weight_decay_train: float = 5e-4
    train_eps: float | None = None
    train_steps: int = 2
    train_step_size: float | None = None
    stats_steps: int = 10
    train_text: str = "all"
    n_views: int = 8
    selection: float = 0.25
    align_selection: float = 0.25
    steps: int = 1
    lr_tta: float = 5e-4
    weight_decay: float = 0.01
    align_weight: float = 100.0
    align_layers: int = 2
    gamma: float = 0.5
    crop_scale_min: float = 0.5
    seed: int = 0


class TAPT(TestTimeDefense):
    """TAPT (Wang et al., CVPR 2025): test-time adversarial prompt tuning of bimodal prompts with
    multi-view entropy and adversarial/clean token-statistics alignment."""

    id = "tapt"
    config_class = TAPTConfig
    config: TAPTConfig

    def __init__(self, config: TAPTConfig | None = None) -> None:
        super().__init__(config)
        self.learner: PromptLearner | None = None
        self.vision: VisualPromptEncoder | None = None
        self.prompts: Prompts | None = None
        self.stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.history: list[dict[str, float]] = []
        self.last_tuning: dict[str, float] = {}
        self.train_classes: list[int] = []

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        budget = {"epochs": 1, "train_batch_size": 128, "train_steps": 1, "stats_steps": 1}
        return {**budget, "n_views": 4, "selection": 0.5, "align_selection": 0.5}

    # ---- the prompted model ----------------------------------------------------------------------

    def bind(self, classifier: ZeroShotClassifier) -> None:
        """Build the prompt learners on ``classifier``'s frozen CLIP; prompts start as in the code:
        the template's first words for the text, N(0, 0.02²) for deeper text and all visual prompts."""
        cfg = self.config
        self.base = classifier
        clip = classifier.clip
        init = ContextInit(template=cfg.template, learn_first=cfg.n_ctx_text)
        self.learner = PromptLearner(clip, classifier.prompts, init).to(clip.device)
        self.vision = VisualPromptEncoder(clip)
        if cfg.depth_vision > self.vision.layers or cfg.depth_vision < 1:
            raise ValueError(f"depth_vision must be in 1..{self.vision.layers}")
        text_layers = len(list(clip.model.transformer.resblocks))
        if not 1 <= cfg.depth_text <= text_layers:
            raise ValueError(f"depth_text must be in 1..{text_layers}")
        generator = torch.Generator().manual_seed(cfg.seed)
        d = self.learner.width
        deep = (
            torch.randn(cfg.depth_text - 1, self.learner.n_ctx, d, generator=generator) * 0.02
            if cfg.depth_text > 1
            else None
        )
        vision = torch.randn(cfg.depth_vision, cfg.n_ctx_vision, self.vision.width, generator=generator) * 0.02
        device = clip.device
        self.prompts = Prompts(
            self.learner.ctx_init.clone(), None if deep is None else deep.to(device), vision.to(device)
        )

    def text_weights(self, prompts: Prompts, per_image: bool) -> torch.Tensor:
        """Unit class embeddings ``(C, D)`` or ``(B, C, D)``."""
        assert self.learner is not None
        return self.learner(prompts.text, deep=prompts.text_deep, per_image=per_image)

    def embed(
        self, images: torch.Tensor, prompts: Prompts, views_per_prompt: int = 1, record: bool = False
    ) -> VisualOutput:
        """Prompted unit image embeddings (and block inputs when ``record``)."""
        assert self.vision is not None
        return self.vision(images, prompts.vision, record=record, views_per_prompt=views_per_prompt)

    def logits(self, images: torch.Tensor, prompts: Prompts | None = None) -> torch.Tensor:
        """Zero-shot logits with shared prompts (default: the initial, adversarially tuned ones)."""
        prompts = prompts or self.prompts
        assert prompts is not None
        features = self.embed(images, prompts).features
        return self._base().logit_scale * features @ self.text_weights(prompts, per_image=False).T

    def initial_classifier(self) -> Predictor:
        """The initial prompts without test-time tuning (the official evaluation's attack target)."""
        return lambda images: self.logits(images)

    # ---- fit: adversarial prompt tuning and the reference statistics ------------------------------

    def fit(self, data: FitData) -> dict[str, Any]:
        """Adversarial prompt tuning of the bimodal prompts on the seen classes' training images, then
        the token statistics of clean and adversarial seen-class training images."""
        start = time.perf_counter()
        cfg = self.config = with_training_eps(self.config, data.headline.value)
        assert cfg.train_eps is not None
        step_size = cfg.train_step_size if cfg.train_step_size is not None else 2.0 * cfg.train_eps / 3.0
        set_seed(cfg.seed)
        self.bind(data.base)
        assert self.prompts is not None
        train = data.seen_train
        classes = training_classes(data.prompts, cfg.train_text)
        self.train_classes = classes
        params = [torch.nn.Parameter(t) for t in self.prompts.tensors()]
        loop = AdversarialLoop(
            epochs=cfg.epochs,
            batch_size=cfg.train_batch_size,
            seed=cfg.seed,
            attack=inner_attack(cfg.train_eps, cfg.train_steps, step_size),
            optimizer=torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay_train),
            schedule=lambda step, epoch, total: cosine_lr(step, total, cfg.lr, rounding="angle"),  # over all steps
        )
        task = _PromptTuningTask(self, params, classes)
        self.history = loop.run(task, train.images, training_labels(train, data.prompts, classes))
        self.prompts = task.as_prompts([p.detach() for p in params])
        tune_seconds = time.perf_counter() - start
        self.stats = self.reference_statistics(data, step_size)
        return self.summary(data, tune_seconds, time.perf_counter() - start - tune_seconds)

    def block_inputs(self, images: torch.Tensor, prompts: Prompts) -> torch.Tensor:
        """``(N, layers, T, width)``: inputs of the aligned image blocks."""
        recorded = self.embed(images, prompts, record=True).block_inputs
        return torch.stack(recorded[: self.config.align_layers], dim=1)

    def reference_statistics(self, data: FitData, step_size: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per (layer, token, channel) mean and sample variance of the block inputs over the seen
        classes' training images, clean and PGD-perturbed against the initial prompts."""
        cfg = self.config
        assert self.prompts is not None and cfg.train_eps is not None
        train = data.seen_train
        prompts = self.prompts
        classes = self.train_classes or list(range(len(data.prompts.classnames)))
        labels = training_labels(train, data.prompts, classes)
        with torch.no_grad():
            weights = self.text_weights(prompts, per_image=False)[classes]
        set_seed(cfg.seed)
        attack = inner_attack(cfg.train_eps, cfg.stats_steps, step_size)
        adversarial = []
        for i in range(0, len(train), 256):
            x, y = train.images[i : i + 256], labels[i : i + 256]

            def objective(z: torch.Tensor, y: torch.Tensor = y) -> torch.Tensor:
                return F.cross_entropy(self._base().logit_scale * self.embed(z, prompts).features @ weights.T, y)

            adversarial.append(attack.maximise(objective, x))
        out = {}
        for name, images in (("clean", train.images), ("adversarial", torch.cat(adversarial))):
            with torch.no_grad():
                tokens = torch.cat(
                    [self.block_inputs(images[i : i + 256], prompts) for i in range(0, len(images), 256)]
                )
            out[name] = (tokens.mean(dim=0), tokens.var(dim=0, unbiased=True))
        return out

    # ---- the test-time step ----------------------------------------------------------------------

    def alignment(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-image alignment loss: ``tokens`` ``(B, k, layers, T, width)`` of the selected views;
        ``0.5 · L1(mean) + 0.5 · L1(var)`` per layer against each reference, summed over layers,
        weighted ``gamma`` (adversarial) and ``1 - gamma`` (clean)."""
        cfg = self.config
        mean = tokens.mean(dim=1)
        var = ((tokens - mean.unsqueeze(1)) ** 2).mean(dim=1)  # population variance over the views

        def distance(reference: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            ref_mean, ref_var = reference
            per_layer = 0.5 * (mean - ref_mean).abs().mean(dim=(-2, -1)) + 0.5 * (var - ref_var).abs().mean(
                dim=(-2, -1)
            )
            return per_layer.sum(dim=-1)

        return cfg.gamma * distance(self.stats["adversarial"]) + (1 - cfg.gamma) * distance(self.stats["clean"])

    def tune(self, images: torch.Tensor) -> tuple[Prompts, dict[str, torch.Tensor]]:
        """Per-image prompts after the test-time steps (no graph to ``images``)."""
        cfg = self.config
        assert self.prompts is not None
        if not self.stats:
            raise RuntimeError("TAPT: call fit first (the reference statistics are missing)")
        x = images.detach()
        b = x.shape[0]
        start = self.prompts.per_image(b)
        params = [torch.nn.Parameter(t) for t in start.tensors()]
        has_deep = start.text_deep is not None
        as_prompts = lambda ps: Prompts(ps[0], ps[1] if has_deep else None, ps[-1])  # noqa: E731
        optimizer = torch.optim.AdamW(params, lr=cfg.lr_tta, weight_decay=cfg.weight_decay)
        views = random_views(x, cfg.n_views, scale=(cfg.crop_scale_min, 1.0))
        v = views.shape[1]
        flat = views.flatten(0, 1)
        scale = self._base().logit_scale
        info: dict[str, torch.Tensor] = {}
        selected = aligned = None
        layer_weight = cfg.align_weight / max(1, cfg.align_layers)
        for step in range(cfg.steps):
            current = as_prompts(params)
            if selected is None:
                with torch.no_grad():  # selection on the initial prompts' predictions
                    features = self.embed(flat, current.detach(), views_per_prompt=v).features.view(b, v, -1)
                    logits = scale * torch.einsum("bvd,bcd->bvc", features, self.text_weights(current.detach(), True))
                    selected = most_confident(logits, cfg.selection)
                    aligned = most_confident(logits, cfg.align_selection)
                    shared = cfg.align_selection == cfg.selection  # the official setting: same views
                    union = selected if shared else torch.cat([selected, aligned], dim=1)
            assert selected is not None and aligned is not None
            with torch.enable_grad():
                chosen = gather_views(views, union)  # (B, k1 + k2, C, H, W)
                k = chosen.shape[1]
                out = self.embed(chosen.flatten(0, 1), current, views_per_prompt=k, record=True)
                feats = out.features.view(b, k, -1)
                tokens = torch.stack(out.block_inputs[: cfg.align_layers], dim=1)
                tokens = tokens.view(b, k, *tokens.shape[1:])
                k1 = selected.shape[1]
                view_logits = scale * torch.einsum("bvd,bcd->bvc", feats[:, :k1], self.text_weights(current, True))
                ent = marginal_entropy(view_logits)
                align = self.alignment(tokens if shared else tokens[:, k1:])
                per_image = ent + layer_weight * align
                if step == 0:
                    info = {"entropy": ent.detach(), "alignment": align.detach()}
                optimizer.zero_grad(set_to_none=True)
                per_image.sum().backward()
                optimizer.step()
        return as_prompts([p.detach() for p in params]), info

    def classify(self, images: torch.Tensor, prompts: Prompts) -> torch.Tensor:
        """Logits of the unaugmented images with their own (per-image) prompts."""
        features = self.embed(images, prompts).features
        weights = self.text_weights(prompts, per_image=True)
        return self._base().logit_scale * torch.einsum("bd,bcd->bc", features, weights)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        n = len(images)
        k = max(1, int(cfg.n_views * cfg.selection))
        if cfg.align_selection != cfg.selection:
            k += max(1, int(cfg.n_views * cfg.align_selection))
        self.counter.images += n
        self.counter.forward += n * (cfg.n_views + cfg.steps * k + 1)  # selection, tuning, prediction
        self.counter.backward += n * cfg.steps * k
        prompts, info = self.tune(images)
        self.last_tuning = {key: round(float(value.mean()), 5) for key, value in info.items()}
        with torch.no_grad():
            return self.classify(images, prompts)

    def attack_surface(self) -> Predictor:
        """BPDA: prompts tuned on fresh views of the current input, then constants; the gradient
        flows through the prompted image tower at the input."""

        def surface(images: torch.Tensor) -> torch.Tensor:
            prompts, _ = self.tune(images)
            return self.classify(images, prompts)

        return surface

    # ---- findings --------------------------------------------------------------------------------

    def summary(self, data: FitData, tune_seconds: float, stats_seconds: float) -> dict[str, Any]:
        """Hyperparameters, the adversarial prompt tuning curve and the reference statistics."""
        stats = {
            name: {
                "mean_abs_mean": round(float(m.abs().mean()), 5),
                "mean_var": round(float(v.mean()), 5),
            }
            for name, (m, v) in self.stats.items()
        }
        if "clean" in self.stats and "adversarial" in self.stats:
            (mc, vc), (ma, va) = self.stats["clean"], self.stats["adversarial"]
            stats["l1_clean_vs_adversarial"] = {
                "mean": round(float((mc - ma).abs().mean()), 5),
                "var": round(float((vc - va).abs().mean()), 5),
            }
        return {
            "method": self.id,
            "hyperparameters": self.hyperparameters(),
            "train_images": len(data.seen_train),
            "train_classes": list(data.prompts.seen_classes),
            "prompt_tuning_seconds": round(tune_seconds, 2),
            "statistics_seconds": round(stats_seconds, 2),
            "prompt_parameters": int(sum(t.numel() for t in self.prompts.tensors())) if self.prompts else 0,
            "loss_curve": self.history,
            "first_epoch": self.history[0] if self.history else None,
            "last_epoch": self.history[-1] if self.history else None,
            "reference_statistics": stats,
        }


TaptBatch = tuple[Prompts, torch.Tensor, torch.Tensor]


class _PromptTuningTask(AdversarialTask[TaptBatch]):
    """TAPT's initial prompt tuning: PGD against the current prompts, then the zero-shot cross-entropy."""

    def __init__(self, defense: TAPT, params: list[torch.nn.Parameter], classes: list[int]) -> None:
        assert defense.prompts is not None
        self.defense = defense
        self.params = params
        self.classes = classes
        self.has_deep = defense.prompts.text_deep is not None
        self.scale = defense._base().logit_scale

    def as_prompts(self, tensors: list[torch.Tensor]) -> Prompts:
        """The prompts of the optimiser's tensors."""
        return Prompts(tensors[0], tensors[1] if self.has_deep else None, tensors[-1])

    def prepare(self, images: torch.Tensor, labels: torch.Tensor) -> TaptBatch:
        current = self.as_prompts([p.detach() for p in self.params])
        return current, self.defense.text_weights(current, per_image=False)[self.classes], labels

    def attack_objective(self, state: TaptBatch, x: torch.Tensor) -> torch.Tensor:
        prompts, weights, labels = state
        return F.cross_entropy(self.scale * self.defense.embed(x, prompts).features @ weights.T, labels)

    def training_loss(self, state: TaptBatch, x_adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        logits, labels = self.defense.logits(x_adv, self.as_prompts(list(self.params)))[:, self.classes], state[2]
        loss = F.cross_entropy(logits, labels)
        return loss, {"train_adv_acc": 100.0 * (logits.argmax(-1) == labels).float().sum().item()}


def tapt_paper_setting(data: FitData, defense: TAPT, lrs: tuple[float, ...] = ()) -> dict[str, Any]:
    """The official evaluation's setting: PGD (the profile's sweep steps, headline ε) crafted against
    the *initial* prompts (no test-time step), then classified by TAPT. Also: the initial prompts
    themselves, how often the test-time step changes a prediction, and other test-time learning rates."""
    from vlmdefense.workbench.attacks import PGD

    x, y = data.sets.test.images, data.sets.test.labels
    seed = data.seed
    steps = data.sweep_steps
    initial = defense.initial_classifier()
    set_seed(seed)
    adversarial = PGD(eps=data.headline.value, steps=steps)(initial, x, y)
    out: dict[str, Any] = {"attack": f"PGD-{steps} on the initial prompts", "eps": data.headline.display}
    with torch.no_grad():
        init_clean, init_adv = initial(x), initial(adversarial)
    out["initial_prompts"] = {"clean": accuracy(init_clean, y), "adversarial": accuracy(init_adv, y)}
    original = defense.config
    try:
        for lr in (original.lr_tta, *lrs):
            defense.config = dataclasses.replace(original, lr_tta=lr)
            set_seed(seed)
            clean = defense.predict(x)
            set_seed(seed)
            adv = defense.predict(adversarial)
            out[f"tapt_lr_{lr:g}"] = {
                "clean": accuracy(clean, y),
                "adversarial": accuracy(adv, y),
                "changed_predictions_clean_pct": round(
                    100.0 * float((clean.argmax(-1) != init_clean.argmax(-1)).float().mean()), 2
                ),
                "changed_predictions_adversarial_pct": round(
                    100.0 * float((adv.argmax(-1) != init_adv.argmax(-1)).float().mean()), 2
                ),
            }
    finally:
        defense.config = original
    return out
