"""The class-conditional diffusion prior of the smoke profile: MirrorCheck's small text-to-image generator.

MirrorCheck renders the victim's output text back into a picture with a text-to-image model (Stable Diffusion
v1.5 with classifier-free guidance in the released code). For a classifier the text is the predicted label's
caption, so on the digits the cheapest faithful generator is a DDPM conditioned on the class: a
``diffusers.UNet2DModel`` with ``num_class_embeds`` (one embedding per digit plus a null class), trained as
the unconditional small prior is (:mod:`vlmdefense.workbench.diffusion_prior`: same data, schedule, shifts,
EMA and warm-up) with the label dropped to the null class on a fraction of the steps, so that sampling can
use classifier-free guidance (Ho & Salimans, 2022), as Stable Diffusion does. Weights, card (recipe, seed,
loss curve, sha256) and a sample grid (one row per class) are cached under
``<cache>/models/vlmd-small-cond-ddpm-<recipe key>/``. :func:`load_conditional_prior` is the one loader: no
path means the cached small prior (trained on first use); a path is a local class-conditional ``diffusers``
UNet directory, never downloaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmdefense.fileio import atomic_write_bytes, atomic_write_json
from vlmdefense.workbench.data import load_digits_split
from vlmdefense.workbench.diffusion_prior import PriorTraining, denoising_loss, train_unet
from vlmdefense.workbench.model_cache import (
    cached_weights,
    file_sha256,
    grid_png,
    local_linear_schedule,
    local_unet_dir,
    loss_curve,
)
from vlmdefense.workbench.models import cache_dir

logger = logging.getLogger(__name__)

SMALL_CONDITIONAL_PRIOR = "vlmd-small-cond-ddpm"


@dataclass(frozen=True)
class ConditionalRecipe:
    """How the class-conditional prior is trained (its hash names the cached checkpoint).

    Attributes:
        classes: number of classes; the UNet has one more embedding, the null class of guidance.
        label_dropout: share of training images whose label is replaced by the null class.
        The others as :class:`~vlmdefense.workbench.diffusion_prior.PriorRecipe`.
    """

    classes: int = 10
    label_dropout: float = 0.1
    channels: tuple[int, ...] = (16, 32, 32)
    layers_per_block: int = 1
    norm_groups: int = 8
    image_size: int = 16
    train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    steps: int = 700
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    ema_decay: float = 0.995
    translate_px: int = 1
    seed: int = 0
    split_seed: int = 0
    data: str = "sklearn-digits train split (80 %, stratified), all ten classes with labels, grey RGB in [-1, 1]"

    def key(self) -> str:
        """Short hash of the recipe."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def unet_config(self) -> dict[str, Any]:
        """The ``UNet2DModel`` arguments (class embeddings added to the time embedding)."""
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
            "num_class_embeds": self.classes + 1,
        }


