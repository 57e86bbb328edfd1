"""A small diffusion prior over CLIP's unit image embeddings (CLIPure-Diff's likelihood model at small scale).

CLIPure-Diff (Zhang et al., ICLR 2025) scores an image embedding by the denoising loss of DALL-E 2's diffusion
prior (the LAION ``dalle2_pytorch`` prior for ViT-L/14). That prior models CLIP ViT-L/14 embeddings and does not
exist for the small CLIP of the smoke profile, so this module trains one by our recipe, as the small CLIP and
the small image prior are: an MLP that predicts the clean embedding x₀ from its noised version and the
timestep (``dalle2_pytorch``'s ``DiffusionPrior`` defaults: x₀ prediction, mean squared error, the cosine
schedule of Nichol & Dhariwal over 1,000 steps, unit embeddings scaled by √d), trained on the small CLIP's
embeddings of the training digits (all ten classes, as the small CLIP itself; a few randomly shifted copies
of each digit). Its weights and card (recipe, seed, loss curve, sha256) are cached under
``<cache>/models/vlmd-embedding-prior-<key>/``, written atomically; the key hashes the recipe and the
identity of the CLIP whose embeddings it models. :func:`load_embedding_prior` is the one loader: no path
means the cached small prior (trained on first use); a path is a local directory written by this module.
DALL-E 2 prior checkpoints are refused with a clear error: no installed library provides their network.
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
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlmdefense.fileio import atomic_write_bytes, atomic_write_json
from vlmdefense.workbench.data import load_digits_split
from vlmdefense.workbench.model_cache import cached_weights, file_sha256, loss_curve, random_shift
from vlmdefense.workbench.models import cache_dir, configure_threads, set_seed
from vlmdefense.workbench.progress import progress_bar
from vlmdefense.workbench.schedule import warmup_cosine_lr

if TYPE_CHECKING:
    from vlmdefense.workbench.clip import LoadedClip

logger = logging.getLogger(__name__)

EMBEDDING_PRIOR = "vlmd-embedding-prior"
LATE_STEPS = (900, 999)  # CLIPure-Diff's range of timesteps (official purify_zi: random.randint(900, 999))


@dataclass(frozen=True)
class EmbeddingPriorRecipe:
    """How the small embedding prior is trained (its hash, with the CLIP's identity, names the cache folder).

    Attributes:
        width, blocks, time_dim: the MLP (residual blocks of that width; sinusoidal timestep features).
        train_timesteps, cosine_s: the cosine noise schedule (``dalle2_pytorch``'s default for the prior).
        steps, batch_size, lr, weight_decay, warmup_fraction: AdamW with warm-up and cosine decay.
        ema_decay: exponential moving average of the weights (the saved weights are the average).
        shifted_copies, translate_px: extra randomly shifted copies of each training digit that are embedded.
    """

    width: int = 128
    blocks: int = 2
    time_dim: int = 64
    train_timesteps: int = 1000
    cosine_s: float = 0.008
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    ema_decay: float = 0.995
    shifted_copies: int = 3
    translate_px: int = 1
    seed: int = 0
    split_seed: int = 0
    data: str = "small CLIP's unit image embeddings of the sklearn-digits train split (80 %), all ten classes"

    def key(self, clip_id: str) -> str:
        """Short hash of the recipe and the identity of the CLIP whose embeddings are modelled."""
        payload = {"recipe": asdict(self), "clip": clip_id}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def cosine_alphas_cumprod(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """ᾱ_1 … ᾱ_N of the cosine schedule (β clipped at 0.999, as ``dalle2_pytorch``'s ``cosine_beta_schedule``)."""
    x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
    f = torch.cos(((x / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(0, 0.999)
    return torch.cumprod(1 - betas, dim=0).float()


def timestep_features(steps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features (N, dim) of integer timesteps."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=steps.device, dtype=torch.float32) / half)
    angles = steps.float().unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class EmbeddingDenoiser(nn.Module):
    """x₀ predictor: (noised scaled embedding, timestep) → clean scaled embedding. Residual MLP blocks with
    LayerNorm and SiLU (smooth, so the purification's gradient can itself be differentiated), the timestep's
    features added to every block."""

    def __init__(self, dim: int, width: int, blocks: int, time_dim: int) -> None:
        super().__init__()
        self.time_dim = time_dim
        self.inp = nn.Linear(dim, width)
        self.time = nn.Sequential(nn.Linear(time_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
            for _ in range(blocks)
        )
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))

    def forward(self, x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        t = self.time(timestep_features(steps, self.time_dim))
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h + t)
        return self.out(h)


@dataclass
class EmbeddingPrior:
    """A frozen x₀-predicting diffusion prior over unit embeddings, with its schedule.

    Attributes:
        net: the denoiser (eval mode, gradients off).
        alphas_cumprod: ᾱ_n, n = 1 … N (index n − 1; timesteps are 0-based as in ``dalle2_pytorch``).
        scale: the factor unit embeddings are multiplied by before diffusion (√d).
        source: the cache folder or local path it was loaded from.
        card: the model card.
    """

    net: nn.Module
    alphas_cumprod: torch.Tensor
    scale: float
    source: str
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def timesteps(self) -> int:
        """N, the number of discrete steps."""
        return len(self.alphas_cumprod)

    def loss(self, x0: torch.Tensor, steps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per-sample denoising loss (mean squared error of the x₀ prediction) of scaled embeddings ``x0``
        (N, d) noised to ``steps`` (N,) with ``noise`` (N, d): ``dalle2_pytorch``'s ``p_losses``, per sample."""
        abar = self.alphas_cumprod.to(x0.device, x0.dtype)[steps].unsqueeze(1)
        noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        return (self.net(noisy, steps) - x0).pow(2).mean(dim=1)

    def to(self, device: str) -> EmbeddingPrior:
        """The prior on ``device``."""
        self.net.to(device)
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self


def clip_identity(clip: LoadedClip) -> str:
    """What names a CLIP: the sha256 of its local checkpoint file, else ``name/pretrained``."""
    path = Path(clip.pretrained)
    if path.is_file():
        return file_sha256(path)
    return f"{clip.name}/{clip.pretrained}"


def digit_embeddings(clip: LoadedClip, recipe: EmbeddingPriorRecipe) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, test)`` unit embeddings of the digits (train: each digit plus its shifted copies)."""
    train, test = load_digits_split(clip.image_size, seed=recipe.split_seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    images = [train.images] + [
        random_shift(train.images, recipe.translate_px, generator) for _ in range(recipe.shifted_copies)
    ]
    with torch.no_grad():
        embedded = [clip.encode_images(x.to(clip.device)).cpu() for x in images]
        held_out = clip.encode_images(test.images.to(clip.device)).cpu()
    return torch.cat(embedded), held_out


@dataclass
class EmbeddingPriorTraining:
    """What :func:`train_embedding_prior` measured: wall and CPU seconds, threads, per-step losses."""

    seconds: float
    cpu_seconds: float
    threads: int
    losses: list[float]


def train_embedding_prior(
    recipe: EmbeddingPriorRecipe, embeddings: torch.Tensor, progress: bool = True
) -> tuple[EmbeddingDenoiser, EmbeddingPriorTraining]:
    """Train the denoiser on unit ``embeddings`` (N, d) with uniform random timesteps; returns the EMA weights."""
    configure_threads()
    set_seed(recipe.seed)
    dim = embeddings.shape[1]
    net = EmbeddingDenoiser(dim, recipe.width, recipe.blocks, recipe.time_dim)
    ema = EmbeddingDenoiser(dim, recipe.width, recipe.blocks, recipe.time_dim)
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    prior = EmbeddingPrior(net, cosine_alphas_cumprod(recipe.train_timesteps, recipe.cosine_s), math.sqrt(dim), "")
    optimizer = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    generator = torch.Generator().manual_seed(recipe.seed)
    data = embeddings * prior.scale
    losses: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    bar = progress_bar(total=recipe.steps, desc="train small embedding prior", disable=not progress)
    net.train()
    for step in range(recipe.steps):
        batch = data[torch.randint(0, len(data), (recipe.batch_size,), generator=generator)]
        steps = torch.randint(0, recipe.train_timesteps, (len(batch),), generator=generator)
        noise = torch.randn(batch.shape, generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(step, recipe.steps, recipe.lr, recipe.warmup_fraction)
        loss = prior.loss(batch, steps, noise).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for averaged, current in zip(ema.parameters(), net.parameters(), strict=True):
                averaged.lerp_(current, 1 - recipe.ema_decay)
        losses.append(loss.item())
        bar.update(1)
    bar.close()
    ema.eval()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return ema, EmbeddingPriorTraining(seconds, cpu, torch.get_num_threads(), losses)


def embedding_prior_paths(recipe: EmbeddingPriorRecipe, clip_id: str, root: Path | None = None) -> tuple[Path, Path]:
    """``(weights, card)`` of a recipe and CLIP in the cache."""
    folder = (root or cache_dir()) / "models" / f"{EMBEDDING_PRIOR}-{recipe.key(clip_id)}"
    return folder / "model.pt", folder / "card.json"


def held_out_loss(prior: EmbeddingPrior, embeddings: torch.Tensor, low: int, high: int, seed: int) -> float:
    """Mean denoising loss of unit ``embeddings`` at seeded uniform timesteps in [low, high]."""
    generator = torch.Generator().manual_seed(seed)
    steps = torch.randint(low, high + 1, (len(embeddings),), generator=generator)
    noise = torch.randn(embeddings.shape, generator=generator)
    with torch.no_grad():
        return float(prior.loss(embeddings * prior.scale, steps, noise).mean())


def write_embedding_prior(
    recipe: EmbeddingPriorRecipe, clip: LoadedClip, progress: bool = True
) -> tuple[Path, dict[str, Any]]:
    """Train the small embedding prior on ``clip``'s embeddings and write its weights and card atomically."""
    clip_id = clip_identity(clip)
    weights, card_path = embedding_prior_paths(recipe, clip_id)
    train, test = digit_embeddings(clip, recipe)
    net, report = train_embedding_prior(recipe, train, progress=progress)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    atomic_write_bytes(weights, buffer.getvalue())
    prior = EmbeddingPrior(
        net, cosine_alphas_cumprod(recipe.train_timesteps, recipe.cosine_s), math.sqrt(train.shape[1]), ""
    )
    curve, final_loss = loss_curve(report.losses)
    card = {
        "model": EMBEDDING_PRIOR,
        "recipe": asdict(recipe),
        "recipe_key": recipe.key(clip_id),
        "clip": {"name": clip.name, "identity": clip_id},
        "seed": recipe.seed,
        "embedding_dim": int(train.shape[1]),
        "parameters": sum(p.numel() for p in net.parameters()),
        "train_embeddings": len(train),
        "train_seconds": round(report.seconds, 2),
        "train_cpu_seconds": round(report.cpu_seconds, 2),
        "threads": report.threads,
        "final_loss": final_loss,
        "loss_curve": curve,
        "metrics": {
            "test_denoising_mse": round(held_out_loss(prior, test, 0, recipe.train_timesteps - 1, recipe.seed), 5),
            "test_denoising_mse_late": round(held_out_loss(prior, test, *LATE_STEPS, recipe.seed), 5),
        },
        "sha256": file_sha256(weights),
        "torch": torch.__version__,
    }
    atomic_write_json(card_path, card)
    logger.info("small embedding prior: loss %.4f after %.1f s", card["final_loss"], report.seconds)
    return weights, card


def ensure_embedding_prior(clip: LoadedClip, recipe: EmbeddingPriorRecipe | None = None, progress: bool = True) -> Path:
    """The cached weights of ``recipe`` for ``clip``, trained first when missing or not matching their card."""
    recipe = recipe or EmbeddingPriorRecipe()
    weights, card_path = embedding_prior_paths(recipe, clip_identity(clip))
    return cached_weights(
        weights, card_path, lambda: write_embedding_prior(recipe, clip, progress=progress)[0], "embedding prior"
    )


def _from_folder(folder: Path) -> EmbeddingPrior:
    """A prior from a folder with ``model.pt`` and ``card.json`` as :func:`write_embedding_prior` writes them."""
    card = json.loads((folder / "card.json").read_text(encoding="utf-8"))
    recipe = EmbeddingPriorRecipe(**card["recipe"])
    dim = int(card["embedding_dim"])
    net = EmbeddingDenoiser(dim, recipe.width, recipe.blocks, recipe.time_dim)
    net.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    abar = cosine_alphas_cumprod(recipe.train_timesteps, recipe.cosine_s)
    return EmbeddingPrior(net, abar, math.sqrt(dim), str(folder), card)


def load_embedding_prior(
    pretrained: str | Path | None = None,
    clip: LoadedClip | None = None,
    device: str = "cpu",
    recipe: EmbeddingPriorRecipe | None = None,
) -> EmbeddingPrior:
    """The one loader of embedding priors, in eval mode with gradients off. Never downloads.

    Args:
        pretrained: ``None`` (or empty): the cached small prior of ``recipe`` for ``clip`` (trained on first
            use). Else a local folder with ``model.pt`` and ``card.json`` written by this module.
        clip: the CLIP whose embeddings the small prior models (needed when ``pretrained`` is empty).
        device: where the network goes.
        recipe: the small prior's recipe (default :class:`EmbeddingPriorRecipe`).

    Raises:
        FileNotFoundError: the local path does not exist.
        ValueError: no CLIP for the small prior, or a checkpoint this module cannot read (such as the
            DALL-E 2 prior of ``dalle2_pytorch``, whose network no installed library provides).
    """
    if not pretrained:
        if clip is None:
            raise ValueError("the small embedding prior needs the CLIP whose embeddings it models")
        recipe = recipe or EmbeddingPriorRecipe()
        weights = ensure_embedding_prior(clip, recipe)
        prior = _from_folder(weights.parent)
    else:
        path = Path(pretrained)
        if not path.exists():
            raise FileNotFoundError(f"embedding prior {path} not found (a local folder with model.pt and card.json)")
        if not (path.is_dir() and (path / "card.json").is_file() and (path / "model.pt").is_file()):
            raise ValueError(
                f"{path}: not an embedding prior written by vlmdefense (model.pt and card.json). DALL-E 2's "
                "diffusion prior (a dalle2_pytorch DiffusionPrior state dict, CLIPure-Diff's choice) cannot be "
                "loaded: no installed library provides its network, and this project does not reimplement it"
            )
        prior = _from_folder(path)
    prior.net.eval().requires_grad_(False)
    return prior.to(device)
