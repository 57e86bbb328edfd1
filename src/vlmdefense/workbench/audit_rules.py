"""The audit's verdicts that need only numbers: noise tolerance, monotonicity in ε, the lowered headline.

Everything here reads a record's rows; the checks that run attacks are in :mod:`vlmdefense.workbench.audit`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from vlmdefense.runs.records import AuditCheck, AuditStatus, Headline, RobustEntry
from vlmdefense.units import Epsilon


def one_image(n: int) -> float:
    """The share of one test image, in percentage points."""
    return 100.0 / max(1, n)


def tolerance(accuracy: float | None, n: int, randomized: bool, noise_sd: float = 2.0) -> float:
    """How far a number may move before a check flags it, in percentage points.

    Deterministic defenses: one test image (the attacks' random starts can tip a single example).
    Randomised defenses: ``noise_sd`` binomial standard errors of the accuracy over ``n`` images, at
    least one image, since two calls of the pipeline classify the same image differently.
    """
    floor = one_image(n)
    if not randomized or accuracy is None:
        return floor
    p = min(max(accuracy / 100.0, 0.0), 1.0)
    return max(floor, noise_sd * 100.0 * math.sqrt(max(p * (1 - p), 1.0 / n) / max(1, n)))


def tolerance_words(n: int, randomized: bool, noise_sd: float) -> str:
    """The tolerance rule of :func:`tolerance`, in words for the record."""
    image = f"one test image ({one_image(n):.2f} points of {n})"
    if not randomized:
        return f"{image}: the defense is deterministic, only the attacks' random starts vary"
    return f"{noise_sd:g} binomial standard errors of the accuracy over {n} images, at least {image}"


def sweep_points(rows: Sequence[RobustEntry], clean: float | None, adaptive: bool) -> list[tuple[Epsilon, float]]:
    """(ε, accuracy on all test images) of the ε sweep of one kind of attack, clean accuracy at ε = 0 first."""
    points: list[tuple[Epsilon, float]] = []
    if clean is not None:
        points.append((Epsilon(value=0.0, display="0"), clean))
    for row in rows:
        if row.adaptive == adaptive and not row.attack.startswith("worst(") and row.acc.all is not None:
            points.append((row.eps, row.acc.all))
    return sorted(points, key=lambda point: point[0].value)


def monotonicity(
    rows: Sequence[RobustEntry],
    clean: float | None,
    headline: Epsilon,
    final_adaptive: bool,
    n: int,
    randomized: bool,
    noise_sd: float = 2.0,
) -> AuditCheck:
    """Robust accuracy must not rise with ε: every ε-ball holds the smaller ones, so an attack that finds
    fewer adversarial images at a larger ε is failing there. Flags each rise beyond the tolerance and
    records the lowest accuracy at any ε up to the headline as a bound on the headline's."""
    kinds = sorted({row.adaptive for row in rows})
    rises: list[dict[str, object]] = []
    curves: dict[str, list[list[object]]] = {}
    bound: float | None = None
    for adaptive in kinds:
        points = sweep_points(rows, clean, adaptive)
        label = "adaptive" if adaptive else "non-adaptive"
        curves[label] = [[eps.display, acc] for eps, acc in points]
        lowest: tuple[Epsilon, float] | None = None
        for eps, acc in points:
            if lowest is not None and acc > lowest[1] + tolerance(lowest[1], n, randomized, noise_sd):
                rises.append(
                    {
                        "attack": label,
                        "from_eps": lowest[0].display,
                        "from": lowest[1],
                        "to_eps": eps.display,
                        "to": acc,
                    }
                )
            if lowest is None or acc < lowest[1]:
                lowest = (eps, acc)
            if adaptive == final_adaptive and eps.value <= headline.value + 1e-12:
                bound = acc if bound is None else min(bound, acc)
    if not curves or all(len(c) < 2 for c in curves.values()):
        return AuditCheck(
            id="monotonic",
            title="Accuracy does not rise with ε",
            status=AuditStatus.SKIP,
            detail="fewer than two points on the ε sweep",
        )
    if rises:
        first = rises[0]
        detail = (
            f"{len(rises)} rise(s) beyond the tolerance, e.g. the {first['attack']} attack's accuracy goes from "
            f"{first['from']:.2f} % at {first['from_eps']} to {first['to']:.2f} % at {first['to_eps']}: the attack "
            "fails at the larger budget (masked or too weak), since a larger ε-ball contains the smaller one"
        )
    else:
        detail = "no rise beyond the tolerance along the sweep (clean accuracy counts as ε = 0)"
    return AuditCheck(
        id="monotonic",
        title="Accuracy does not rise with ε",
        status=AuditStatus.FLAG if rises else AuditStatus.PASS,
        detail=detail,
        numbers={"curves": curves, "rises": rises},
        robust=None if bound is None else round(bound, 2),
    )


def lowered_headline(headline: Headline, checks: Sequence[AuditCheck], final_adaptive: bool) -> Headline:
    """``headline`` with the worst-case number (adaptive for inference-time defenses) lowered to the
    lowest robust accuracy any audit check reached at the headline ε; ``lowered_by`` names those checks."""
    field = "robust_adaptive" if final_adaptive else "robust"
    recorded = getattr(headline, field)
    found = [(c.robust, c.id) for c in checks if c.robust is not None]
    if recorded is None or not found:
        return headline
    lowest = min(value for value, _ in found)
    if lowest >= recorded:
        return headline
    lowered_by = [check_id for value, check_id in found if value < recorded]
    return headline.model_copy(update={field: round(lowest, 2), "lowered_by": lowered_by})
