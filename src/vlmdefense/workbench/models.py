"""CLIP models through open_clip: the small CLIP of the smoke profile and real pretrained weights.

A model is the pair ``(name, pretrained)``, exactly as in open_clip. The small CLIP is open_clip's own
``CLIP`` class with a registered config (``model_configs/vlmd-small-clip.json``), trained
contrastively by :class:`Recipe` on scikit-learn's digits. Its checkpoint is a plain state_dict cached
under a key that hashes the recipe and the config, so a fresh clone trains it once (under a minute on
two cores) and every later run loads it through ``open_clip.create_model_and_transforms``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from vlmdefense.fileio import atomic_write_bytes, atomic_write_json
from vlmdefense.workbench.clip import LoadedClip
from vlmdefense.workbench.data import ImageSet, PromptSpec, digit_prompts, load_digits_split
from vlmdefense.workbench.model_cache import cached_weights, file_sha256, random_shift
from vlmdefense.workbench.progress import progress_bar
from vlmdefense.workbench.schedule import warmup_cosine_lr

logger = logging.getLogger(__name__)

SMALL_CLIP = "vlmd-small-clip"
CONFIG_DIR = "model_configs"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_device() -> str:
    """``cuda`` when available, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


THREADS_ENV = "VLMDEFENSE_THREADS"


def configure_threads() -> None:
    """Use ``$VLMDEFENSE_THREADS`` threads (set by the executors for a job's share of the cores), else every
    core the process may use (the prototype: one thread was 1.5x slower on two cores)."""
    if os.environ.get(THREADS_ENV, "").strip().isdigit():
        torch.set_num_threads(max(1, int(os.environ[THREADS_ENV])))
        return
    try:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    except AttributeError:  # not on Linux
        torch.set_num_threads(max(1, os.cpu_count() or 1))


def register_small_clip() -> None:
    """Register the small CLIP's config with open_clip (needed in every process and kernel)."""
    if SMALL_CLIP in open_clip.list_models():
        return
    with as_file(files("vlmdefense").joinpath(CONFIG_DIR)) as config_dir:
        open_clip.add_model_config(config_dir)
    if SMALL_CLIP not in open_clip.list_models():  # add_model_config ignores a malformed config silently
        raise RuntimeError(f"open_clip did not register {SMALL_CLIP!r}: check its config JSON")


def small_clip_config() -> dict[str, Any]:
    """The registered open_clip config of the small CLIP."""
    text = files("vlmdefense").joinpath(f"{CONFIG_DIR}/{SMALL_CLIP}.json").read_text(encoding="utf-8")
    return json.loads(text)


def load_clip(name: str, pretrained: str | Path | None = None, device: str | None = None) -> LoadedClip:
    """Load ``(name, pretrained)`` through open_clip, in eval mode with frozen gradients off.

    Args:
        name: open_clip model name (``ViT-B-32``) or :data:`SMALL_CLIP`.
        pretrained: open_clip pretrained tag (``openai``; downloads on first use) or a local
            state_dict file. For the small CLIP, ``None`` means the cached checkpoint of the default
            recipe (trained on first use).
        device: ``cpu``/``cuda``; default: cuda when available.

    Raises:
        FileNotFoundError: a local checkpoint path does not exist.
    """
    device = device or default_device()
    if name == SMALL_CLIP:
        register_small_clip()
        if pretrained is None:
            pretrained = ensure_small_clip()
    if pretrained is not None and ("/" in str(pretrained) or str(pretrained).endswith((".pt", ".pth", ".bin"))):
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"checkpoint {pretrained} not found")
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=str(pretrained) if pretrained is not None else None, device=device
    )
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    normalize = next(t for t in preprocess.transforms if t.__class__.__name__ == "Normalize")
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, tuple | list) else image_size
    return LoadedClip(
        name=name,
        pretrained=str(pretrained),
        model=model,
        tokenizer=tokenizer,
        mean=tuple(float(m) for m in normalize.mean),
        std=tuple(float(s) for s in normalize.std),
        image_size=int(image_size),
        device=device,
    )


