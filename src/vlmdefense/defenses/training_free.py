"""Training-free test-time defenses of a frozen CLIP: TTC, Anti-Adversary, CLIPure-Cos and TTE.

None of them changes a weight; each wraps the base zero-shot classifier (``ctx.base``) at inference.

* TTC (Xing et al., CVPR 2025): a short PGD *counterattack* from the input that pushes the image
  embedding away from the input's own embedding, inside a 4/255 L∞ ball, starting from uniform
  noise. The relative embedding change caused by that initial noise, τ, gates it: images with
  τ ≥ ``tau_thres`` count as clean and keep only the noise; the others receive the iterates'
  perturbations combined with weights ∝ exp(β·step), as in the official code.
* Anti-Adversary (Alfarra et al., AAAI 2022): ``k`` signed-gradient steps of size ``alpha`` that
  *decrease* the cross-entropy of the model's own initial prediction, then the prediction on the
  moved input (no projection, no clipping, as in the official wrapper).
* CLIPure-Cos (Zhang et al., ICLR 2025): the unit image embedding is moved on the sphere by
  normalised gradient steps that increase its cosine similarity to the embedding of the class-free
  templates ("a photo of the digit ."), then classified against the class embeddings.
* TTE (Pérez et al., ICCV-W 2021): the logits averaged over fixed transformed views of the input.
  Flips do not preserve a digit's label, so the views are the identity, zero-padded shifted crops
  and slightly zoomed copies (crop and resize back).

TTC, Anti-Adversary and CLIPure run an inner optimisation. Their adaptive attack surface is BPDA
over it: the inner perturbation (TTC, Anti-Adversary) or the embedding update (CLIPure) is computed
without a graph and added as a constant offset, so the attacker's gradient passes through the
frozen encoder at the purified point with an identity Jacobian for the inner step. TTE is
differentiable and attacked end to end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vlmdefense.defenses.base import InferenceDefense, Predictor
from vlmdefense.units import parse_epsilon

if TYPE_CHECKING:
    from vlmdefense.workbench.evaluation import ZeroShotClassifier
    from vlmdefense.workbench.harness import Context


class TrainingFreeDefense(InferenceDefense):
    """A training-free defense: nothing is learned, the frozen base classifier is bound at ``fit``."""


# ----------------------------------------------------------------------------------------------- TTC


@dataclass
class TTCConfig:
    """TTC's hyperparameters (official defaults; keys of ``ctx.params`` with the same names override).

    Attributes:
        ttc_eps: L∞ radius of the counterattack (official ``--ttc_eps 4``, in /255).
        ttc_steps: counterattack steps (official ``--ttc_numsteps 2``).
        ttc_step_size: step size (official ``--ttc_stepsize 1``, in /255).
        tau_thres: τ threshold (official 0.2), or ``"calibrate"``: the ``tau_quantile`` quantile of τ
            on the clean seen-class training images.
        tau_quantile: quantile used by ``tau_thres: calibrate``.
        beta: weight of later steps in the combination, weights ∝ exp(beta · step).
        calibration_images: at most this many training images are used to measure τ in ``fit``.
    """

    ttc_eps: float = 4 / 255
    ttc_steps: int = 2
    ttc_step_size: float = 1 / 255
    tau_thres: float | str = 0.2
    tau_quantile: float = 0.05
    beta: float = 2.0
    calibration_images: int = 720


@dataclass
class CounterattackOutput:
    """One TTC pass: the perturbation that is added, τ, and which images were counterattacked."""

    delta: torch.Tensor
    tau: torch.Tensor
    counterattacked: torch.Tensor


class TTC(TrainingFreeDefense):
    """Test-time counterattacks (Xing et al., CVPR 2025), τ-thresholded and β-weighted."""

    id = "ttc"
    randomized = True  # the initial uniform noise (which also defines τ) is drawn at every prediction
    config_class = TTCConfig

    def __init__(self, config: TTCConfig | None = None) -> None:
        super().__init__(config)
        self.threshold: float | None = None if self.config.tau_thres == "calibrate" else float(self.config.tau_thres)
        self.calibration: dict[str, Any] = {}

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        return {"calibration_images": 64}

    def raw_embed(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings (the official code measures τ and the L2 loss on them)."""
        clip = self.clip
        return clip.model.encode_image(clip.normalize(images))

    def counterattack(self, images: torch.Tensor, threshold: float | None = None) -> CounterattackOutput:
        """The τ-gated, β-weighted counterattack perturbation of ``images`` (no graph to ``images``)."""
        cfg = self.config
        thres = self.threshold if threshold is None else threshold
        if thres is None:
            raise RuntimeError("TTC: tau_thres is 'calibrate' and fit has not run")
        x = images.detach()
        eps, alpha = cfg.ttc_eps, cfg.ttc_step_size
        delta = torch.empty_like(x).uniform_(-eps, eps)
        delta = torch.max(torch.min(delta, 1 - x), -x)  # x + delta stays in [0, 1]
        with torch.no_grad():
            reference = self.raw_embed(x)
        iterates = [delta]
        tau = None
        with torch.enable_grad():
            for step in range(cfg.ttc_steps):
                d = delta.detach().requires_grad_(True)
                embedding = self.raw_embed(x + d)
                if step == 0:  # τ is the relative change caused by the initial noise alone
                    tau = (embedding.detach() - reference).norm(dim=-1) / reference.norm(dim=-1)
                loss = (embedding - reference).pow(2).sum()
                grad = torch.autograd.grad(loss, d)[0]
                delta = (d.detach() + alpha * grad.sign()).clamp(-eps, eps)  # ascent: away from the input
                delta = torch.max(torch.min(delta, 1 - x), -x)
                iterates.append(delta)
        if tau is None:
            with torch.no_grad():
                tau = (self.raw_embed(x + delta) - reference).norm(dim=-1) / reference.norm(dim=-1)
        stacked = torch.stack(iterates, dim=1)  # (N, steps + 1, C, H, W)
        steps = torch.arange(cfg.ttc_steps + 1, device=x.device, dtype=x.dtype)
        soft = torch.softmax(cfg.beta * steps, dim=0).expand(len(x), -1)
        hard = torch.zeros_like(soft)
        hard[:, 0] = 1.0
        counter = tau < thres  # falsely stable: counterattack; otherwise keep the initial noise only
        weights = torch.where(counter.unsqueeze(1), soft, hard)
        combined = (weights.view(*weights.shape, 1, 1, 1) * stacked).sum(dim=1)
        return CounterattackOutput(combined.detach(), tau.detach(), counter)

    def tau(self, images: torch.Tensor) -> torch.Tensor:
        """τ of ``images`` for one draw of the initial noise (one extra forward pass, no gradients)."""
        x = images.detach()
        eps = self.config.ttc_eps
        delta = torch.empty_like(x).uniform_(-eps, eps)
        delta = torch.max(torch.min(delta, 1 - x), -x)
        with torch.no_grad():
            reference = self.raw_embed(x)
            return (self.raw_embed(x + delta) - reference).norm(dim=-1) / reference.norm(dim=-1)

    def fit(self, ctx: Context) -> None:
        """Bind the base model and measure τ on clean seen-class training images (calibrating the
        threshold from them when ``tau_thres`` is ``calibrate``)."""
        self.bind(ctx.base)
        if ctx.train is None:
            if self.threshold is None:
                raise RuntimeError("TTC: tau_thres 'calibrate' needs a training split")
            return
        train = ctx.seen_train
        generator = torch.Generator().manual_seed(int(ctx.params.get("seed", 0)))
        n = min(self.config.calibration_images, len(train))
        index = torch.randperm(len(train), generator=generator)[:n]
        taus = torch.cat([self.tau(train.images[index[i : i + 256]]) for i in range(0, n, 256)]).cpu()
        quantile = float(torch.quantile(taus, self.config.tau_quantile))
        if self.threshold is None:
            self.threshold = quantile
        self.calibration = {
            "images": n,
            "tau_mean": round(float(taus.mean()), 5),
            "tau_std": round(float(taus.std()), 5),
            "tau_quantiles": tau_quantiles(taus),
            "calibrated_threshold": round(quantile, 5),
            "threshold_in_use": round(float(self.threshold), 5),
            "fraction_below_threshold": round(float((taus < self.threshold).float().mean()), 4),
        }
        ctx.findings["tau_clean_train"] = self.calibration

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        n, steps = len(images), self.config.ttc_steps
        self.counter.images += n
        self.counter.forward += n * (steps + 2)  # input embedding, one per step, final prediction
        self.counter.backward += n * steps
        out = self.counterattack(images)
        with torch.no_grad():
            return self._base()(images + out.delta)

    def attack_surface(self) -> Predictor:
        """BPDA: the counterattack perturbation is recomputed for the current input (fresh noise) and
        added as a constant, so the gradient reaches the input through the frozen encoder only."""

        def surface(images: torch.Tensor) -> torch.Tensor:
            delta = self.counterattack(images.detach()).delta
            return self._base()(images + delta)

        return surface


