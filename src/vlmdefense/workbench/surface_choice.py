"""Which adaptive attack surface of a counterattack defense is strongest, measured before the evaluation.

A counterattack offers three surfaces (:data:`~.counterattack.ADAPTIVE_MODES`): BPDA at the moved point,
BPDA at the input and the unrolled inner steps. :func:`choose_surface` attacks each with PGD and EOT (the
profile's steps and draws) on a prefix of the test set, beside the non-adaptive transfer from the
undefended model, reruns the strongest with twice the steps (a convergence check), and sets the
defense's ``adaptive`` to it so that the harness' adaptive rows attack it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vlmdefense.defenses.training_free.common import accuracy_of
from vlmdefense.defenses.training_free.counterattack import ADAPTIVE_MODES, CounterattackDefense
from vlmdefense.workbench.attacks import PGD
from vlmdefense.workbench.models import set_seed

if TYPE_CHECKING:
    from vlmdefense.workbench.harness import Context

FINDING = "surface_comparison"


def choose_surface(
    ctx: Context, defense: CounterattackDefense, images: int = 60, max_eps: float = 4 / 255
) -> dict[str, Any]:
    """Compare the surfaces on the first ``images`` test images at min(headline ε, ``max_eps``) (where a
    counterattack still matters), record the comparison in ``ctx.findings`` and adopt the strongest.

    Every defended prediction is drawn with seed 1 after attacks drawn with seed 0, so the rows differ
    only by the attack.
    """
    k = min(images, len(ctx.sets.test))
    xs, ys = ctx.sets.test.images[:k], ctx.sets.test.labels[:k]
    steps = int(ctx.params["sweep_attack"]["steps"])
    eot = int(ctx.params.get("eot_samples", 1))
    eps = min(ctx.headline.value, max_eps)
    set_seed(int(ctx.params.get("seed", 0)))
    transfer = PGD(eps=eps, steps=steps)(ctx.base, xs, ys)
    rows: dict[str, Any] = {"images": k, "eps_255": round(eps * 255), "steps": steps, "eot": eot}
    rows["base on transfer"] = accuracy_of(ctx.base, transfer, ys)
    set_seed(0)
    rows["non-adaptive (transfer)"] = accuracy_of(defense.predict, transfer, ys)

    def attacked(mode: str, attack_steps: int) -> float:
        set_seed(0)
        adversarial = PGD(eps=eps, steps=attack_steps, eot_samples=eot)(defense.surface(mode), xs, ys)
        set_seed(1)
        return accuracy_of(defense.predict, adversarial, ys)

    for mode in ADAPTIVE_MODES:
        rows[mode] = attacked(mode, steps)
    chosen = min(ADAPTIVE_MODES, key=lambda m: rows[m])
    rows[f"{chosen}, twice the steps"] = attacked(chosen, 2 * steps)
    rows["strongest"] = chosen
    ctx.findings[FINDING] = rows
    defense.config.adaptive = chosen
    return rows
