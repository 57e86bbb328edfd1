"""Robust accuracy of a defense: the ε sweep, the worst case over all attacks at the headline ε, non-adaptive
(through the base model) and adaptive (through the defended pipeline) rows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vlmdefense.defenses.base import Defense
from vlmdefense.runs.records import RobustEntry
from vlmdefense.units import Epsilon
from vlmdefense.workbench.attacks import WorstCase, make_attack
from vlmdefense.workbench.context import Context
from vlmdefense.workbench.evaluation import Predictor, robust_accuracy
from vlmdefense.workbench.models import set_seed

AttackFactory = Callable[[int], Any]


def _measure(
    ctx: Context, defense: Defense, budget: Epsilon, make: AttackFactory, steps: int, eot: int, target: str
) -> RobustEntry:
    """One robust-accuracy row: ``defense`` predicts on images crafted against ``target``."""
    adaptive = target == "defended-pipeline"
    attacked: Predictor
    if target == "base-model":
        attacked = ctx.base
    elif target == "defended-model":
        attacked = defense.predict
    else:
        attacked = defense.attack_surface()
    attack = make(eot if adaptive else 1)  # the base model and a static defense are deterministic: no EOT
    name = getattr(attack, "name", type(attack).__name__)
    set_seed(int(ctx.params.get("seed", 0)))
    acc, seconds = robust_accuracy(
        defense.predict,
        attacked,
        attack,
        ctx.sets,
        ctx.params["batch_size"],
        desc=f"{name} {budget.display} ({target})",
    )
    norm = getattr(attack, "norm", "linf")
    return RobustEntry(
        attack=name,
        norm=norm,
        eps=budget,
        steps=steps,
        adaptive=adaptive,
        target=target,
        acc=acc,
        seconds=round(seconds, 2),
    )


def _attack_rows(ctx: Context, defense: Defense, budget: Epsilon, make: AttackFactory, steps: int) -> list[RobustEntry]:
    """A static defense is attacked white-box; an inference-time defense twice: through the base model
    (non-adaptive, as many papers report) and through its whole pipeline (adaptive, EOT when randomised)."""
    if defense.kind == "static":
        return [_measure(ctx, defense, budget, make, steps, 1, "defended-model")]
    eot = int(ctx.params.get("eot_samples", 1)) if defense.randomized else 1
    return [_measure(ctx, defense, budget, make, steps, eot, target) for target in ("base-model", "defended-pipeline")]


def robustness(ctx: Context, defense: Defense) -> list[RobustEntry]:
    """The ε sweep with the profile's sweep attack, then the worst case over all attacks at the headline ε."""

    def factory(specs: list[dict[str, Any]], budget: Epsilon) -> AttackFactory:
        def make(eot: int) -> Any:
            attacks = [make_attack(s["name"], budget.value, int(s["steps"]), s.get("norm", "linf"), eot) for s in specs]
            return attacks[0] if len(attacks) == 1 else WorstCase(attacks)

        return make

    rows: list[RobustEntry] = []
    sweep = ctx.params["sweep_attack"]
    for budget in ctx.eps:
        rows += _attack_rows(ctx, defense, budget, factory([sweep], budget), int(sweep["steps"]))
    specs = ctx.params["attacks"]
    if len(specs) > 1 or specs[0] != sweep:
        steps = max(int(s["steps"]) for s in specs)
        rows += _attack_rows(ctx, defense, ctx.headline, factory(specs, ctx.headline), steps)
    return rows