# ------------------------------------------------------------------------------------ Anti-Adversary


@dataclass
class AntiAdversaryConfig:
    """Anti-Adversary's hyperparameters (the official README's setting: ``k 2``, ``alpha 0.15``).

    Attributes:
        k: signed-gradient steps.
        alpha: step size on [0, 1] pixels (the official CIFAR-10 models take unnormalised [0, 1] input).
        clip_to_valid: clip the moved image to [0, 1] (the official wrapper does not).
        bpda_point: where the adaptive attack takes the base model's gradient. ``input``: at the
            input itself (the layer is the identity in the backward pass and its whole effect is a
            constant offset of the logits); ``moved``: at the moved image x + a(x) (the offset a is a
            constant added to the input). Both forward the full defended pipeline.
    """

    k: int = 2
    alpha: float = 0.15
    clip_to_valid: bool = False
    bpda_point: str = "input"


class AntiAdversary(TrainingFreeDefense):
    """The anti-adversary layer (Alfarra et al., AAAI 2022) in front of the zero-shot classifier."""

    id = "anti-adversary"
    config_class = AntiAdversaryConfig

    def anti_adversary(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(perturbation, initial logits)``: ``k`` steps lowering the cross-entropy of the initial
        prediction (no graph to ``images``)."""
        cfg = self.config
        base = self._base()
        x = images.detach()
        with torch.no_grad():
            initial = base(x)
        pseudo = initial.argmax(dim=-1)
        anti = torch.zeros_like(x)
        with torch.enable_grad():
            for _ in range(cfg.k):
                a = anti.detach().requires_grad_(True)
                loss = F.cross_entropy(base(self._moved(x, a)), pseudo)
                grad = torch.autograd.grad(loss, a)[0]
                anti = a.detach() - cfg.alpha * grad.sign()
        return self._moved(x, anti) - x, initial

    def _moved(self, x: torch.Tensor, anti: torch.Tensor) -> torch.Tensor:
        return (x + anti).clamp(0, 1) if self.config.clip_to_valid else x + anti

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        n, k = len(images), self.config.k
        self.counter.images += n
        if k == 0 or self.config.alpha == 0:
            self.counter.forward += n
            with torch.no_grad():
                return self._base()(images)
        self.counter.forward += n * (k + 2)  # pseudo-label, one per step, final prediction
        self.counter.backward += n * k
        delta, _ = self.anti_adversary(images)
        with torch.no_grad():
            return self._base()(images + delta)

    def attack_surface(self) -> Predictor:
        """BPDA over the layer, recomputed for the current input. The logits are the defended pipeline's.

        With ``bpda_point: moved`` the anti-adversarial offset a(x) is a constant added to the input, so
        the gradient is the base model's at x + a(x). With ``input`` (default) the gradient is the base
        model's at x itself. The layer only reinforces the base model's own prediction at x, so the
        pipeline's decision follows that prediction, and its gradient at the input is the informative one.
        """
        point = self.config.bpda_point
        if point not in {"input", "moved"}:
            raise ValueError(f"AntiAdversary: bpda_point must be 'input' or 'moved', not {point!r}")

        def surface(images: torch.Tensor) -> torch.Tensor:
            base = self._base()
            if self.config.k == 0 or self.config.alpha == 0:
                return base(images)
            delta, _ = self.anti_adversary(images.detach())
            if point == "moved":
                return base(images + delta)
            at_input = base(images)
            with torch.no_grad():
                defended = base(images.detach() + delta)
            return at_input + (defended - at_input.detach())

        return surface


# ------------------------------------------------------------------------------------------- CLIPure


@dataclass
class CLIPureConfig:
    """CLIPure-Cos' hyperparameters (official code: 10 steps of size 30, class-free ensemble templates).

    Attributes:
        steps: purification steps on the sphere.
        step_size: length of each normalised step (before re-projection onto the sphere).
        norm_scope: ``sample`` normalises each image's gradient by its own L2 norm; ``batch`` by the
            norm of the whole batch's gradient tensor, as the official code does (then the step each
            image receives depends on the batch it is classified in).
        blank: ``ensemble`` — the mean of the unit embeddings of every prompt template with an empty
            class name (the official code's choice); any other string is used as the single blank prompt.
    """

    steps: int = 10
    step_size: float = 30.0
    norm_scope: str = "sample"
    blank: str = "ensemble"


class CLIPure(TrainingFreeDefense):
    """CLIPure-Cos (Zhang et al., ICLR 2025): purification of the image embedding in CLIP's latent space."""

    id = "clipure"
    config_class = CLIPureConfig

    def __init__(self, config: CLIPureConfig | None = None) -> None:
        super().__init__(config)
        self.blank_embedding: torch.Tensor | None = None
        self.blank_prompts: list[str] = []

    def bind(self, classifier: ZeroShotClassifier) -> None:
        super().bind(classifier)
        prompts = classifier.prompts
        if self.config.blank == "ensemble":
            self.blank_prompts = [t.format(name="", digit="") for t in prompts.templates]
        else:
            self.blank_prompts = [self.config.blank]
        with torch.no_grad():
            embeddings = classifier.clip.encode_texts(self.blank_prompts)
        self.blank_embedding = embeddings.mean(dim=0).detach()  # cosine ignores the norm of the mean

    def purify(
        self, embeddings: torch.Tensor, steps: int | None = None, step_size: float | None = None
    ) -> torch.Tensor:
        """Move ``embeddings`` (N, D) towards the blank-template embedding on their sphere (no graph).

        Each step: ``u ← normalise(u + s · d)`` where ``d`` is the normalised gradient of the cosine
        similarity to the blank embedding, taken w.r.t. the embedding and scaled by its norm (as the
        official code does), and the norm ``r`` of the embedding is kept."""
        cfg = self.config
        steps = cfg.steps if steps is None else steps
        step_size = cfg.step_size if step_size is None else step_size
        if self.blank_embedding is None:
            raise RuntimeError("CLIPure: call fit(ctx) before purifying")
        e = embeddings.detach()
        t = F.normalize(self.blank_embedding.to(e.dtype), dim=-1)
        for _ in range(steps):
            r = e.norm(dim=-1, keepdim=True)
            u = e / r
            cos = (u * t).sum(dim=-1, keepdim=True)
            # gradient of cos(e, t) w.r.t. e is (t - cos u) / r; scaled by r it is the tangent t - cos u
            ascent = t - cos * u
            if cfg.norm_scope == "batch":
                norm = ascent.norm().clamp_min(1e-12)
            else:
                norm = ascent.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            u = F.normalize(u + step_size * ascent / norm, dim=-1)
            e = r * u
        return e

    def purify_with_official_graph(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The purification as the official evaluation differentiates it: each step's direction is a
        constant (the official code takes it from ``autograd.grad`` without a graph), while the norm,
        the step and the re-projection onto the sphere stay in the graph. For diagnostics only."""
        cfg = self.config
        if self.blank_embedding is None:
            raise RuntimeError("CLIPure: call fit(ctx) before purifying")
        e = embeddings
        t = F.normalize(self.blank_embedding.to(e.dtype), dim=-1)
        for _ in range(cfg.steps):
            r = e.norm(dim=-1, keepdim=True)
            u = e / r
            with torch.no_grad():
                ascent = t - (u * t).sum(dim=-1, keepdim=True) * u
                if cfg.norm_scope == "batch":
                    direction = ascent / ascent.norm().clamp_min(1e-12)
                else:
                    direction = ascent / ascent.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            u = F.normalize(u + cfg.step_size * direction, dim=-1)
            e = r * u
        return e

    def official_graph_surface(self) -> Predictor:
        """``images -> logits`` differentiated through :meth:`purify_with_official_graph` (diagnostic)."""

        def surface(images: torch.Tensor) -> torch.Tensor:
            base = self._base()
            return base.logits_from_embeddings(self.purify_with_official_graph(base.embed(images)))

        return surface

    def blank_similarity(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of embeddings to the blank-template embedding."""
        if self.blank_embedding is None:
            raise RuntimeError("CLIPure: call fit(ctx) first")
        return F.cosine_similarity(embeddings, self.blank_embedding.to(embeddings.dtype).unsqueeze(0), dim=-1)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        base = self._base()
        self.counter.images += len(images)
        self.counter.forward += len(images)  # purification needs no extra pass of the image tower
        with torch.no_grad():
            return base.logits_from_embeddings(self.purify(base.embed(images)))

    def attack_surface(self) -> Predictor:
        """BPDA in latent space: the purification's displacement of the embedding is a constant offset."""

        def surface(images: torch.Tensor) -> torch.Tensor:
            base = self._base()
            embedding = base.embed(images)
            offset = (self.purify(embedding.detach()) - embedding.detach()).detach()
            return base.logits_from_embeddings(embedding + offset)

        return surface


# ----------------------------------------------------------------------------------------------- TTE


@dataclass
class TTEConfig:
    """TTE's views (the paper's best CIFAR setting: identity + flip + 4 crops + 4 flipped crops).

    Attributes:
        n_crops: shifted crops of the zero-padded image (offsets drawn once, distinct, never the identity).
        pad: zero padding in pixels before cropping back to the input size (paper: 4 px of 32).
        zoom: add the zoomed view and zoomed crops (the label-preserving replacement of the flips).
        zoom_margin: the zoom crops this many pixels from every side, then resizes back (bilinear).
        flip: add the paper's horizontal flips (off: a mirrored digit is not the same digit).
        average: ``logits`` (the official wrapper) or ``probs``.
        seed: seed of the crop offsets.
    """

    n_crops: int = 4
    pad: int = 1
    zoom: bool = True
    zoom_margin: int = 1
    flip: bool = False
    average: str = "logits"
    seed: int = 0


class TTE(TrainingFreeDefense):
    """Test-time transformation ensembling (Pérez et al., ICCV-W 2021) of the zero-shot classifier."""

    id = "tte"
    config_class = TTEConfig

    def __init__(self, config: TTEConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        side = 2 * cfg.pad + 1
        candidates = [(dy, dx) for dy in range(side) for dx in range(side) if (dy, dx) != (cfg.pad, cfg.pad)]
        if cfg.n_crops > len(candidates):
            raise ValueError(f"TTE: {cfg.n_crops} distinct crops need pad > {cfg.pad}")
        generator = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(len(candidates), generator=generator)[: cfg.n_crops]
        self.offsets: list[tuple[int, int]] = [candidates[int(i)] for i in order]
        self.view_names = self._view_names()

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        return {"n_crops": 2}

    def _view_names(self) -> list[str]:
        cfg = self.config
        names = ["identity"]
        if cfg.flip:
            names.append("flip")
        if cfg.zoom:
            names.append("zoom")
        names += [f"crop{o}" for o in self.offsets]
        if cfg.flip:
            names += [f"flip+crop{o}" for o in self.offsets]
        if cfg.zoom:
            names += [f"zoom+crop{o}" for o in self.offsets]
        return names

    def _crop(self, x: torch.Tensor, offset: tuple[int, int]) -> torch.Tensor:
        p = self.config.pad
        h, w = x.shape[-2:]
        padded = F.pad(x, (p, p, p, p))
        return padded[..., offset[0] : offset[0] + h, offset[1] : offset[1] + w]

    def _zoom(self, x: torch.Tensor) -> torch.Tensor:
        m = self.config.zoom_margin
        h, w = x.shape[-2:]
        inner = x[..., m : h - m, m : w - m]
        return F.interpolate(inner, size=(h, w), mode="bilinear", align_corners=False)

    def views(self, images: torch.Tensor) -> torch.Tensor:
        """All views, stacked (V, N, C, H, W), in the order of ``view_names``; every op is differentiable."""
        cfg = self.config
        out = [images]
        if cfg.flip:
            out.append(images.flip(-1))
        if cfg.zoom:
            out.append(self._zoom(images))
        out += [self._crop(images, o) for o in self.offsets]
        if cfg.flip:
            out += [self._crop(images.flip(-1), o) for o in self.offsets]
        if cfg.zoom:
            out += [self._crop(self._zoom(images), o) for o in self.offsets]
        return torch.stack(out)

    @property
    def n_views(self) -> int:
        """Views per image (forward passes per image)."""
        return len(self.view_names)

    def ensemble(self, images: torch.Tensor) -> torch.Tensor:
        """Averaged logits (or log of averaged probabilities) over the views; differentiable."""
        views = self.views(images)
        v, n = views.shape[:2]
        logits = self._base()(views.flatten(0, 1)).view(v, n, -1)
        if self.config.average == "probs":
            return torch.log(torch.softmax(logits, dim=-1).mean(dim=0).clamp_min(1e-12))
        return logits.mean(dim=0)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        self.counter.images += len(images)
        self.counter.forward += len(images) * self.n_views
        return self.ensemble(images)

    def attack_surface(self) -> Predictor:
        """The whole ensemble (differentiable end to end)."""
        return self.ensemble


DEFENSES: dict[str, type[TrainingFreeDefense]] = {d.id: d for d in (TTC, AntiAdversary, CLIPure, TTE)}


def tau_quantiles(taus: torch.Tensor) -> dict[str, float]:
    """Quantiles of τ values, keyed ``q05`` … ``q95``."""
    taus = taus.detach().float().cpu()
    levels = (0.05, 0.25, 0.5, 0.75, 0.95)
    return {f"q{round(100 * q):02d}": round(float(torch.quantile(taus, q)), 5) for q in levels}


def auc(negatives: torch.Tensor, positives: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    neg = negatives.detach().float().cpu().flatten()
    pos = positives.detach().float().cpu().flatten()
    greater = (pos.unsqueeze(1) > neg.unsqueeze(0)).float().mean()
    ties = (pos.unsqueeze(1) == neg.unsqueeze(0)).float().mean()
    return round(float(greater + 0.5 * ties), 4)


def base_adversarials(ctx: Context, eps_values: list[str], steps: int | None = None) -> dict[str, torch.Tensor]:
    """Non-adaptive PGD adversarial test images, crafted on the undefended ``ctx.base`` (seeded like the
    harness), keyed by the ε's display form ('4/255')."""
    from vlmdefense.workbench.attacks import PGD
    from vlmdefense.workbench.models import set_seed

    steps = int(ctx.params["sweep_attack"]["steps"]) if steps is None else steps
    out: dict[str, torch.Tensor] = {}
    test = ctx.sets.test
    for raw in eps_values:
        value, display = parse_epsilon(raw)
        set_seed(int(ctx.params.get("seed", 0)))
        attack = PGD(eps=value, steps=steps)
        batch = int(ctx.params["batch_size"])
        x, y = test.images, test.labels
        parts = [attack(ctx.base, x[i : i + batch], y[i : i + batch]) for i in range(0, len(y), batch)]
        out[display] = torch.cat(parts)
    return out


def accuracy_of(predict: Predictor, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (%) of ``predict`` on ``images``, rounded to 2 decimals."""
    with torch.no_grad():
        return round(100.0 * float((predict(images).argmax(-1) == labels).float().mean()), 2)


def view_accuracy(defense: TTE, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Clean accuracy (%) of the base classifier on each TTE view separately."""
    with torch.no_grad():
        views = defense.views(images)
        return {
            name: round(100.0 * float((defense._base()(v).argmax(-1) == labels).float().mean()), 2)
            for name, v in zip(defense.view_names, views, strict=True)
        }


def rotation_per_step(step_size: float) -> float:
    """Degrees a normalised tangent step of ``step_size`` turns a unit vector (CLIPure's update)."""
    return math.degrees(math.atan(step_size))
