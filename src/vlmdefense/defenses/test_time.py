"""Test-time prompt tuning against adversarial inputs: R-TPT and TAPT.

Both tune a prompt separately for every test image, from that image's random augmented views, and
reset it for the next image. Here a whole batch is tuned at once: every image holds its own prompt
(tensors with a leading batch dimension), the per-image losses are *summed* so that each prompt's
gradient is its own image's, and AdamW's update is elementwise — the result equals tuning the images
one by one.

* R-TPT (Sheng et al., CVPR 2025): the text context (initialised from a template's words) takes
  ``steps`` AdamW steps on the mean *pointwise* entropy of the most confident views (TPT's marginal
  entropy minus its KL part); the prediction is the ensemble of all views' tuned logits weighted by
  reliability: a softmax (temperature 0.01) over each view's mean cosine similarity to its nearest
  views. Both encoders are frozen and the image features do not depend on the prompt, so they are
  computed once per view.
* TAPT (Wang et al., CVPR 2025): bimodal deep prompts (independent vision and language prompts,
  "VLI"), first learned by adversarial prompt tuning on the seen classes' training images; then, per
  test image, one AdamW step on the marginal entropy of the most confident views plus the L1 alignment
  of those views' per-layer token means and variances with reference statistics of clean and of
  adversarial training images; the tuned prompts classify the unaugmented image.

Adaptive attack surfaces (BPDA through the prompt update): the tuned prompts are recomputed for the
current input, from fresh random views, without a graph to the input, and then used as constants;
the attacker's gradient flows through everything else (the augmented views, the image tower, R-TPT's
reliability weights, TAPT's prompted image tower). The views are random, so the harness averages the
gradients over draws (EOT).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vlmdefense.defenses.base import InferenceDefense, Predictor, with_training_eps
from vlmdefense.defenses.prompt_learner import ContextInit, PromptLearner, VisualPromptEncoder
from vlmdefense.defenses.training_time import maximise
from vlmdefense.workbench.models import set_seed

if TYPE_CHECKING:
    from vlmdefense.workbench.evaluation import ZeroShotClassifier
    from vlmdefense.workbench.harness import Context


# ------------------------------------------------------------------------------------------ shared


def random_views(
    images: torch.Tensor,
    n_views: int,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """``(B, V, C, H, W)``: the image itself, then ``V - 1`` random resized crops (area fraction in
    ``scale``, aspect ratio in ``ratio``, bilinear, resized back to the input size). Differentiable in
    ``images``; draws from torch's global generator."""
    b = images.shape[0]
    if n_views < 1:
        raise ValueError("n_views must be at least 1")
    if n_views == 1:
        return images.unsqueeze(1)
    n = b * (n_views - 1)
    device, dtype = images.device, images.dtype
    area = torch.empty(n, device=device, dtype=dtype).uniform_(*scale)
    log_ratio = torch.empty(n, device=device, dtype=dtype).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_ratio)
    width = torch.sqrt(area * aspect).clamp(max=1.0)  # fractions of the side
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(n, device=device, dtype=dtype) * 2 - 1) * (1 - width)  # centre in [-1, 1] coordinates
    cy = (torch.rand(n, device=device, dtype=dtype) * 2 - 1) * (1 - height)
    theta = torch.zeros(n, 2, 3, device=device, dtype=dtype)
    theta[:, 0, 0], theta[:, 0, 2] = width, cx
    theta[:, 1, 1], theta[:, 1, 2] = height, cy
    source = images.repeat_interleave(n_views - 1, dim=0)
    grid = F.affine_grid(theta, list(source.shape), align_corners=False)
    crops = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)
    crops = crops.view(b, n_views - 1, *images.shape[1:])
    return torch.cat([images.unsqueeze(1), crops], dim=1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of softmax(logits) along the last dimension."""
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """TPT's objective: entropy of the mean probability over the views (dim -2) of each image."""
    log_p = F.log_softmax(logits, dim=-1)
    log_mean = torch.logsumexp(log_p, dim=-2) - math.log(logits.shape[-2])
    return -(log_mean.exp() * log_mean).sum(dim=-1)


def most_confident(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices ``(B, k)`` of the ``k = max(1, int(V · fraction))`` lowest-entropy views of each image
    (``logits``: ``(B, V, C)``)."""
    k = max(1, int(logits.shape[1] * fraction))
    return entropy(logits).argsort(dim=1)[:, :k]


def _gather_views(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b]]`` for ``x`` of shape ``(B, V, ...)``."""
    shape = index.shape + x.shape[2:]
    expanded = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(shape)
    return x.gather(1, expanded)


class TestTimeDefense(InferenceDefense):
    """A test-time adaptation defense: prompts tuned per input on random views, so it is randomised."""

    randomized = True


# ---------------------------------------------------------------------------------------------- R-TPT


@dataclass
class RTPTConfig:
    """R-TPT's hyperparameters (official defaults in brackets; ``ctx.params`` keys override).

    Attributes:
        n_views: inputs per image, the image itself plus ``n_views - 1`` augmented views [64].
        selection: fraction of lowest-entropy views the prompt is tuned on [0.1].
        steps: AdamW steps per image [1].
        lr: AdamW learning rate [5e-3].
        weight_decay: AdamW weight decay [torch's default 0.01].
        template: its words before the class name are the tuned context [``a photo of a`` with
            CLIP's ImageNet class names: 4 tokens].
        temperature: softmax temperature of the reliability weights [0.01].
        neighbours: nearest views whose mean similarity is a view's reliability [20 of 64].
        crop_scale_min: smallest area fraction of a random crop [RandomResizedCrop: 0.08, plus flips].
        ensemble: ``reliability`` (R-TPT), ``mean`` (plain average of the views' tuned logits) or
            ``none`` (the tuned prompt on the image alone) — the ablations of the paper.
    """

    n_views: int = 8
    selection: float = 0.25
    steps: int = 1
    lr: float = 5e-3
    weight_decay: float = 0.01
    template: str = "a photo of the digit {name}."
    temperature: float = 0.01
    neighbours: int = 3
    crop_scale_min: float = 0.5
    ensemble: str = "reliability"


@dataclass
class RTPTOutput:
    """One R-TPT pass over a batch."""

    logits: torch.Tensor
    view_logits: torch.Tensor
    weights: torch.Tensor
    selected: torch.Tensor
    ctx: torch.Tensor
    loss_before: torch.Tensor
    loss_after: torch.Tensor | None = None


class RTPT(TestTimeDefense):
    """R-TPT (Sheng et al., CVPR 2025): pointwise-entropy test-time prompt tuning with a
    reliability-weighted ensemble of augmented views."""

    id = "r-tpt"
    config_class = RTPTConfig

    def __init__(self, config: RTPTConfig | None = None) -> None:
        super().__init__(config)
        self.learner: PromptLearner | None = None

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        return {"n_views": 4, "neighbours": 2, "selection": 0.5}

    def bind(self, classifier: ZeroShotClassifier) -> None:
        """Use ``classifier``'s frozen CLIP without the rest of ``fit``."""
        self.base = classifier
        self.learner = PromptLearner(classifier.clip, classifier.prompts, ContextInit(template=self.config.template))
        self.learner.to(classifier.clip.device)

    def fit(self, ctx: Context) -> None:
        """Nothing is trained: bind the base model and build the prompt learner."""
        self.bind(ctx.base)
        assert self.learner is not None
        ctx.findings["initial_prompts"] = self.learner.template_text()[:2]
        ctx.findings["hyperparameters"] = self.hyperparameters()

    # ---- the mechanism ---------------------------------------------------------------------------

    def view_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings of fresh random views ``(B, V, D)`` (graph to ``images`` kept)."""
        cfg = self.config
        views = random_views(images, cfg.n_views, scale=(cfg.crop_scale_min, 1.0))
        b, v = views.shape[:2]
        return self._base().embed(views.flatten(0, 1)).view(b, v, -1)

    def view_logits(self, features: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """``(B, V, C)`` logits of every view with each image's own context ``ctx`` ``(B, M, d)``."""
        assert self.learner is not None
        weights = self.learner(ctx, per_image=True)  # (B, C, D)
        return self._base().logit_scale * torch.einsum("bvd,bcd->bvc", features, weights)

    def tune(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tuned contexts ``(B, M, d)`` from detached view features, with the selected views and
        the loss (per image) before the update."""
        assert self.learner is not None
        cfg = self.config
        features = features.detach()
        start = self.learner.ctx_init.unsqueeze(0).repeat(features.shape[0], 1, 1)
        context = torch.nn.Parameter(start)
        optimizer = torch.optim.AdamW([context], lr=cfg.lr, weight_decay=cfg.weight_decay)
        selected = None
        loss_before = None
        with torch.enable_grad():
            for _ in range(cfg.steps):
                logits = self.view_logits(features, context)
                if selected is None:
                    selected = most_confident(logits.detach(), cfg.selection)
                per_image = entropy(_gather_views(logits, selected)).mean(dim=1)  # pointwise entropy
                if loss_before is None:
                    loss_before = per_image.detach()
                optimizer.zero_grad(set_to_none=True)
                per_image.sum().backward()  # summed: each context gets its own image's gradient
                optimizer.step()
        if selected is None:  # steps == 0
            with torch.no_grad():
                logits = self.view_logits(features, context)
            selected = most_confident(logits, cfg.selection)
            loss_before = entropy(_gather_views(logits, selected)).mean(dim=1)
        assert loss_before is not None
        return context.detach(), selected, loss_before

    def reliability(self, features: torch.Tensor) -> torch.Tensor:
        """Weights ``(B, V)``: softmax over views of the mean cosine similarity of each view to its
        ``neighbours`` most similar other views, divided by the temperature (differentiable)."""
        cfg = self.config
        v = features.shape[1]
        if v == 1:
            return torch.ones(features.shape[:2], device=features.device, dtype=features.dtype)
        similarity = features @ features.transpose(1, 2)
        eye = torch.eye(v, dtype=torch.bool, device=features.device)
        similarity = similarity.masked_fill(eye, float("-inf"))  # a view is not its own neighbour
        k = min(cfg.neighbours, v - 1)
        score = similarity.topk(k, dim=-1).values.mean(dim=-1)
        return torch.softmax(score / cfg.temperature, dim=-1)

    def combine(self, features: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ensemble of the views' logits and its weights."""
        mode = self.config.ensemble
        if mode == "reliability":
            weights = self.reliability(features)
        elif mode == "mean":
            weights = torch.full(features.shape[:2], 1.0 / features.shape[1], device=features.device)
        elif mode == "none":
            weights = torch.zeros(features.shape[:2], device=features.device)
            weights[:, 0] = 1.0
        else:
            raise ValueError(f"ensemble must be reliability, mean or none, not {mode!r}")
        return (weights.unsqueeze(-1) * logits).sum(dim=1), weights

    def run(self, images: torch.Tensor, with_graph: bool = False) -> RTPTOutput:
        """The whole pipeline; ``with_graph`` keeps the graph from the output to ``images`` except
        through the tuned context (BPDA: the context is a constant)."""
        with torch.set_grad_enabled(with_graph):
            features = self.view_features(images)
        ctx, selected, loss_before = self.tune(features)
        with torch.set_grad_enabled(with_graph):
            with torch.no_grad():
                weights_text = self.learner(ctx, per_image=True) if self.learner is not None else None
            assert weights_text is not None
            logits = self._base().logit_scale * torch.einsum("bvd,bcd->bvc", features, weights_text)
            out, weights = self.combine(features, logits)
        return RTPTOutput(out, logits, weights, selected, ctx, loss_before)

    # ---- the harness' interface ------------------------------------------------------------------

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        n = len(images)
        self.counter.images += n
        self.counter.forward += n * self.config.n_views  # image tower, once per view
        self.counter.backward += n * self.config.steps  # through the text tower only
        return self.run(images).logits

    def attack_surface(self) -> Predictor:
        """The pipeline with fresh views at every call; the tuned context is a constant (BPDA)."""

        def surface(images: torch.Tensor) -> torch.Tensor:
            return self.run(images, with_graph=True).logits

        return surface


# ----------------------------------------------------------------------------------------------- TAPT


@dataclass
class TAPTConfig:
    """TAPT's hyperparameters (official TAPT-VLI defaults in brackets; ``ctx.params`` keys override).

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


@dataclass
class Prompts:
    """TAPT's bimodal prompts, shared ``(…)`` or per image ``(B, …)``."""

    text: torch.Tensor  # (n_t, d)
    text_deep: torch.Tensor | None  # (depth_text - 1, n_t, d)
    vision: torch.Tensor  # (depth_vision, n_v, w)

    def per_image(self, b: int) -> Prompts:
        """Copies for ``b`` images."""
        rep = lambda t: None if t is None else t.unsqueeze(0).repeat(b, *([1] * t.dim()))  # noqa: E731
        return Prompts(rep(self.text), rep(self.text_deep), rep(self.vision))  # type: ignore[arg-type]

    def tensors(self) -> list[torch.Tensor]:
        """The tensors (for optimisers)."""
        return [t for t in (self.text, self.text_deep, self.vision) if t is not None]

    def detach(self) -> Prompts:
        """Detached copies."""
        d = lambda t: None if t is None else t.detach().clone()  # noqa: E731
        return Prompts(d(self.text), d(self.text_deep), d(self.vision))  # type: ignore[arg-type]


class TAPT(TestTimeDefense):
    """TAPT (Wang et al., CVPR 2025): test-time adversarial prompt tuning of bimodal prompts with
    multi-view entropy and adversarial/clean token-statistics alignment."""

    id = "tapt"
    config_class = TAPTConfig

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
        return {
            "epochs": 1,
            "train_batch_size": 128,
            "train_steps": 1,
            "stats_steps": 1,
            "n_views": 4,
            "selection": 0.5,
            "align_selection": 0.5,
        }

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

    def embed(self, images: torch.Tensor, prompts: Prompts, views_per_prompt: int = 1, record: bool = False):
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

    def fit(self, ctx: Context) -> None:
        """Adversarial prompt tuning of the bimodal prompts on ``ctx.seen_train``, then the token
        statistics of clean and adversarial seen-class training images."""
        cfg = self.config
        start = time.perf_counter()
        cfg = self.config = with_training_eps(cfg, ctx)
        assert cfg.train_eps is not None
        step_size = cfg.train_step_size if cfg.train_step_size is not None else 2.0 * cfg.train_eps / 3.0
        set_seed(cfg.seed)
        self.bind(ctx.base)
        assert self.prompts is not None
        train = ctx.seen_train
        classes = (
            list(ctx.prompts.seen_classes) if cfg.train_text == "seen" else list(range(len(ctx.prompts.classnames)))
        )
        to_train = torch.full((len(ctx.prompts.classnames),), -1, dtype=torch.long, device=train.labels.device)
        to_train[classes] = torch.arange(len(classes), device=train.labels.device)
        self.train_classes = classes
        params = [torch.nn.Parameter(t) for t in self.prompts.tensors()]
        has_deep = self.prompts.text_deep is not None
        as_prompts = lambda ps: Prompts(ps[0], ps[1] if has_deep else None, ps[-1])  # noqa: E731
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay_train)
        generator = torch.Generator().manual_seed(cfg.seed)
        n = len(train)
        per_epoch = math.ceil(n / cfg.train_batch_size)
        total = cfg.epochs * per_epoch
        step = 0
        self.history = []
        for epoch in range(cfg.epochs):
            order = torch.randperm(n, generator=generator).to(train.images.device)
            sums = {"loss": 0.0, "train_adv_acc": 0.0}
            for b in range(per_epoch):
                index = order[b * cfg.train_batch_size : (b + 1) * cfg.train_batch_size]
                images, labels = train.images[index], to_train[train.labels[index]]
                current = as_prompts([p.detach() for p in params])
                with torch.no_grad():
                    weights = self.text_weights(current, per_image=False)[classes]

                def objective(
                    x: torch.Tensor, p: Prompts = current, w: torch.Tensor = weights, y: torch.Tensor = labels
                ) -> torch.Tensor:
                    return F.cross_entropy(self._base().logit_scale * self.embed(x, p).features @ w.T, y)

                x_adv = maximise(objective, images, cfg.train_eps, cfg.train_steps, step_size)
                for group in optimizer.param_groups:  # cosine over all steps
                    group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / max(1, total)))
                logits = self.logits(x_adv, as_prompts(params))[:, classes]
                loss = F.cross_entropy(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                sums["loss"] += loss.item() * len(index)
                sums["train_adv_acc"] += 100.0 * (logits.argmax(-1) == labels).float().sum().item()
            self.history.append({"epoch": epoch + 1, **{k: round(v / n, 4) for k, v in sums.items()}})
        self.prompts = as_prompts([p.detach() for p in params])
        tune_seconds = time.perf_counter() - start
        self.stats = self.reference_statistics(ctx, step_size)
        ctx.findings.update(self.summary(ctx, tune_seconds, time.perf_counter() - start - tune_seconds))

    def block_inputs(self, images: torch.Tensor, prompts: Prompts) -> torch.Tensor:
        """``(N, layers, T, width)``: inputs of the aligned image blocks."""
        recorded = self.embed(images, prompts, record=True).block_inputs
        return torch.stack(recorded[: self.config.align_layers], dim=1)

    def reference_statistics(self, ctx: Context, step_size: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per (layer, token, channel) mean and sample variance of the block inputs over the seen
        classes' training images, clean and PGD-perturbed against the initial prompts."""
        cfg = self.config
        assert self.prompts is not None and cfg.train_eps is not None
        train = ctx.seen_train
        prompts = self.prompts
        classes = self.train_classes or list(range(len(ctx.prompts.classnames)))
        to_train = torch.full((len(ctx.prompts.classnames),), -1, dtype=torch.long, device=train.labels.device)
        to_train[classes] = torch.arange(len(classes), device=train.labels.device)
        with torch.no_grad():
            weights = self.text_weights(prompts, per_image=False)[classes]
        set_seed(cfg.seed)
        adversarial = []
        for i in range(0, len(train), 256):
            x, y = train.images[i : i + 256], to_train[train.labels[i : i + 256]]

            def objective(z: torch.Tensor, y: torch.Tensor = y) -> torch.Tensor:
                return F.cross_entropy(self._base().logit_scale * self.embed(z, prompts).features @ weights.T, y)

            adversarial.append(maximise(objective, x, cfg.train_eps, cfg.stats_steps, step_size))
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
            raise RuntimeError("TAPT: call fit(ctx) first (the reference statistics are missing)")
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
                chosen = _gather_views(views, union)  # (B, k1 + k2, C, H, W)
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

    def summary(self, ctx: Context, tune_seconds: float, stats_seconds: float) -> dict[str, Any]:
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
            "train_images": len(ctx.seen_train),
            "train_classes": list(ctx.prompts.seen_classes),
            "prompt_tuning_seconds": round(tune_seconds, 2),
            "statistics_seconds": round(stats_seconds, 2),
            "prompt_parameters": int(sum(t.numel() for t in self.prompts.tensors())) if self.prompts else 0,
            "loss_curve": self.history,
            "first_epoch": self.history[0] if self.history else None,
            "last_epoch": self.history[-1] if self.history else None,
            "reference_statistics": stats,
        }


DEFENSES: dict[str, type[TestTimeDefense]] = {d.id: d for d in (RTPT, TAPT)}


def make_defense(method: str, params: dict[str, Any]) -> TestTimeDefense:
    """The defense of catalog id ``method`` with ``params``' overrides."""
    return DEFENSES[method].from_params(params)


# ------------------------------------------------------------------------------------------ findings


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return round(100.0 * float((logits.argmax(-1) == labels).float().mean()), 2)


def rtpt_ablation(ctx: Context, defense: RTPT, adversarial: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Accuracy on the test split (clean and the given non-adaptive adversarial images) of the parts
    of R-TPT: the initial prompt on the image alone, the tuned prompt alone (``none``), the plain mean
    over the views (``mean``), R-TPT's reliability weights, and R-TPT without the tuning step; with
    statistics of the reliability weights."""
    x, y = ctx.sets.test.images, ctx.sets.test.labels
    assert defense.learner is not None
    base = defense._base()
    with torch.no_grad():
        initial = defense.learner()
    sets = {"clean": x, **adversarial}
    rows: dict[str, dict[str, float]] = {}
    original = defense.config
    seed = int(ctx.params.get("seed", 0))
    try:
        with torch.no_grad():
            rows["initial prompt, image only"] = {
                k: _accuracy(base.logit_scale * base.embed(v) @ initial.T, y) for k, v in sets.items()
            }
        variants = {
            "tuned prompt, image only": {"ensemble": "none"},
            "tuned prompt, mean of views": {"ensemble": "mean"},
            "R-TPT (tuned, reliability-weighted)": {"ensemble": "reliability"},
            "no tuning, reliability-weighted": {"ensemble": "reliability", "steps": 0},
        }
        weights = None
        for name, change in variants.items():
            defense.config = dataclasses.replace(original, **change)
            row = {}
            for key, images in sets.items():
                set_seed(seed)
                out = defense.run(images)
                row[key] = _accuracy(out.logits, y)
                if name.startswith("R-TPT") and key == "clean":
                    weights = out.weights
            rows[name] = row
    finally:
        defense.config = original
    assert weights is not None
    return {
        "accuracy": rows,
        "reliability_weights_clean": {
            "max_weight_mean": round(float(weights.max(dim=1).values.mean()), 4),
            "identity_view_weight_mean": round(float(weights[:, 0].mean()), 4),
            "effective_views_mean": round(float((1.0 / (weights**2).sum(dim=1)).mean()), 3),
            "uniform_weight": round(1.0 / weights.shape[1], 4),
        },
    }


def tapt_paper_setting(ctx: Context, defense: TAPT, lrs: tuple[float, ...] = ()) -> dict[str, Any]:
    """The official evaluation's setting: PGD (the profile's sweep steps, headline ε) crafted against
    the *initial* prompts (no test-time step), then classified by TAPT. Also: the initial prompts
    themselves, how often the test-time step changes a prediction, and other test-time learning rates."""
    from vlmdefense.workbench.attacks import PGD

    x, y = ctx.sets.test.images, ctx.sets.test.labels
    seed = int(ctx.params.get("seed", 0))
    steps = int(ctx.params["sweep_attack"]["steps"])
    initial = defense.initial_classifier()
    set_seed(seed)
    adversarial = PGD(eps=ctx.headline.value, steps=steps)(initial, x, y)
    out: dict[str, Any] = {"attack": f"PGD-{steps} on the initial prompts", "eps": ctx.headline.display}
    with torch.no_grad():
        init_clean, init_adv = initial(x), initial(adversarial)
    out["initial_prompts"] = {"clean": _accuracy(init_clean, y), "adversarial": _accuracy(init_adv, y)}
    original = defense.config
    try:
        for lr in (original.lr_tta, *lrs):
            defense.config = dataclasses.replace(original, lr_tta=lr)
            set_seed(seed)
            clean = defense.predict(x)
            set_seed(seed)
            adv = defense.predict(adversarial)
            out[f"tapt_lr_{lr:g}"] = {
                "clean": _accuracy(clean, y),
                "adversarial": _accuracy(adv, y),
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
