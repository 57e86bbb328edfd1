"""The small diffusion prior of the smoke profile, and pretrained diffusion checkpoints from a local path.

As the small CLIP is (:mod:`vlmdefense.workbench.models`), the small prior is trained by our recipe on the
training digits (16×16, the [0, 1] grey RGB images the small CLIP sees, mapped to [-1, 1]): a
``diffusers.UNet2DModel`` that predicts the noise of a DDPM with the linear schedule of Ho et al. (β from
1e-4 to 0.02 over 1,000 steps, the discretisation of the VP-SDE with β_min = 0.1, β_max = 20 that DiffPure
integrates). Its weights, card (recipe, seed, loss curve, sha256) and a sample grid are cached under
``<cache>/models/vlmd-small-ddpm-<recipe key>/``, written atomically. :func:`load_diffusion_prior` is the one
loader: no path means the cached small prior (trained on first use); a path is a local ``diffusers``
UNet directory (e.g. a DDPM checkpoint saved with ``save_pretrained``), never downloaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vlmdefense.fileio import atomic_write_bytes, atomic_write_json
from vlmdefense.workbench.data import load_digits_split
from vlmdefense.workbench.model_cache import (
    cached_weights,
    file_sha256,
    grid_png,
    local_linear_schedule,
    local_unet_dir,
    loss_curve,
    random_shift,
)
from vlmdefense.workbench.models import cache_dir, configure_threads, set_seed
from vlmdefense.workbench.progress import progress_bar
from vlmdefense.workbench.schedule import warmup_cosine_lr

logger = logging.getLogger(__name__)

SMALL_PRIOR = "vlmd-small-ddpm"
GRID_STEPS = 100  # strided ancestral steps of the card's sample grid


@dataclass(frozen=True)
class PriorRecipe:
    """How the small prior is trained (its hash names the cached checkpoint).

    Attributes:
        channels: ``block_out_channels`` of the UNet (one resolution level each, no attention).
        layers_per_block: residual blocks per level.
        train_timesteps, beta_start, beta_end: the DDPM's linear noise schedule.
        steps: optimiser steps; batch_size: images per step; lr: AdamW peak rate (warm-up, cosine decay).
        ema_decay: exponential moving average of the weights (the saved weights are the average).
        translate_px: random shift of each training image (as the small CLIP's recipe).
    """

    channels: tuple[int, ...] = (16, 32, 32)
    layers_per_block: int = 1
    norm_groups: int = 8
    image_size: int = 16
    train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    steps: int = 800
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    ema_decay: float = 0.995
    translate_px: int = 1
    seed: int = 0
    split_seed: int = 0
    data: str = "sklearn-digits train split (80 %, stratified), all ten classes, grey RGB in [-1, 1]"

    def key(self) -> str:
        """Short hash of the recipe."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def unet_config(self) -> dict[str, Any]:
        """The ``UNet2DModel`` arguments."""
        levels = len(self.channels)
        return {
            "sample_size": self.image_size,
            "in_channels": 3,
            "out_channels": 3,
            "block_out_channels": list(self.channels),
            "down_block_types": ["DownBlock2D"] * levels,
            "up_block_types": ["UpBlock2D"] * levels,
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.norm_groups,
        }


@dataclass
class DiffusionPrior:
    """A noise-prediction UNet and its discrete linear noise schedule (images in [-1, 1]).

    Attributes:
        unet: ``diffusers.UNet2DModel`` in eval mode, gradients off.
        betas: the discrete schedule β_1 … β_N.
        source: the cache folder or local path it was loaded from.
        card: the model card (the small prior's; a pretrained checkpoint's config).
    """

    unet: Any
    betas: torch.Tensor
    source: str
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def timesteps(self) -> int:
        """N, the number of discrete steps of the schedule."""
        return len(self.betas)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_n = Π (1 − β_i), n = 1 … N."""
        return torch.cumprod(1 - self.betas, dim=0)

    @property
    def beta_range(self) -> tuple[float, float]:
        """(β_min, β_max) of the VP-SDE the linear schedule discretises: N·β_1 and N·β_N."""
        return float(self.betas[0]) * self.timesteps, float(self.betas[-1]) * self.timesteps

    @property
    def image_size(self) -> int:
        """The side the UNet was trained on."""
        size = self.unet.config.sample_size
        return int(size[0] if isinstance(size, list | tuple) else size)

    def noise(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """ε_θ(x, n) for [-1, 1] images ``x`` and integer steps ``timesteps`` (N,) in [0, N)."""
        return self.unet(x, timesteps).sample

    def to(self, device: str) -> DiffusionPrior:
        """The prior on ``device``."""
        self.unet.to(device)
        self.betas = self.betas.to(device)
        return self

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, steps: int | None = None) -> torch.Tensor:
        """``n`` ancestral DDPM samples in [0, 1] from pure noise (``steps`` strided steps; default all N)."""
        from diffusers import DDPMScheduler

        scheduler: Any = DDPMScheduler(
            num_train_timesteps=self.timesteps, trained_betas=self.betas.cpu().numpy(), clip_sample=True
        )
        scheduler.set_timesteps(steps or self.timesteps)
        device = self.betas.device
        x = torch.randn(n, 3, self.image_size, self.image_size, generator=generator).to(device)
        for t in scheduler.timesteps:
            eps = self.noise(x, torch.full((n,), int(t), device=device))
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
        return ((x + 1) / 2).clamp(0, 1)


def linear_betas(recipe: PriorRecipe) -> torch.Tensor:
    """The recipe's linear schedule (DDPMScheduler's ``linear``)."""
    return torch.linspace(recipe.beta_start, recipe.beta_end, recipe.train_timesteps, dtype=torch.float32)


@dataclass
class PriorTraining:
    """What :func:`train_prior` measured: wall and CPU seconds, the per-step losses."""

    seconds: float
    cpu_seconds: float
    threads: int
    losses: list[float]


def denoising_loss(
    unet: Any,
    x0: torch.Tensor,
    betas: torch.Tensor,
    generator: torch.Generator,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The DDPM objective (Ho et al.): mean squared error of the predicted noise at uniform random steps,
    conditioned on the class ``labels`` when given."""
    steps = torch.randint(0, len(betas), (len(x0),), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    abar = torch.cumprod(1 - betas, dim=0)[steps].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    predicted = unet(noisy, steps).sample if labels is None else unet(noisy, steps, class_labels=labels).sample
    return F.mse_loss(predicted, noise)


BatchLoss = Callable[[Any, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def train_unet(
    recipe: Any, images: torch.Tensor, batch_loss: BatchLoss, desc: str, progress: bool = True
) -> tuple[Any, PriorTraining]:
    """Train a ``UNet2DModel`` of ``recipe`` (seed, rate, batch, steps, shift, EMA) on [0, 1] ``images``, the
    batches in seeded random order, shifted, and scored by ``batch_loss(unet, indices, batch, generator)``;
    returns the EMA weights' model and what was measured."""
    from diffusers import UNet2DModel

    configure_threads()
    set_seed(recipe.seed)
    unet: Any = UNet2DModel(**recipe.unet_config())
    ema: Any = UNet2DModel(**recipe.unet_config())
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    generator = torch.Generator().manual_seed(recipe.seed)
    data = images * 2 - 1
    losses: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    unet.train()
    bar = progress_bar(total=recipe.steps, desc=desc, disable=not progress)
    order, cursor = torch.randperm(len(data), generator=generator), 0
    for step in range(recipe.steps):
        if cursor + recipe.batch_size > len(order):
            order, cursor = torch.randperm(len(data), generator=generator), 0
        index = order[cursor : cursor + recipe.batch_size]
        cursor += recipe.batch_size
        batch = random_shift(data[index] + 1, recipe.translate_px, generator) - 1  # pad with the background (-1)
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(step, recipe.steps, recipe.lr, recipe.warmup_fraction)
        loss = batch_loss(unet, index, batch, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for averaged, current in zip(ema.parameters(), unet.parameters(), strict=True):
                averaged.lerp_(current, 1 - recipe.ema_decay)
        losses.append(loss.item())
        bar.update(1)
    bar.close()
    ema.eval()
    report = PriorTraining(
        time.perf_counter() - start, time.process_time() - cpu_start, torch.get_num_threads(), losses
    )
    return ema, report


def train_prior(recipe: PriorRecipe, images: torch.Tensor, progress: bool = True) -> tuple[Any, PriorTraining]:
    """Train the UNet of ``recipe`` on [0, 1] ``images`` (N, 3, S, S); returns the EMA weights' model."""
    betas = linear_betas(recipe)

    def batch_loss(unet: Any, index: torch.Tensor, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return denoising_loss(unet, batch, betas, generator)

    return train_unet(recipe, images, batch_loss, "train small diffusion prior", progress)


def prior_paths(recipe: PriorRecipe | None = None, root: Path | None = None) -> tuple[Path, Path, Path]:
    """``(weights, card, sample grid)`` of a recipe in the cache."""
    recipe = recipe or PriorRecipe()
    folder = (root or cache_dir()) / "models" / f"{SMALL_PRIOR}-{recipe.key()}"
    return folder / "model.pt", folder / "card.json", folder / "samples.png"


def write_prior(recipe: PriorRecipe, progress: bool = True, grid: int = 64) -> tuple[Path, dict[str, Any]]:
    """Train the small prior and write its weights, card and sample grid (each atomically).

    Returns:
        The weights' path and the card.
    """
    import diffusers

    weights, card_path, grid_path = prior_paths(recipe)
    train, test = load_digits_split(recipe.image_size, seed=recipe.split_seed)
    unet, report = train_prior(recipe, train.images, progress=progress)
    buffer = io.BytesIO()
    torch.save(unet.state_dict(), buffer)
    atomic_write_bytes(weights, buffer.getvalue())
    prior = DiffusionPrior(unet, linear_betas(recipe), str(weights.parent))
    generator = torch.Generator().manual_seed(recipe.seed)
    with torch.no_grad():
        test_loss = float(denoising_loss(unet, test.images * 2 - 1, prior.betas, generator))
    samples = prior.sample(grid, torch.Generator().manual_seed(recipe.seed), steps=GRID_STEPS)
    atomic_write_bytes(grid_path, grid_png(samples))
    curve, final_loss = loss_curve(report.losses)
    card = {
        "model": SMALL_PRIOR,
        "recipe": asdict(recipe),
        "recipe_key": recipe.key(),
        "seed": recipe.seed,
        "unet": recipe.unet_config(),
        "parameters": sum(p.numel() for p in unet.parameters()),
        "train_images": len(train),
        "train_seconds": round(report.seconds, 2),
        "train_cpu_seconds": round(report.cpu_seconds, 2),
        "threads": report.threads,
        "final_loss": final_loss,
        "loss_curve": curve,
        "metrics": {"test_denoising_mse": round(test_loss, 5)},
        "sample_grid": {
            "file": grid_path.name,
            "images": grid,
            "sampler": f"ancestral DDPM, {GRID_STEPS} strided steps",
        },
        "sha256": file_sha256(weights),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }
    atomic_write_json(card_path, card)
    logger.info("small diffusion prior: loss %.4f after %.1f s", card["final_loss"], report.seconds)
    return weights, card


def ensure_prior(recipe: PriorRecipe | None = None, progress: bool = True) -> Path:
    """The cached weights of ``recipe``, trained first when missing or not matching their card."""
    recipe = recipe or PriorRecipe()
    weights, card_path, _ = prior_paths(recipe)
    return cached_weights(
        weights, card_path, lambda: write_prior(recipe, progress=progress)[0], "small diffusion prior"
    )


def prior_card(recipe: PriorRecipe | None = None) -> dict[str, Any]:
    """The card of the cached small prior (training it first if needed)."""
    ensure_prior(recipe)
    return json.loads(prior_paths(recipe)[1].read_text(encoding="utf-8"))


def load_diffusion_prior(
    pretrained: str | Path | None = None, device: str = "cpu", recipe: PriorRecipe | None = None
) -> DiffusionPrior:
    """The one loader of diffusion priors, in eval mode with gradients off.

    Args:
        pretrained: ``None`` (or empty): the cached small prior of ``recipe`` (trained on first use). Else
            a local ``diffusers`` ``UNet2DModel`` directory (``config.json`` and weights; a ``unet/``
            subfolder is looked into), with its scheduler config beside it if any. Never downloads.
        device: where the UNet goes.
        recipe: the small prior's recipe (default :class:`PriorRecipe`).

    Raises:
        FileNotFoundError: the local path is not a directory.
    """
    from diffusers import UNet2DModel

    if not pretrained:
        recipe = recipe or PriorRecipe()
        weights = ensure_prior(recipe)
        unet: Any = UNet2DModel(**recipe.unet_config())
        unet.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        card = json.loads(prior_paths(recipe)[1].read_text(encoding="utf-8"))
        prior = DiffusionPrior(unet, linear_betas(recipe), str(weights.parent), card)
    else:
        path = local_unet_dir(pretrained, "diffusion checkpoint")
        unet = UNet2DModel.from_pretrained(path, local_files_only=True)
        prior = DiffusionPrior(
            unet, local_linear_schedule(path), str(path), {"model": str(path), "unet": dict(unet.config)}
        )
    prior.unet.eval().requires_grad_(False)
    return prior.to(device)