@dataclass(frozen=True)
class Recipe:
    """How the small CLIP is trained (its hash names the cached checkpoint)."""

    epochs: int = 40
    lr: float = 5e-4
    weight_decay: float = 0.05
    batch_size: int = 128
    warmup_fraction: float = 0.05
    translate_px: int = 1
    max_logit_scale: float = 100.0
    seed: int = 0
    split_seed: int = 0
    data: str = "sklearn-digits train split (80 %, stratified), captions from data/digits.yaml templates"

    def key(self) -> str:
        """Short hash of the recipe, the model config and the templates."""
        payload = {"recipe": asdict(self), "config": small_clip_config(), "prompts": digit_prompts().as_dict()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """Where trained checkpoints live: ``$VLMDEFENSE_CACHE`` or ``~/.cache/vlmdefense``."""
    base = os.environ.get("VLMDEFENSE_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlmdefense"


@dataclass
class TrainReport:
    """What :func:`train_small_clip` measured."""

    seconds: float
    final_loss: float
    losses: list[float] = field(default_factory=list)


def train_small_clip(
    recipe: Recipe, train: ImageSet, prompts: PromptSpec, progress: bool = True
) -> tuple[open_clip.CLIP, TrainReport]:
    """Train the small CLIP contrastively (open_clip's ``ClipLoss``) on captioned digits."""
    register_small_clip()
    configure_threads()
    set_seed(recipe.seed)
    model = open_clip.create_model(SMALL_CLIP, pretrained=None, device="cpu")
    tokenizer = open_clip.get_tokenizer(SMALL_CLIP)
    captions = torch.stack(
        [tokenizer(prompts.prompts(c)) for c in range(len(prompts.classnames))]
    )  # (classes, templates, context)
    loss_fn = open_clip.loss.ClipLoss()
    params_decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    params_rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": params_decay, "weight_decay": recipe.weight_decay}, {"params": params_rest, "weight_decay": 0.0}],
        lr=recipe.lr,
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    n = len(train)
    steps_per_epoch = math.ceil(n / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    step = 0
    bar = progress_bar(total=total, desc="train small CLIP", disable=not progress)
    for _ in range(recipe.epochs):
        order = torch.randperm(n, generator=generator)
        for b in range(steps_per_epoch):
            idx = order[b * recipe.batch_size : (b + 1) * recipe.batch_size]
            images = random_shift(train.images[idx], recipe.translate_px, generator)
            labels = train.labels[idx]
            template = torch.randint(0, captions.shape[1], (len(idx),), generator=generator)
            texts = captions[labels, template]
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine_lr(step, total, recipe.lr, recipe.warmup_fraction)
            image_features = F.normalize(model.encode_image((images - mean) / std), dim=-1)
            text_features = F.normalize(model.encode_text(texts), dim=-1)
            loss = loss_fn(image_features, text_features, model.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(recipe.max_logit_scale))
            losses.append(loss.item())
            step += 1
            bar.update(1)
    bar.close()
    model.eval()
    return model, TrainReport(seconds=time.perf_counter() - start, final_loss=losses[-1], losses=losses)


def small_clip_paths(recipe: Recipe | None = None, root: Path | None = None) -> tuple[Path, Path]:
    """``(checkpoint, card)`` paths of a recipe in the cache."""
    recipe = recipe or Recipe()
    folder = (root or cache_dir()) / "models" / f"{SMALL_CLIP}-{recipe.key()}"
    return folder / "model.pt", folder / "card.json"


def write_small_clip(recipe: Recipe, out_dir: Path | None = None, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Train the small CLIP and write its checkpoint and card (recipe, seed, metrics, sha256).

    Returns:
        The checkpoint path and the card.
    """
    from vlmdefense.workbench.evaluation import ZeroShotClassifier, accuracy

    checkpoint, card_path = small_clip_paths(recipe)
    if out_dir is not None:
        checkpoint, card_path = Path(out_dir) / "model.pt", Path(out_dir) / "card.json"
    train, test = load_digits_split(small_clip_config()["vision_cfg"]["image_size"], seed=recipe.split_seed)
    prompts = digit_prompts()
    model, report = train_small_clip(recipe, train, prompts, progress=progress)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    atomic_write_bytes(checkpoint, buffer.getvalue())
    clip = load_clip(SMALL_CLIP, checkpoint, device="cpu")
    classifier = ZeroShotClassifier(clip, prompts)
    with torch.no_grad():
        test_acc = accuracy(classifier(test.images), test.labels)
        train_acc = accuracy(classifier(train.images), train.labels)
    card = {
        "model": SMALL_CLIP,
        "recipe": asdict(recipe),
        "recipe_key": recipe.key(),
        "config": small_clip_config(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(report.seconds, 2),
        "final_loss": round(report.final_loss, 4),
        "metrics": {"zero_shot_test_accuracy": round(test_acc, 2), "zero_shot_train_accuracy": round(train_acc, 2)},
        "test_images": len(test),
        "sha256": file_sha256(checkpoint),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
    }
    atomic_write_json(card_path, card)
    logger.info("small CLIP: %.1f %% zero-shot test accuracy after %.1f s", test_acc, report.seconds)
    return checkpoint, card


def ensure_small_clip(recipe: Recipe | None = None, progress: bool = True) -> Path:
    """The cached checkpoint of ``recipe``, trained first when missing or corrupt."""
    recipe = recipe or Recipe()
    checkpoint, card_path = small_clip_paths(recipe)
    return cached_weights(checkpoint, card_path, lambda: write_small_clip(recipe, progress=progress)[0], "small CLIP")


def small_clip_card(recipe: Recipe | None = None) -> dict[str, Any]:
    """The card of the cached small CLIP (training it first if needed)."""
    ensure_small_clip(recipe)
    return json.loads(small_clip_paths(recipe)[1].read_text(encoding="utf-8"))
