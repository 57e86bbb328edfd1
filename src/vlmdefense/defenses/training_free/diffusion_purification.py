"""What the diffusion purifiers (DiffPure, DiffCAP) share: the VP-SDE's forward diffusion, the Euler–Maruyama
solve of its reverse-time SDE, and the adaptive attack surfaces through them.

DiffPure's official SDE runner (NVlabs/DiffPure, ``runners/diffpure_sde.py``) maps images to [-1, 1], diffuses
them in closed form to step n* = t*·N of the discrete linear schedule (x = √ᾱ_n* x₀ + √(1 − ᾱ_n*) ε), and
integrates the reverse VP-SDE from t* to 1e-5 with Euler–Maruyama (torchsde, dt = 1e-3). Its score is
−ε_θ(x, ⌊tN⌋) / √(1 − ᾱ(t)) with the continuous ᾱ(t) = exp(−½(β_max − β_min)t² − β_min t); the output goes to
the classifier without clipping. Here the solver is written out, every random draw (ε and the Brownian
increments) is taken from torch's global generator before the solve, so that a seeded call repeats and a
differentiated call sees the same path as its forward pass.

Adaptive surfaces: ``full`` differentiates through every sampling step (the standard of Lee & Kim, ICCV
2023; optionally with per-step gradient checkpointing, recomputing each UNet call in the backward pass) and
is averaged over draws by the attack's EOT; ``bpda`` runs the purifier without a graph and passes the
classifier's gradient at the purified image straight back to the input (DiffPure's own BPDA+EOT baseline).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vlmdefense.defenses.base import Predictor
from vlmdefense.defenses.training_free.common import TrainingFreeDefense

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData
    from vlmdefense.workbench.diffusion_prior import DiffusionPrior, PriorRecipe

SURFACES = ("full", "bpda")
T_END = 1e-5  # the official solve stops at 1e-5, not 0


def abar_continuous(t: torch.Tensor, beta_min: float, beta_max: float) -> torch.Tensor:
    """ᾱ(t) of the VP-SDE with linear β(t) = β_min + t(β_max − β_min)."""
    return torch.exp(-0.5 * (beta_max - beta_min) * t**2 - beta_min * t)


def diffuse(prior: DiffusionPrior, x: torch.Tensor, level: int, noise: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images ``x`` diffused in closed form to discrete step ``level`` (1 … N) with ``noise``."""
    abar = prior.alphas_cumprod[level - 1].to(x.dtype)
    return abar.sqrt() * x + (1 - abar).sqrt() * noise


def reverse_step(prior: DiffusionPrior, x: torch.Tensor, t: float, dt: float, z: torch.Tensor) -> torch.Tensor:
    """One Euler–Maruyama step of the reverse VP-SDE from time ``t`` to ``t − dt`` (Brownian draw ``z``).

    In the forward time s = 1 − t of the official solver the drift is ½β(t)x + β(t)·score and the diffusion
    √β(t), so the step is x + (½βx + β·score)dt + √(β dt) z with score = −ε_θ(x, ⌊tN⌋) / √(1 − ᾱ(t))."""
    beta_min, beta_max = prior.beta_range
    n = prior.timesteps
    tt = torch.tensor(t, dtype=x.dtype, device=x.device)
    beta = beta_min + tt * (beta_max - beta_min)
    index = torch.full((len(x),), min(int(t * n), n - 1), device=x.device, dtype=torch.long)
    score = -prior.noise(x, index) / (1 - abar_continuous(tt, beta_min, beta_max)).sqrt()
    return x + (0.5 * beta * x + beta * score) * dt + (beta * dt).sqrt() * z


def reverse_sde(
    prior: DiffusionPrior, x: torch.Tensor, t_star: float, draws: list[torch.Tensor], grad_checkpoint: bool = False
) -> torch.Tensor:
    """Integrate the reverse SDE from ``t_star`` to 1e-5 in ``len(draws)`` equal Euler–Maruyama steps."""
    steps = len(draws)
    dt = (t_star - T_END) / steps
    for k, z in enumerate(draws):
        t = t_star - k * dt
        if grad_checkpoint and x.requires_grad:
            x = checkpoint(reverse_step, prior, x, t, dt, z, use_reentrant=False)
        else:
            x = reverse_step(prior, x, t, dt, z)
    return x


