"""What a reproduction notebook calls: set up a profile, evaluate a defense, save and plot the result.

A notebook stays thin::

    ctx = harness.setup("baseline", profile, overrides)
    result = harness.evaluate(ctx, Undefended(ctx.base))
    harness.save_result(result, result_path)
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from vlmdefense.defenses.base import Defense
from vlmdefense.fileio import atomic_write_json
from vlmdefense.runs.provenance import provenance
from vlmdefense.runs.records import Result
from vlmdefense.workbench.context import Context, fit, setup  # noqa: F401  (the notebook API)
from vlmdefense.workbench.evaluation import (
    clean_accuracy,
    time_inference,
)
from vlmdefense.workbench.robustness import robustness


def _reported(method: str, root: Path) -> list[dict[str, Any]]:
    from vlmdefense.catalog.validation import load_catalog

    catalog, _ = load_catalog(root / "catalog")
    if catalog is None or method not in catalog.items:
        return []
    return [r.model_dump(mode="json") for r in catalog.items[method].entry.reported]


def evaluate(ctx: Context, defense: Defense) -> Result:
    """Clean and robust accuracy, cost and provenance of a fitted defense, as a result record."""
    clean = clean_accuracy(defense.predict, ctx.sets, ctx.params["batch_size"])
    rows = robustness(ctx, defense)
    timing = time_inference(defense.predict, ctx.sets.test.images, defense.counter, ctx.params["batch_size"])
    headline_rows = [r for r in rows if abs(r.eps - ctx.headline.value) < 1e-12]
    headline = {
        "eps": {"value": ctx.headline.value, "display": ctx.headline.display},
        "clean": round(clean.all, 2),
        "robust": _lowest(r.acc.all for r in headline_rows if not r.adaptive),
        "robust_adaptive": _lowest(r.acc.all for r in headline_rows if r.adaptive),
    }
    model = ctx.params["model"]
    payload = {
        "method": ctx.method,
        "profile": ctx.profile,
        "status": "ok",
        "parameters": ctx.params,
        "model": {
            "name": model["name"],
            "pretrained": ctx.clip.pretrained if model.get("pretrained") else model.get("pretrained"),
            "card": _card_summary(ctx.model_card),
        },
        "dataset": {
            "test": ctx.sets.test.name,
            "test_images": len(ctx.sets.test),
            "transfer": ctx.sets.transfer.name if ctx.sets.transfer else None,
            "transfer_images": len(ctx.sets.transfer) if ctx.sets.transfer else 0,
            "seen_classes": list(ctx.prompts.seen_classes),
        },
        "clean": clean.as_dict(),
        "robust": [r.as_dict() for r in rows],
        "cost": {
            "train_seconds": round(ctx.train_seconds, 2),
            "inference_seconds_per_image": round(timing.seconds_per_image, 6),
            "forward_passes": round(timing.forward_passes, 2),
            "backward_passes": round(timing.backward_passes, 2),
        },
        "headline": headline,
        "reported": _reported(ctx.method, ctx.root),
        "findings": ctx.findings,
        "provenance": provenance(
            ctx.root,
            ctx.device,
            int(ctx.params.get("seed", 0)),
            ctx.started,
            time.perf_counter() - ctx.start_time,
            ctx.prompts.as_dict(),
            os.environ.get("VLMDEFENSE_COMMAND"),
        ),
    }
    return Result.model_validate(payload)


def _lowest(values: Any) -> float | None:
    found = list(values)
    return round(min(found), 2) if found else None


def _card_summary(card: dict[str, Any] | None) -> dict[str, Any] | None:
    if card is None:
        return None
    keys = ("recipe_key", "sha256", "train_seconds", "metrics", "parameters")
    return {k: card[k] for k in keys if k in card}


def save_result(result: Result, path: str | Path | None) -> Path | None:
    """Write ``result`` atomically to ``path`` (nothing when ``path`` is empty)."""
    if not path:
        return None
    target = Path(path)
    atomic_write_json(target, result.model_dump(mode="json"))
    return target


def load_baseline(ctx: Context) -> Result | None:
    """The baseline's result of the same profile, if it exists."""
    from vlmdefense.runs.records import read_result, result_path

    path = result_path(ctx.root, "baseline", ctx.profile)
    if not path.is_file():
        return None
    try:
        return read_result(path)
    except ValueError:
        return None
