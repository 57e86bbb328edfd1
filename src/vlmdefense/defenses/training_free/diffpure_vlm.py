"""DiffPure-VLM — diffusion purification in front of a noise-augmented fine-tuned model (Wang et al., 2025).

The paper observes that VLMs are fragile to plain Gaussian noise, fine-tunes them with Gaussian-noise
augmentation, and places a diffusion purifier in front of such a model: the purifier does not remove an
optimised perturbation, it turns it into Gaussian-like noise that the noise-robust model tolerates.

Two parts, both after the official code (JarvisUSTC/DiffPure-RobustVLM and the authors' LLaVA fork):

- **Noise-augmented fine-tuning** (the fork's ``CLIPImageProcessorWithNoise`` with LoRA on the vision
  tower): each training image gets, with probability 0.7, Gaussian noise of a standard deviation drawn
  uniformly from [0.05, 0.15] on [0, 1] pixels, clipped to [0, 1]. Here a copy of the small CLIP's image
  tower is fine-tuned on the seen classes' training images by the shared fine-tuning loop
  (:mod:`~vlmdefense.defenses.training_time.finetuning`, with no inner attack) on the zero-shot
  cross-entropy of the augmented images.
- **Purification** (``purification.py``, ``PurificationForward``): the image, mapped to [-1, 1], is diffused
  in closed form to discrete step t* (50, 100 or 150 of 1,000 in the released scripts) and denoised by the
  generalised DDIM update with η = 1 (``ddpm``, the default; η = 0 is ``ddim``) over the strided sequence
  the scripts build from t* and the number of denoising steps; the output goes to the model unclipped.

Adaptive surfaces (:mod:`~.diffusion_purification`): the full gradient through every denoising step (EOT
over the forward noise and the per-step draws), BPDA over the purifier, and the fine-tuned classifier alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vlmdefense.defenses.base import Predictor
from vlmdefense.defenses.training_free.diffusion_purification import DiffusionPurifier, diffuse
from vlmdefense.defenses.training_time.finetuning import AdversarialFineTuning, Batch, FineTuneConfig

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData
    from vlmdefense.workbench.diffusion_prior import DiffusionPrior
    from vlmdefense.workbench.evaluation import ZeroShotClassifier

SAMPLERS = {"ddpm": 1.0, "ddim": 0.0}  # η of the generalised DDIM update (official: ddpm)


def denoising_sequence(t_star: int, steps: int) -> list[int]:
    """The official strided timesteps (0-indexed) for t* forward steps and ``steps`` denoising steps:
    ``[s − 1, 2s − 1, …]`` up to t* with stride s = t* // steps (t* = steps gives every step below t*).

    Raises:
        ValueError: ``steps`` is not in 1 … t*.
    """
    if not 1 <= steps <= t_star:
        raise ValueError(f"denoising steps must be in 1 … t* = {t_star}, not {steps}")
    stride = t_star // steps
    return [i - 1 for i in range(stride, t_star + 1, stride)]


def denoise_step(
    prior: DiffusionPrior, x: torch.Tensor, t: int, t_next: int, z: torch.Tensor, eta: float
) -> torch.Tensor:
    """One generalised DDIM update from timestep ``t`` to ``t_next`` (−1: the data end) with draw ``z``:
    x̂₀ = (x − √(1 − ᾱ_t) ε) / √ᾱ_t, then √ᾱ_next x̂₀ + c₁ z + c₂ ε with c₁ = η √((1 − ᾱ_t/ᾱ_next)(1 − ᾱ_next)/(1 − ᾱ_t))
    and c₂ = √(1 − ᾱ_next − c₁²); ᾱ of −1 is 1. No clipping of x̂₀, as in the official code."""
    abar = prior.alphas_cumprod.to(x.dtype)
    at = abar[t]
    at_next = abar[t_next] if t_next >= 0 else torch.ones((), dtype=x.dtype, device=x.device)
    eps = prior.noise(x, torch.full((len(x),), t, device=x.device, dtype=torch.long))
    x0 = (x - eps * (1 - at).sqrt()) / at.sqrt()
    c1 = eta * ((1 - at / at_next) * (1 - at_next) / (1 - at)).sqrt()
    c2 = (1 - at_next - c1**2).clamp_min(0).sqrt()
    return at_next.sqrt() * x0 + c1 * z + c2 * eps


def ddpm_purify(
    prior: DiffusionPrior,
    images: torch.Tensor,
    t_star: int,
    steps: int,
    eta: float = 1.0,
    grad_checkpoint: bool = False,
) -> torch.Tensor:
    """DiffPure-VLM's purification of [0, 1] ``images``: to [-1, 1] (and the prior's side), diffused to
    discrete step t*, denoised over :func:`denoising_sequence`, back to [0, 1] (and the input's side). t* = 0
    is the identity. Every draw comes from torch's global generator before the first UNet call; the graph to
    ``images`` is kept when they require gradients."""
    if t_star <= 0:
        return images
    sequence = denoising_sequence(t_star, steps)
    size = images.shape[-1]
    x = images * 2 - 1
    if size != prior.image_size:
        x = F.interpolate(x, size=(prior.image_size, prior.image_size), mode="bilinear", align_corners=False)
    noise = torch.randn_like(x)
    draws = [torch.randn_like(x) for _ in sequence]
    x = diffuse(prior, x, t_star, noise)
    previous = [-1, *sequence[:-1]]
    for t, t_next, z in zip(reversed(sequence), reversed(previous), draws, strict=True):
        if grad_checkpoint and x.requires_grad:
            x = checkpoint(denoise_step, prior, x, t, t_next, z, eta, use_reentrant=False)
        else:
            x = denoise_step(prior, x, t, t_next, z, eta)
    if size != prior.image_size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x + 1) / 2


def gaussian_augment(images: torch.Tensor, prob: float, std_min: float, std_max: float) -> tuple[torch.Tensor, float]:
    """The official noise augmentation: each image, with probability ``prob``, plus Gaussian noise of a standard
    deviation drawn uniformly from [std_min, std_max], clipped to [0, 1]. Draws from torch's global generator;
    returns the images and the fraction that got noise."""
    n = len(images)
    shape = (n, 1, 1, 1)
    chosen = torch.rand(shape, device=images.device) < prob
    std = std_min + (std_max - std_min) * torch.rand(shape, device=images.device)
    noisy = (images + std * torch.randn_like(images)).clamp(0, 1)
    return torch.where(chosen, noisy, images), float(chosen.float().mean())


def gaussian_noised(images: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """``images`` plus N(0, σ²) noise from a generator seeded with ``seed``, clipped to [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator).to(images.device)
    return (images + sigma * noise).clamp(0, 1)


class NoiseAugmentedFineTuning(AdversarialFineTuning):
    """Fine-tuning of a copy of the image tower on the zero-shot cross-entropy of Gaussian-noise-augmented
    seen-class training images, through the shared loop with its inner attack switched off (ε = 0, no steps).
    Not a catalog method: DiffPure-VLM's fine-tuning stage."""

    def __init__(self, config: FineTuneConfig, prob: float, std_min: float, std_max: float) -> None:
        super().__init__(config)
        self.prob, self.std_min, self.std_max = prob, std_min, std_max

    def attack_objective(self, batch: Batch, x_adv: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self._logits(x_adv), batch["labels"])

    def training_loss(self, batch: Batch, x_adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        noisy, fraction = gaussian_augment(x_adv, self.prob, self.std_min, self.std_max)
        loss = F.cross_entropy(self._logits(noisy), batch["labels"])
        return loss, {"ce_augmented": loss.item(), "noised_fraction": fraction}

    def summary(self, data: FitData, seconds: float) -> dict[str, Any]:
        out = super().summary(data, seconds)
        out["method"] = "noise-augmented fine-tuning"
        out["augmentation"] = {"prob": self.prob, "std_min": self.std_min, "std_max": self.std_max}
        # the loop's after-step accuracy is measured at its attack's output: here the clean training images
        out["loss_curve"] = [
            {("train_clean_acc" if k == "train_adv_acc" else k): v for k, v in row.items()} for row in self.history
        ]
        for key in ("first_epoch", "last_epoch"):
            out[key] = out["loss_curve"][0 if key == "first_epoch" else -1] if self.history else None
        return out


@dataclass
class DiffPureVLMConfig:
    """DiffPure-VLM's hyperparameters (official: t* = 50, 100 or 150 with as many denoising steps, DDPM
    sampling; noise augmentation with probability 0.7 and σ ~ U[0.05, 0.15]; AdamW, weight decay 0.01,
    warm-up 3 %, cosine schedule).

    Attributes:
        t_star: forward diffusion steps of the 1,000-step schedule (0: no purification).
        steps: denoising steps (official: t*, every step; fewer: the official strided sequence).
        sampler: ``ddpm`` (η = 1, official default) or ``ddim`` (η = 0).
        noise_finetune: fine-tune the noise-augmented image tower (False: the plain CLIP behind the purifier).
        noise_prob, noise_std_min, noise_std_max: the augmentation.
        epochs, train_batch_size, lr, weight_decay, warmup_fraction, train_text, train_limit, seed: the
            fine-tuning budget (see :class:`~vlmdefense.defenses.training_time.finetuning.FineTuneConfig`).
        prior, prior_steps, adaptive, grad_checkpoint: as DiffPure's.
    """

    t_star: int = 50
    steps: int = 50
    sampler: str = "ddpm"
    noise_finetune: bool = True
    noise_prob: float = 0.7
    noise_std_min: float = 0.05
    noise_std_max: float = 0.15
    epochs: int = 10
    train_batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_fraction: float = 0.03
    train_text: str = "seen"
    train_limit: int | None = None
    seed: int = 0
    prior: str = ""
    prior_steps: int = 0
    adaptive: str = "full"
    grad_checkpoint: bool = False


class DiffPureVLM(DiffusionPurifier):
    """DiffPure-VLM (Wang et al., 2025): the DDPM purifier in front of a noise-augmented fine-tuned CLIP."""

    id = "diffpure-vlm"
    config_class = DiffPureVLMConfig
    config: DiffPureVLMConfig

    def __init__(self, config: DiffPureVLMConfig | None = None) -> None:
        super().__init__(config)
        self.tuner: NoiseAugmentedFineTuning | None = None

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        return {"steps": 2, "prior_steps": 30, "epochs": 1, "train_limit": 128}

    def tuner_config(self) -> FineTuneConfig:
        """The shared loop's budget for the noise-augmented fine-tuning (inner attack off)."""
        c = self.config
        return FineTuneConfig(
            epochs=c.epochs,
            train_batch_size=c.train_batch_size,
            optimizer="adamw",
            lr=c.lr,
            weight_decay=c.weight_decay,
            warmup_fraction=c.warmup_fraction,
            train_eps=0.0,
            steps=0,
            step_size=0.0,
            train_text=c.train_text,
            train_limit=c.train_limit,
            seed=c.seed,
        )

    def fit(self, data: FitData) -> dict[str, Any]:
        """Fine-tune the noise-augmented image tower (unless ``noise_finetune`` is off), load the prior, and
        put the purifier in front of the fine-tuned classifier."""
        c = self.config
        if c.sampler not in SAMPLERS:
            raise ValueError(f"diffpure-vlm: sampler must be one of {tuple(SAMPLERS)}, not {c.sampler!r}")
        if c.t_star > 0:
            denoising_sequence(c.t_star, c.steps)  # fail early on an impossible budget
        tuned: dict[str, Any] | None = None
        if c.noise_finetune:
            self.tuner = NoiseAugmentedFineTuning(self.tuner_config(), c.noise_prob, c.noise_std_min, c.noise_std_max)
            tuned = self.tuner.fit(data)
        findings = super().fit(data)
        if self.tuner is not None and self.tuner.classifier is not None:
            self.bind(self.tuner.classifier)
        return {**findings, "noise_finetuning": tuned}

    def tuned_classifier(self) -> ZeroShotClassifier:
        """The classifier behind the purifier (the fine-tuned one, or the plain CLIP)."""
        return self._base()

    def purify_images(self, images: torch.Tensor, graph: bool) -> torch.Tensor:
        c = self.config
        with torch.set_grad_enabled(graph and torch.is_grad_enabled()):
            return ddpm_purify(
                self._prior(), images, c.t_star, c.steps, SAMPLERS[c.sampler], c.grad_checkpoint and graph
            )

    def unet_calls(self) -> int:
        c = self.config
        return len(denoising_sequence(c.t_star, c.steps)) if c.t_star > 0 else 0

    def surfaces(self) -> dict[str, Predictor]:
        """The full-gradient and BPDA surfaces, and the classifier behind the purifier alone (the purifier
        skipped: what an attacker who ignores it would differentiate)."""
        return {**super().surfaces(), "classifier": self._base()}