@dataclass
class ConditionalPrior:
    """A class-conditional noise-prediction UNet and its linear schedule (images in [-1, 1]).

    Attributes:
        unet: ``diffusers.UNet2DModel`` with class embeddings, eval mode, gradients off.
        betas: the discrete schedule β_1 … β_N.
        null_class: the label of the unconditional prediction (guidance).
        source, card: where it was loaded from and its model card.
    """

    unet: Any
    betas: torch.Tensor
    null_class: int
    source: str
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        """The side the UNet was trained on."""
        size = self.unet.config.sample_size
        return int(size[0] if isinstance(size, list | tuple) else size)

    def noise(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor, guidance: float) -> torch.Tensor:
        """Guided ε: ε(x, ∅) + w (ε(x, y) − ε(x, ∅)); w = 1 is the plain conditional prediction."""
        if guidance == 1.0:
            return self.unet(x, timesteps, class_labels=labels).sample
        null = torch.full_like(labels, self.null_class)
        both = self.unet(torch.cat([x, x]), torch.cat([timesteps, timesteps]), class_labels=torch.cat([labels, null]))
        cond, uncond = both.sample.chunk(2)
        return uncond + guidance * (cond - uncond)

    def to(self, device: str) -> ConditionalPrior:
        """The prior on ``device``."""
        self.unet.to(device)
        self.betas = self.betas.to(device)
        return self

    @torch.no_grad()
    def sample(
        self, labels: torch.Tensor, steps: int, guidance: float = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One image per label in [0, 1]: deterministic DDIM (η = 0) over ``steps`` strided steps from Gaussian
        noise (drawn from ``generator``, else torch's global generator), with classifier-free guidance."""
        from diffusers import DDIMScheduler

        scheduler: Any = DDIMScheduler(
            num_train_timesteps=len(self.betas), trained_betas=self.betas.cpu().numpy(), clip_sample=True
        )
        scheduler.set_timesteps(steps)
        device = self.betas.device
        n = len(labels)
        shape = (n, 3, self.image_size, self.image_size)
        x = torch.randn(shape, generator=generator).to(device)
        labels = labels.to(device)
        for t in scheduler.timesteps:
            eps = self.noise(x, torch.full((n,), int(t), device=device), labels, guidance)
            x = scheduler.step(eps, t, x).prev_sample
        return ((x + 1) / 2).clamp(0, 1)


def schedule(recipe: ConditionalRecipe) -> torch.Tensor:
    """The recipe's linear β schedule (as the unconditional prior's)."""
    return torch.linspace(recipe.beta_start, recipe.beta_end, recipe.train_timesteps, dtype=torch.float32)


def train_conditional_prior(
    recipe: ConditionalRecipe, images: torch.Tensor, labels: torch.Tensor, progress: bool = True
) -> tuple[Any, PriorTraining]:
    """Train the UNet of ``recipe`` on [0, 1] ``images`` with their ``labels`` (each replaced by the null class
    with probability ``label_dropout``, for guidance); returns the EMA model and what was measured."""

    betas = schedule(recipe)

    def batch_loss(unet: Any, index: torch.Tensor, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        drop = torch.rand(len(index), generator=generator) < recipe.label_dropout
        batch_labels = torch.where(drop, torch.full_like(labels[index], recipe.classes), labels[index])
        return denoising_loss(unet, batch, betas, generator, batch_labels)

    return train_unet(recipe, images, batch_loss, "train class-conditional prior", progress)


def conditional_prior_paths(recipe: ConditionalRecipe | None = None) -> tuple[Path, Path, Path]:
    """``(weights, card, sample grid)`` of a recipe in the cache."""
    recipe = recipe or ConditionalRecipe()
    folder = cache_dir() / "models" / f"{SMALL_CONDITIONAL_PRIOR}-{recipe.key()}"
    return folder / "model.pt", folder / "card.json", folder / "samples.png"


GRID_STEPS = 20  # DDIM steps of the card's sample grid
GRID_GUIDANCE = 2.0


def write_conditional_prior(recipe: ConditionalRecipe, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Train the prior and write its weights, card and sample grid (each atomically)."""
    import diffusers

    weights, card_path, grid_path = conditional_prior_paths(recipe)
    train, test = load_digits_split(recipe.image_size, seed=recipe.split_seed)
    unet, report = train_conditional_prior(recipe, train.images, train.labels, progress=progress)
    buffer = io.BytesIO()
    torch.save(unet.state_dict(), buffer)
    atomic_write_bytes(weights, buffer.getvalue())
    prior = ConditionalPrior(unet, schedule(recipe), recipe.classes, str(weights.parent))
    generator = torch.Generator().manual_seed(recipe.seed)
    with torch.no_grad():
        test_loss = float(denoising_loss(unet, test.images * 2 - 1, prior.betas, generator, test.labels))
    per_class = 8
    grid_labels = torch.arange(recipe.classes).repeat_interleave(per_class)
    samples = prior.sample(grid_labels, GRID_STEPS, GRID_GUIDANCE, torch.Generator().manual_seed(recipe.seed))
    atomic_write_bytes(grid_path, grid_png(samples, columns=per_class))
    curve, final_loss = loss_curve(report.losses)
    card = {
        "model": SMALL_CONDITIONAL_PRIOR,
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
            "images": len(grid_labels),
            "rows": "one row per class, 0 to 9",
            "sampler": f"DDIM (eta 0), {GRID_STEPS} strided steps, guidance {GRID_GUIDANCE}",
        },
        "sha256": file_sha256(weights),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }
    atomic_write_json(card_path, card)
    logger.info("class-conditional prior: loss %.4f after %.1f s", card["final_loss"], report.seconds)
    return weights, card


def ensure_conditional_prior(recipe: ConditionalRecipe | None = None, progress: bool = True) -> Path:
    """The cached weights of ``recipe``, trained first when missing or not matching their card."""
    recipe = recipe or ConditionalRecipe()
    weights, card_path, _ = conditional_prior_paths(recipe)
    return cached_weights(
        weights, card_path, lambda: write_conditional_prior(recipe, progress=progress)[0], "conditional prior"
    )


def load_conditional_prior(
    pretrained: str | Path | None = None, device: str = "cpu", recipe: ConditionalRecipe | None = None
) -> ConditionalPrior:
    """The one loader of class-conditional priors, in eval mode with gradients off.

    Args:
        pretrained: ``None`` (or empty): the cached small prior of ``recipe`` (trained on first use). Else a
            local ``diffusers`` ``UNet2DModel`` directory with ``num_class_embeds`` (the last class is the null
            class of guidance; a ``unet/`` subfolder is looked into). Never downloads.
        device: where the UNet goes.
        recipe: the small prior's recipe (default :class:`ConditionalRecipe`).

    Raises:
        FileNotFoundError: the local path is not a directory.
        ValueError: the local UNet has no class embeddings.
    """
    from diffusers import UNet2DModel

    if not pretrained:
        recipe = recipe or ConditionalRecipe()
        weights = ensure_conditional_prior(recipe)
        unet: Any = UNet2DModel(**recipe.unet_config())
        unet.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        card = json.loads(conditional_prior_paths(recipe)[1].read_text(encoding="utf-8"))
        prior = ConditionalPrior(unet, schedule(recipe), recipe.classes, str(weights.parent), card)
    else:
        path = local_unet_dir(pretrained, "conditional diffusion checkpoint")
        unet = UNet2DModel.from_pretrained(path, local_files_only=True)
        classes = unet.config.num_class_embeds
        if not classes:
            raise ValueError(f"{path}: the UNet has no class embeddings (num_class_embeds)")
        card = {"model": str(path), "unet": dict(unet.config)}
        prior = ConditionalPrior(unet, local_linear_schedule(path), int(classes) - 1, str(path), card)
    prior.unet.eval().requires_grad_(False)
    return prior.to(device)
