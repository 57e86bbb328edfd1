"""Learning-rate schedules: one cosine decay with an optional warm-up, per optimiser step or per epoch."""

from __future__ import annotations

import math
from typing import Literal

Rounding = Literal["progress", "angle"]


def cosine_lr(
    t: int,
    total: int,
    peak: float,
    warmup: int = 0,
    warmup_lr: float | None = None,
    rounding: Rounding = "progress",
) -> float:
    """Learning rate at step (or epoch) ``t`` of ``total``: ``warmup`` units of warm-up, then a cosine
    decay from ``peak`` to zero over the remaining ``total - warmup`` units.

    Args:
        t: the current step or epoch, from 0.
        total: steps or epochs in all.
        peak: the rate at the start of the decay.
        warmup: units of warm-up before the decay.
        warmup_lr: the constant warm-up rate (Dassl's ``constant`` warm-up); ``None``: a linear ramp
            ``peak · (t + 1) / warmup``.
        rounding: where the cosine's argument is rounded. ``progress`` computes ``π · ((t - warmup) /
            span)`` (the fine-tuning loop, the small CLIP's training); ``angle`` computes ``(π · (t -
            warmup)) / span`` (Dassl's scheduler, which APT's and TAPT's codes follow). The two are equal in
            exact arithmetic but not always in floating point; both are kept so that recorded runs repeat
            bit for bit.
    """
    if t < warmup:
        return peak * (t + 1) / warmup if warmup_lr is None else warmup_lr
    span = max(1, total - warmup)
    if rounding == "progress":
        angle = math.pi * ((t - warmup) / span)
    else:
        angle = math.pi * (t - warmup) / span
    return peak * 0.5 * (1 + math.cos(angle))


def warmup_cosine_lr(step: int, total: int, peak: float, warmup_fraction: float) -> float:
    """Learning rate at ``step`` of ``total``: linear warm-up to ``peak`` over ``warmup_fraction`` of the
    steps (at least one), then cosine decay to zero."""
    return cosine_lr(step, total, peak, warmup=max(1, int(warmup_fraction * total)))


def dassl_lr(epoch: int, max_epoch: int, peak: float, warmup: int, warmup_lr: float) -> float:
    """The learning rate of ``epoch`` under Dassl's ``cosine`` scheduler with a ``constant`` warm-up, as the
    official AdvPT and FAP configurations use it: ``warmup`` epochs at ``warmup_lr``, then a cosine whose
    period is ``max_epoch`` counted from the end of the warm-up (``WARMUP_RECOUNT``), so that the last epoch
    still trains (``peak · ½(1 + cos(π · (epoch − warmup) / max_epoch))``)."""
    return cosine_lr(epoch, max_epoch + warmup, peak, warmup=warmup, warmup_lr=warmup_lr, rounding="angle")
