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
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vlmdefense.fileio import atomic_write_bytes, atomic_write_json
from vlmdefense.workbench.data import load_digits_split
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


def _shift(images: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Each image shifted by up to ``pixels`` in x and y, zero (black) padding."""
    if pixels <= 0:
        return images
    size = images.shape[-1]
    padded = F.pad(images, (pixels,) * 4)
    shifts = torch.randint(0, 2 * pixels + 1, (len(images), 2), generator=generator)
    return torch.stack([padded[i, :, dy : dy + size, dx : dx + size] for i, (dx, dy) in enumerate(shifts.tolist())])


@dataclass
class PriorTraining:
    """What :func:`train_prior` measured: wall and CPU seconds, the per-step losses."""

    seconds: float
    cpu_seconds: float
    threads: int
    losses: list[float]


def denoising_loss(unet: Any, x0: torch.Tensor, betas: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The DDPM objective (Ho et al.): mean squared error of the predicted noise at uniform random steps."""
    steps = torch.randint(0, len(betas), (len(x0),), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    abar = torch.cumprod(1 - betas, dim=0)[steps].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    return F.mse_loss(unet(noisy, steps).sample, noise)


def train_prior(recipe: PriorRecipe, images: torch.Tensor, progress: bool = True) -> tuple[Any, PriorTraining]:
    """Train the UNet of ``recipe`` on [0, 1] ``images`` (N, 3, S, S); returns the EMA weights' model."""
    from diffusers import UNet2DModel

    configure_threads()
    set_seed(recipe.seed)
    unet: Any = UNet2DModel(**recipe.unet_config())
    ema: Any = UNet2DModel(**recipe.unet_config())
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    generator = torch.Generator().manual_seed(recipe.seed)
    betas = linear_betas(recipe)
    data = images * 2 - 1
    losses: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    unet.train()
    bar = progress_bar(total=recipe.steps, desc="train small diffusion prior", disable=not progress)
    order = torch.randperm(len(data), generator=generator)
    cursor = 0
    for step in range(recipe.steps):
        if cursor + recipe.batch_size > len(order):
            order, cursor = torch.randperm(len(data), generator=generator), 0
        batch = data[order[cursor : cursor + recipe.batch_size]]
        cursor += recipe.batch_size
        batch = _shift(batch + 1, recipe.translate_px, generator) - 1  # pad with the background (-1)
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(step, recipe.steps, recipe.lr, recipe.warmup_fraction)
        loss = denoising_loss(unet, batch, betas, generator)
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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prior_paths(recipe: PriorRecipe | None = None, root: Path | None = None) -> tuple[Path, Path, Path]:
    """``(weights, card, sample grid)`` of a recipe in the cache."""
    recipe = recipe or PriorRecipe()
    folder = (root or cache_dir()) / "models" / f"{SMALL_PRIOR}-{recipe.key()}"
    return folder / "model.pt", folder / "card.json", folder / "samples.png"


def grid_png(images: torch.Tensor, columns: int = 8, scale: int = 4) -> bytes:
    """[0, 1] images (N, 3, S, S) as one PNG grid, each image enlarged ``scale`` times."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(images.detach().cpu().clamp(0, 1), nrow=columns, padding=1, pad_value=0.5)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    image = Image.fromarray(array).resize((array.shape[1] * scale, array.shape[0] * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _curve(losses: list[float], every: int) -> list[float]:
    return [
        round(sum(chunk) / len(chunk), 5) for chunk in (losses[i : i + every] for i in range(0, len(losses), every))
    ]


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
    every = max(1, math.ceil(len(report.losses) / 100))
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
        "final_loss": round(sum(report.losses[-every:]) / every, 5),
        "loss_curve": {"every_steps": every, "mean_loss": _curve(report.losses, every)},
        "metrics": {"test_denoising_mse": round(test_loss, 5)},
        "sample_grid": {
            "file": grid_path.name,
            "images": grid,
            "sampler": f"ancestral DDPM, {GRID_STEPS} strided steps",
        },
        "sha256": _sha256(weights),
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
    if weights.is_file() and card_path.is_file():
        card = json.loads(card_path.read_text(encoding="utf-8"))
        if card.get("sha256") == _sha256(weights):
            return weights
        logger.warning("cached diffusion prior %s does not match its card: training it again", weights)
    weights, _ = write_prior(recipe, progress=progress)
    return weights


def prior_card(recipe: PriorRecipe | None = None) -> dict[str, Any]:
    """The card of the cached small prior (training it first if needed)."""
    ensure_prior(recipe)
    return json.loads(prior_paths(recipe)[1].read_text(encoding="utf-8"))


def _local_schedule(path: Path) -> torch.Tensor:
    """The linear schedule of a local checkpoint's scheduler config (``scheduler_config.json`` beside the
    UNet, or in ``scheduler/`` or ``../scheduler/``); the DDPM default when none is there."""
    for candidate in (path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json"):
        if candidate.is_file():
            break
    else:
        candidate = path.parent / "scheduler" / "scheduler_config.json"
    config = json.loads(candidate.read_text(encoding="utf-8")) if candidate.is_file() else {}
    if config.get("beta_schedule", "linear") != "linear" or config.get("trained_betas"):
        raise ValueError(f"{candidate}: only the linear schedule (a VP-SDE) is supported")
    n = int(config.get("num_train_timesteps", 1000))
    return torch.linspace(float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02)), n)


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
        path = Path(pretrained)
        if not path.is_dir():
            raise FileNotFoundError(f"diffusion checkpoint {path} not found (a local diffusers UNet directory)")
        if not (path / "config.json").is_file() and (path / "unet" / "config.json").is_file():
            path = path / "unet"
        unet = UNet2DModel.from_pretrained(path, local_files_only=True)
        prior = DiffusionPrior(unet, _local_schedule(path), str(path), {"model": str(path), "unet": dict(unet.config)})
    prior.unet.eval().requires_grad_(False)
    return prior.to(device)
