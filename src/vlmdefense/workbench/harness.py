"""What a reproduction notebook calls: set up a profile, evaluate a defense, save and plot the result.

A notebook stays thin::

    ctx = harness.setup("baseline", profile, overrides)
    result = harness.evaluate(ctx, Undefended(ctx.base))
    harness.save_result(result, result_path)
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmdefense.catalog.schema import Reported
from vlmdefense.defenses.base import Defense
from vlmdefense.fileio import atomic_write_json
from vlmdefense.runs.provenance import provenance
from vlmdefense.runs.records import (
    Accuracy,
    Audit,
    Cost,
    DatasetInfo,
    Headline,
    ModelCardSummary,
    ModelRef,
    PromptRecord,
    Result,
    RobustEntry,
    RunStatus,
)
from vlmdefense.workbench.audit import run_audit
from vlmdefense.workbench.audit_rules import lowered_headline
from vlmdefense.workbench.context import Context, fit, setup  # noqa: F401  (the notebook API)
from vlmdefense.workbench.evaluation import (
    clean_accuracy,
    time_inference,
)
from vlmdefense.workbench.robustness import robustness


def _reported(method: str, root: Path) -> list[Reported]:
    from vlmdefense.catalog.validation import load_catalog

    catalog, _ = load_catalog(root / "catalog")
    if catalog is None or method not in catalog.items:
        return []
    return list(catalog.items[method].entry.reported)


@dataclass(frozen=True)
class Measurement:
    """What an evaluation measured: clean accuracy, every attack row, the audit and the headline."""

    clean: Accuracy
    rows: list[RobustEntry]
    audit: Audit | None
    headline: Headline


def measure(ctx: Context, defense: Defense) -> Measurement:
    """Clean and robust accuracy and the evaluation audit (unless the profile sets ``audit: false``) of a fitted
    defense on ``ctx``'s sets. The headline's worst case is the lowest robust accuracy at the headline ε over
    every recorded attack and every audit check."""
    clean = clean_accuracy(defense.predict, ctx.sets, ctx.params["batch_size"])
    rows = robustness(ctx, defense)
    audit = None if ctx.params.get("audit") is False else run_audit(ctx, defense, clean, rows)
    at_headline = [r for r in rows if abs(r.eps.value - ctx.headline.value) < 1e-12]
    headline = Headline(
        eps=ctx.headline,
        clean=clean.all,
        robust=_lowest(r.acc.all for r in at_headline if not r.adaptive),
        robust_adaptive=_lowest(r.acc.all for r in at_headline if r.adaptive),
    )
    if audit is not None:
        headline = lowered_headline(headline, audit.checks, final_adaptive=defense.kind != "static")
    return Measurement(clean, rows, audit, headline)


def evaluate(ctx: Context, defense: Defense) -> Result:
    """Clean and robust accuracy, cost, the evaluation audit and provenance of a fitted defense, as a result
    record (see :func:`measure`). What describes the run (model, data, parameters) is built and validated
    first, so that a record that cannot be written fails before the attacks run."""
    model_ref, dataset = _model_ref(ctx), _dataset_info(ctx)
    json.dumps(ctx.params)  # a parameter the record cannot hold fails now, not after the attacks
    measured = measure(ctx, defense)
    timing = time_inference(defense.predict, ctx.sets.test.images, defense.counter, ctx.params["batch_size"])
    return Result(
        method=ctx.method,
        profile=ctx.profile,
        status=RunStatus.OK,
        parameters=ctx.params,
        model=model_ref,
        dataset=dataset,
        clean=measured.clean,
        robust=measured.rows,
        cost=Cost(
            train_seconds=round(ctx.train_seconds, 2),
            inference_seconds_per_image=round(timing.seconds_per_image, 6),
            forward_passes=round(timing.forward_passes, 2),
            backward_passes=round(timing.backward_passes, 2),
        ),
        headline=measured.headline,
        reported=_reported(ctx.method, ctx.root),
        findings=ctx.findings,
        audit=measured.audit,
        detection=ctx.detection,
        provenance=provenance(
            ctx.root,
            ctx.device,
            int(ctx.params.get("seed", 0)),
            ctx.started,
            time.perf_counter() - ctx.start_time,
            PromptRecord.model_validate(ctx.prompts.as_dict()),
            os.environ.get("VLMDEFENSE_COMMAND"),
        ),
    )


def _model_ref(ctx: Context) -> ModelRef:
    model = ctx.params["model"]
    return ModelRef(
        name=model["name"],
        pretrained=ctx.clip.pretrained if model.get("pretrained") else model.get("pretrained"),
        card=_card_summary(ctx.model_card),
    )


def _dataset_info(ctx: Context) -> DatasetInfo:
    return DatasetInfo(
        test=ctx.sets.test.name,
        test_images=len(ctx.sets.test),
        transfer=ctx.sets.transfer.name if ctx.sets.transfer else None,
        transfer_images=len(ctx.sets.transfer) if ctx.sets.transfer else 0,
        seen_classes=list(ctx.prompts.seen_classes),
    )


def _lowest(values: Iterable[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return round(min(found), 2) if found else None


def _card_summary(card: dict[str, Any] | None) -> ModelCardSummary | None:
    if card is None:
        return None
    keys = ("recipe_key", "sha256", "train_seconds", "metrics", "parameters")
    return ModelCardSummary.model_validate({k: card[k] for k in keys if k in card})


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