def purify(
    prior: DiffusionPrior, images: torch.Tensor, t_star: float, steps: int, grad_checkpoint: bool = False
) -> torch.Tensor:
    """DiffPure's purification of [0, 1] ``images``: to [-1, 1] (and the prior's size), diffuse to t*, solve
    back, to [0, 1] (and the input's size). t* = 0 is the identity. Draws from torch's global generator; the
    graph to ``images`` is kept when they require gradients."""
    if t_star <= 0:
        return images
    level = max(1, round(t_star * prior.timesteps))
    size = images.shape[-1]
    x = images * 2 - 1
    if size != prior.image_size:  # as the official ImageNet path: resize to the model's side and back
        x = F.interpolate(x, size=(prior.image_size, prior.image_size), mode="bilinear", align_corners=False)
    noise = torch.randn_like(x)
    draws = [torch.randn_like(x) for _ in range(steps)]
    x = reverse_sde(prior, diffuse(prior, x, level, noise), t_star, draws, grad_checkpoint)
    if size != prior.image_size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x + 1) / 2


class DiffusionPurifier(TrainingFreeDefense):
    """A diffusion purifier in front of the frozen zero-shot classifier. Subclasses implement
    :meth:`purify_images` (with ``graph`` the result keeps its graph to the input) and :meth:`unet_calls`.

    The config must have ``prior`` (empty: the small prior; else a local diffusers UNet directory),
    ``prior_steps`` (the small prior's training steps; 0: its recipe's), ``adaptive`` (one of
    :data:`SURFACES`) and ``grad_checkpoint``.
    """

    randomized = True

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.prior: DiffusionPrior | None = None

    def attach_prior(self, prior: DiffusionPrior) -> None:
        """Use ``prior`` (frozen) as the diffusion model."""
        self.prior = prior

    def fit(self, data: FitData) -> dict[str, Any]:
        """Bind the base classifier and load the prior named by the config; nothing is learned."""
        self.bind(data.base)
        if self.prior is None:
            self.attach_prior(self.load_prior(data.device))
        card = self._prior().card
        keys = ("model", "recipe_key", "sha256", "parameters", "train_seconds", "final_loss", "metrics")
        return {
            "prior": {k: card[k] for k in keys if k in card},
            "hyperparameters": self.hyperparameters(),
            "unet_evaluations_per_prediction": self.unet_calls(),
        }

    def prior_recipe(self) -> PriorRecipe:
        """The small prior's recipe (its training steps replaced when the config's ``prior_steps`` is set)."""
        from vlmdefense.workbench.diffusion_prior import PriorRecipe

        steps = int(self.config.prior_steps or 0)
        return replace(PriorRecipe(), steps=steps) if steps > 0 else PriorRecipe()

    def load_prior(self, device: str = "cpu") -> DiffusionPrior:
        """The prior the config names (the cached small prior, trained on first use, or a local checkpoint)."""
        from vlmdefense.workbench.diffusion_prior import load_diffusion_prior

        return load_diffusion_prior(self.config.prior or None, device=device, recipe=self.prior_recipe())

    def _prior(self) -> DiffusionPrior:
        if self.prior is None:
            raise RuntimeError(f"{type(self).__name__}: call fit (or attach_prior) before purifying")
        return self.prior

    def purify_images(self, images: torch.Tensor, graph: bool) -> torch.Tensor:
        """Purified [0, 1] images."""
        raise NotImplementedError

    def unet_calls(self) -> int:
        """UNet evaluations per image and prediction (fixed, or the mean of the last prediction)."""
        raise NotImplementedError

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        n = len(images)
        self.counter.images += n
        with torch.no_grad():
            purified = self.purify_images(images.detach(), graph=False)
            self.counter.forward += n * self.image_tower_calls()
            return self._base()(purified)

    def image_tower_calls(self) -> int:
        """Passes of CLIP's image tower per image and prediction (the final classification)."""
        return 1

    def surfaces(self) -> dict[str, Predictor]:
        """Both adaptive surfaces, keyed by :data:`SURFACES`; each forward is the defended pipeline's."""

        def full(images: torch.Tensor) -> torch.Tensor:
            return self._base()(self.purify_images(images, graph=True))

        def bpda(images: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                offset = self.purify_images(images.detach(), graph=False) - images.detach()
            return self._base()(images + offset)

        return {"full": full, "bpda": bpda}

    def attack_surface(self) -> Predictor:
        """The surface the config's ``adaptive`` names (default ``full``).

        Raises:
            ValueError: unknown surface.
        """
        mode = str(self.config.adaptive)
        if mode not in SURFACES:
            raise ValueError(f"{type(self).__name__}: adaptive must be one of {SURFACES}, not {mode!r}")
        return self.surfaces()[mode]
