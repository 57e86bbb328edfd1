"""Source models of the audit's transfer check: a robust training-time defense, fitted once and cached.

The fitted image tower is stored under the checkpoint cache, named by a hash of everything its fit
depends on (method, configuration, base checkpoint, training images, headline ε), so the notebooks of one
profile share a single fit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging

import torch

from vlmdefense.defenses import create_defense
from vlmdefense.defenses.training_time.finetuning import AdversarialFineTuning
from vlmdefense.fileio import atomic_write_bytes
from vlmdefense.workbench.context import Context
from vlmdefense.workbench.evaluation import Predictor
from vlmdefense.workbench.models import cache_dir

logger = logging.getLogger(__name__)


def source_key(ctx: Context, defense: AdversarialFineTuning) -> str:
    """Hash of what a fit of ``defense`` in ``ctx`` depends on."""
    train = ctx.seen_train
    recipe = {
        "method": defense.id,
        "config": dataclasses.asdict(defense.config),
        "base": (ctx.model_card or {}).get("sha256") or [ctx.params["model"].get("name"), ctx.clip.pretrained],
        "train": [train.name, len(train), float(train.images.double().sum().item())],
        "headline": ctx.headline.value,
        "prompts": ctx.prompts.as_dict(),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def robust_source(ctx: Context, method: str) -> Predictor:
    """The zero-shot classifier of training-time defense ``method`` fitted on this profile's seen classes
    (loaded from the cache when an identical fit exists)."""
    defense = create_defense(method, **ctx.params)
    if not isinstance(defense, AdversarialFineTuning):
        raise ValueError(f"transfer source {method!r} is not an adversarial fine-tuning defense")
    path = cache_dir() / "transfer-sources" / f"{method}-{source_key(ctx, defense)}.pt"
    data = ctx.fit_data()
    if path.is_file():
        try:
            defense.restore(data, torch.load(path, map_location=ctx.device, weights_only=True))
            return defense.predict
        except (RuntimeError, OSError, ValueError) as exc:
            logger.warning("cached transfer source %s is unreadable (%s): fitting it again", path.name, exc)
    defense.fit(data)
    buffer = io.BytesIO()
    torch.save(defense.tuned_state(), buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return defense.predict
