"""What the models we train ourselves share (the small CLIP, the diffusion priors): the sha256 that ties
cached weights to their card, reusing a cache entry only when the two agree, the card's loss curve and
sample grid, the random shift that augments the digits, and reading a local ``diffusers`` UNet folder."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_weights(weights: Path, card: Path, write: Callable[[], Path], what: str) -> Path:
    """``weights`` when they and their ``card`` are cached and the card's sha256 matches the file; else the
    path ``write()`` returns after training them again (a mismatch is logged as a warning)."""
    if weights.is_file() and card.is_file():
        recorded = json.loads(card.read_text(encoding="utf-8")).get("sha256")
        if recorded == file_sha256(weights):
            return weights
        logger.warning("cached %s %s does not match its card: training it again", what, weights)
    return write()


def loss_curve(losses: list[float], points: int = 100) -> tuple[dict[str, Any], float]:
    """``({"every_steps", "mean_loss"}, final loss)`` of a card: the per-step losses averaged over windows of
    ``every_steps`` (at most ``points`` windows), and the mean of the last window."""
    every = max(1, math.ceil(len(losses) / points))
    windows = [losses[i : i + every] for i in range(0, len(losses), every)]
    curve = [round(sum(w) / len(w), 5) for w in windows]
    return {"every_steps": every, "mean_loss": curve}, round(sum(losses[-every:]) / len(losses[-every:]), 5)


def random_shift(images: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Each image shifted by up to ``pixels`` in x and y, zero (black) padding; ``images`` when ``pixels`` is 0."""
    if pixels <= 0:
        return images
    size = images.shape[-1]
    padded = F.pad(images, (pixels,) * 4)
    shifts = torch.randint(0, 2 * pixels + 1, (len(images), 2), generator=generator)
    return torch.stack([padded[i, :, dy : dy + size, dx : dx + size] for i, (dx, dy) in enumerate(shifts.tolist())])


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


def local_unet_dir(pretrained: str | Path, what: str) -> Path:
    """The folder of a local ``diffusers`` UNet (``pretrained`` or its ``unet/`` subfolder).

    Raises:
        FileNotFoundError: ``pretrained`` is not a directory.
    """
    path = Path(pretrained)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {path} not found (a local diffusers UNet directory)")
    if not (path / "config.json").is_file() and (path / "unet" / "config.json").is_file():
        path = path / "unet"
    return path


def local_linear_schedule(path: Path) -> torch.Tensor:
    """The linear β schedule of a local checkpoint's scheduler config (``scheduler_config.json`` beside the
    UNet, or in ``scheduler/`` or ``../scheduler/``); the DDPM default when none is there.

    Raises:
        ValueError: the config names another schedule or explicit betas.
    """
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
