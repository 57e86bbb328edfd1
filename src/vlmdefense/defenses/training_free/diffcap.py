"""DiffCAP — diffusion-based cumulative adversarial purification (Fu et al., arXiv 2506.03933).

The input is noised step by step along the forward diffusion, x(t) = √ᾱ(t) x + √(1 − ᾱ(t)) ε with one draw ε
per image and t growing by ``dt`` per step; after each step the frozen CLIP image tower embeds the noisy
image, and noising stops at the first step whose embedding has cosine similarity above τ with the previous
step's (step 0 is the input itself), or at ``t_max``. The reverse VP-SDE of the frozen prior (the shared
solver of :mod:`~.diffusion_purification`) then runs from each image's own stopping time to 1e-5, in
⌈t_stop / reverse_dt⌉ Euler–Maruyama steps, and the frozen zero-shot CLIP classifies the result.

The stopping time depends on the image and is piecewise constant in it (zero gradient almost everywhere).
Adaptive attacks: ``full`` differentiates the diffusion and every sampling step at the stopping times the
rule chose for that draw (the exact gradient almost everywhere), averaged by EOT; ``bpda`` is the identity
over the purifier; :class:`SteeringAttack` also steers the stopping rule, pushing the cosine of the first
noising step above τ so that purification stops after one step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vlmdefense.defenses.training_free.diffusion_purification import DiffusionPurifier, diffuse, reverse_sde
from vlmdefense.workbench.attacks import PGD

if TYPE_CHECKING:
    from vlmdefense.defenses.base import Predictor
    from vlmdefense.workbench.diffusion_prior import DiffusionPrior


@dataclass
class DiffCAPConfig:
    """DiffCAP's hyperparameters (the paper's τ, step and cap were not readable: chosen on training digits).

    Attributes:
        tau: cosine-similarity threshold between consecutive noisy embeddings.
        dt: forward-diffusion time added per noising step (VP-SDE time in (0, 1]; N·dt discrete levels).
        t_max: the latest stopping time (noising ends there if the threshold is never met).
        reverse_dt: Euler–Maruyama step of the reverse SDE (DiffPure's official 1e-3; fewer steps on CPU).
        prior: empty for the small prior of the smoke profile; else a local diffusers UNet directory.
        prior_steps: training steps of the small prior (0: its recipe's).
        adaptive: the harness' adaptive surface, ``full`` (through the sampling steps) or ``bpda``.
        grad_checkpoint: recompute each sampling step in the backward pass of the ``full`` surface.
    """

    tau: float = 0.995
    dt: float = 0.01
    t_max: float = 0.3
    reverse_dt: float = 1e-3
    prior: str = ""
    prior_steps: int = 0
    adaptive: str = "full"
    grad_checkpoint: bool = False


def noising_levels(prior: DiffusionPrior, dt: float, t_max: float) -> list[int]:
    """Discrete levels (1 … N) of the noising steps: round(k·dt·N) for k = 1 … ⌊t_max/dt⌋, strictly growing."""
    n = prior.timesteps
    levels: list[int] = []
    for k in range(1, math.floor(t_max / dt + 1e-9) + 1):
        level = min(n, max(1, round(k * dt * n)))
        if not levels or level > levels[-1]:
            levels.append(level)
    if not levels:
        raise ValueError(f"DiffCAP: no noising step with dt={dt}, t_max={t_max}")
    return levels


def to_prior_space(prior: DiffusionPrior, images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images as the prior sees them: [-1, 1], resized to its side."""
    x = images * 2 - 1
    if images.shape[-1] != prior.image_size:
        x = F.interpolate(x, size=(prior.image_size, prior.image_size), mode="bilinear", align_corners=False)
    return x


def to_image_space(x: torch.Tensor, size: int) -> torch.Tensor:
    """[-1, 1] prior-space images back to [0, 1] at side ``size`` (unclipped, as DiffPure's output)."""
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x + 1) / 2


def noisy_view(prior: DiffusionPrior, x: torch.Tensor, level: int, noise: torch.Tensor, size: int) -> torch.Tensor:
    """What the encoder sees at ``level``: the diffused image in [0, 1] (clipped) at side ``size``."""
    return to_image_space(diffuse(prior, x, level, noise), size).clamp(0, 1)


def first_above(cosines: torch.Tensor, tau: float) -> torch.Tensor:
    """Per row, the index of the first column above ``tau``; the last index when none is (the cap)."""
    above = cosines > tau
    last = torch.full((len(cosines),), cosines.shape[1] - 1, dtype=torch.long, device=cosines.device)
    first = above.float().argmax(dim=1)
    return torch.where(above.any(dim=1), first, last)


@torch.no_grad()
def consecutive_cosines(
    prior: DiffusionPrior, embed: Predictor, images: torch.Tensor, noise: torch.Tensor, levels: list[int]
) -> torch.Tensor:
    """(n, K) cosines between the embeddings of consecutive noising steps (column k: step k+1 against step
    k; step 0 is the input), computed for every step."""
    x, size = to_prior_space(prior, images), images.shape[-1]
    previous = embed(images)
    columns = []
    for level in levels:
        current = embed(noisy_view(prior, x, level, noise, size))
        columns.append(F.cosine_similarity(current, previous, dim=-1))
        previous = current
    return torch.stack(columns, dim=1)


@torch.no_grad()
def stopping_steps(
    prior: DiffusionPrior, embed: Predictor, images: torch.Tensor, noise: torch.Tensor, levels: list[int], tau: float
) -> tuple[torch.Tensor, int]:
    """DiffCAP's stopping rule with early exit: per image, the index into ``levels`` of the first step whose
    embedding's cosine with the previous step's exceeds ``tau`` (the last step when none does). Returns the
    indices and the number of image-tower passes spent (the input's included)."""
    x, size = to_prior_space(prior, images), images.shape[-1]
    n = len(images)
    stop = torch.full((n,), len(levels) - 1, dtype=torch.long, device=images.device)
    active = torch.arange(n, device=images.device)
    previous = embed(images)
    passes = n
    for k, level in enumerate(levels[:-1]):
        current = embed(noisy_view(prior, x[active], level, noise[active], size))
        passes += len(active)
        done = F.cosine_similarity(current, previous, dim=-1) > tau
        stop[active[done]] = k
        active, previous = active[~done], current[~done]
        if active.numel() == 0:
            break
    return stop, passes


def reverse_from_levels(
    prior: DiffusionPrior,
    x: torch.Tensor,
    noise: torch.Tensor,
    stop_levels: torch.Tensor,
    reverse_dt: float,
    grad_checkpoint: bool = False,
) -> tuple[torch.Tensor, int]:
    """Diffuse each prior-space image to its own level and solve the reverse SDE from there (images grouped by
    level, lowest first; draws from torch's global generator). Returns the images and the UNet calls per
    image summed over the batch."""
    out = torch.zeros_like(x)
    calls = 0
    for level in torch.unique(stop_levels).tolist():
        index = (stop_levels == level).nonzero().flatten()
        t_stop = level / prior.timesteps
        steps = max(1, math.ceil(t_stop / reverse_dt - 1e-9))
        draws = [torch.randn_like(x[index]) for _ in range(steps)]
        noisy = diffuse(prior, x[index], int(level), noise[index])
        out = out.index_copy(0, index, reverse_sde(prior, noisy, t_stop, draws, grad_checkpoint))
        calls += steps * len(index)
    return out, calls


class DiffCAP(DiffusionPurifier):
    """DiffCAP (Fu et al., 2025) in front of the zero-shot classifier."""

    id = "diffcap"
    config_class = DiffCAPConfig
    config: DiffCAPConfig

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.last: dict[str, Any] = {}

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        return {"reverse_dt": 0.1, "prior_steps": 30}

    def levels(self) -> list[int]:
        """The discrete levels of the noising steps."""
        return noising_levels(self._prior(), self.config.dt, self.config.t_max)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen CLIP image tower (unit embeddings) that the stopping rule compares."""
        return self._base().embed(images)

    def stop_levels(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per image, the discrete level at which noising stops for this draw of ``noise`` (prior space)."""
        levels = self.levels()
        steps, passes = stopping_steps(self._prior(), self.embed, images.detach(), noise, levels, self.config.tau)
        self.last["tower_passes"] = passes / max(1, len(images))
        return torch.tensor(levels, device=images.device)[steps]

    def purify_with(self, images: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor, graph: bool) -> torch.Tensor:
        """Purified [0, 1] images when noising stops at ``levels`` with forward draw ``noise``."""
        prior = self._prior()
        with torch.set_grad_enabled(graph and torch.is_grad_enabled()):
            x = to_prior_space(prior, images)
            ckpt = self.config.grad_checkpoint and graph
            out, calls = reverse_from_levels(prior, x, noise, levels, self.config.reverse_dt, ckpt)
            self.last["unet_calls"] = calls / max(1, len(images))
            return to_image_space(out, images.shape[-1])

    def purify_images(self, images: torch.Tensor, graph: bool) -> torch.Tensor:
        prior = self._prior()
        noise = torch.randn(len(images), 3, prior.image_size, prior.image_size, device=images.device)
        levels = self.stop_levels(images, noise)
        self.last["t_stop"] = (levels.float() / prior.timesteps).cpu()
        return self.purify_with(images, noise, levels, graph)

    def unet_calls(self) -> int:
        """UNet evaluations per image of the last prediction (before any: those at ``t_max``)."""
        if "unet_calls" in self.last:
            return round(float(self.last["unet_calls"]))
        return max(1, math.ceil(self.config.t_max / self.config.reverse_dt - 1e-9))

    def image_tower_calls(self) -> int:
        """Image-tower passes per image: the stopping rule's (input and noised steps) and the final one."""
        return 1 + round(float(self.last.get("tower_passes", len(self.levels()))))

    def first_step_cosine(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Cosine between the input's embedding and the first noising step's, with gradients to ``images``."""
        prior = self._prior()
        x = to_prior_space(prior, images)
        first = noisy_view(prior, x, self.levels()[0], noise, images.shape[-1])
        return F.cosine_similarity(self.embed(first), self.embed(images), dim=-1)


@dataclass
class SteeringAttack:
    """PGD with EOT against DiffCAP that also steers its stopping rule.

    Per draw the objective is the summed cross-entropy of the defended pipeline at the stopping times the
    rule picks for that draw (gradient through the diffusion and every sampling step), plus
    ``weight`` · Σ min(cos₁ − τ − margin·(1 − τ), 0) / (1 − τ), where cos₁ is the cosine between the input's
    embedding and the first noising step's: pushing cos₁ above τ makes the rule stop after one step, where the
    purifier barely changes the image."""

    defense: DiffCAP
    eps: float
    steps: int = 10
    eot_samples: int = 1
    weight: float = 10.0
    margin: float = 0.2

    @property
    def name(self) -> str:
        """E.g. ``PGD-10+EOT-2 steering the stop``."""
        return PGD(eps=self.eps, steps=self.steps, eot_samples=self.eot_samples).name + " steering the stop"

    def objective(self, labels: torch.Tensor) -> Any:
        """The attack's objective of ``x`` (one draw of the defense's randomness per call)."""
        defense, tau = self.defense, self.defense.config.tau

        def value(x: torch.Tensor) -> torch.Tensor:
            prior = defense._prior()
            noise = torch.randn(len(x), 3, prior.image_size, prior.image_size, device=x.device)
            levels = defense.stop_levels(x, noise)
            logits = defense._base()(defense.purify_with(x, noise, levels, graph=True))
            cos = defense.first_step_cosine(x, noise)
            hinge = (cos - tau - self.margin * (1 - tau)).clamp(max=0) / (1 - tau)
            return F.cross_entropy(logits, labels, reduction="sum") + self.weight * hinge.sum()

        return value

    def __call__(self, model: Predictor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Adversarial ``images`` (``model`` is not used: the objective runs the defense itself)."""
        attack = PGD(eps=self.eps, steps=self.steps, eot_samples=self.eot_samples)
        return attack.maximise(self.objective(labels), images)
