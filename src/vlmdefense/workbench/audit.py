"""The evaluation audit: the standard sanity checks of a robustness evaluation, run on every result.

Each check attacks the defended pipeline again in a way whose outcome is known in advance when the
evaluation is sound (ε = 0 changes nothing, an unbounded budget reaches chance, more steps and restarts
change little, a gradient-free or a transferred attack does no better than the white-box one, the
gradients exist, a random prediction is robust only when it is right every time, AutoAttack agrees).
A check that finds a lower robust accuracy at the headline ε records it, and the headline takes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmdefense.defenses.base import Defense
from vlmdefense.runs.records import Accuracy, Audit, AuditCheck, AuditStatus, RobustEntry
from vlmdefense.units import parse_epsilon
from vlmdefense.workbench.attacks import APGD, WorstCase, make_attack
from vlmdefense.workbench.audit_gradients import gradient_check, randomness_check
from vlmdefense.workbench.audit_rules import monotonicity, one_image, tolerance, tolerance_words
from vlmdefense.workbench.audit_sources import robust_source
from vlmdefense.workbench.context import Context
from vlmdefense.workbench.evaluation import Predictor, batched_correct
from vlmdefense.workbench.models import set_seed
from vlmdefense.workbench.reference_attacks import AutoAttackSuite, Square

CHECKS = (
    "eps-zero",
    "monotonic",
    "unbounded",
    "convergence",
    "black-box",
    "transfer",
    "gradients",
    "randomness",
    "autoattack",
)


@dataclass
class AuditSettings:
    """The audit's budgets (a profile's ``audit`` section; the defaults are the smoke profile's)."""

    checks: list[str] = field(default_factory=lambda: list(CHECKS))
    noise_sd: float = 2.0
    unbounded_eps: str = "128/255"
    steps_factor: int = 2
    restarts: int = 2
    margin: float = 1.0
    square_queries: int = 300
    autoattack_steps: int = 20
    autoattack_queries: int = 300
    repeats: int = 4
    transfer_sources: list[str] = field(default_factory=lambda: ["undefended", "tecoa"])

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> AuditSettings:
        """Defaults overridden by ``params['audit']``; unknown keys are errors."""
        given = dict(params.get("audit") or {})
        unknown = set(given) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown audit setting(s) {sorted(unknown)}: use {sorted(cls.__dataclass_fields__)}")
        return cls(**given)


@dataclass
class _Run:
    """What every check needs: the context, the defense, the recorded numbers and the attack target."""

    ctx: Context
    defense: Defense
    settings: AuditSettings
    clean: Accuracy
    rows: list[RobustEntry]

    @property
    def inference(self) -> bool:
        return self.defense.kind != "static"

    @property
    def randomized(self) -> bool:
        return bool(self.defense.randomized)

    @property
    def n(self) -> int:
        return len(self.ctx.sets.test)

    @property
    def target(self) -> Predictor:
        """What the white-box or adaptive attacks differentiate."""
        return self.defense.attack_surface() if self.inference else self.defense.predict

    @property
    def eot(self) -> int:
        return int(self.ctx.params.get("eot_samples", 1)) if self.randomized and self.inference else 1

    @property
    def recorded(self) -> float | None:
        """The recorded worst case at the headline ε of the final kind (adaptive for inference defenses)."""
        values = [
            r.acc.all
            for r in self.rows
            if abs(r.eps.value - self.ctx.headline.value) < 1e-12
            and r.adaptive == self.inference
            and r.acc.all is not None
        ]
        return min(values) if values else None

    def tol(self, accuracy: float | None) -> float:
        return tolerance(accuracy, self.n, self.randomized, self.settings.noise_sd)

    def accuracy(
        self, attack: Callable[..., torch.Tensor], target: Predictor | None = None
    ) -> tuple[float, torch.Tensor]:
        """Accuracy (all test images) of the defense on images ``attack`` crafts against ``target``."""
        set_seed(int(self.ctx.params.get("seed", 0)))
        test = self.ctx.sets.test
        batch = int(self.ctx.params["batch_size"])
        images = []
        for start in range(0, len(test), batch):
            images.append(
                attack(target or self.target, test.images[start : start + batch], test.labels[start : start + batch])
            )
        adversarial = torch.cat(images)
        correct = batched_correct(self.defense.predict, adversarial, test.labels, batch)
        return round(100.0 * correct.float().mean().item(), 2), adversarial

    def attack(self, spec: dict[str, Any], eps: float, steps: int | None = None, seed: int = 0) -> Any:
        steps = int(spec["steps"]) if steps is None else steps
        norm = spec.get("norm", "linf")
        if spec["name"].lower() in {"apgd", "apgd-ce"}:
            return APGD(eps=eps, steps=steps, norm=norm, eot_samples=self.eot, seed=seed)
        return make_attack(spec["name"], eps, steps, norm, self.eot)

    def headline_attack(self) -> WorstCase:
        return WorstCase([self.attack(s, self.ctx.headline.value) for s in self.ctx.params["attacks"]])


def _check(check_id: str, title: str, status: AuditStatus, detail: str, **extra: Any) -> AuditCheck:
    return AuditCheck(id=check_id, title=title, status=status, detail=detail, **extra)


def _eps_zero(run: _Run) -> AuditCheck:
    sweep = run.ctx.params["sweep_attack"]
    attacked, _ = run.accuracy(run.attack(sweep, 0.0))
    clean = run.clean.all or 0.0
    allowed = run.tol(clean) if run.randomized else 0.0
    ok = abs(attacked - clean) <= allowed + 1e-9
    detail = f"the sweep attack at ε = 0 gives {attacked:.2f} % against {clean:.2f} % clean (allowed {allowed:.2f})"
    return _check(
        "eps-zero",
        "ε = 0 leaves clean accuracy unchanged",
        AuditStatus.PASS if ok else AuditStatus.FLAG,
        detail
        + ("" if ok else ": the evaluation does not score what the attack returns the way it scores clean images"),
        numbers={"clean": clean, "attacked": attacked, "allowed": round(allowed, 2)},
    )


def _unbounded(run: _Run) -> AuditCheck:
    eps, display = parse_epsilon(run.settings.unbounded_eps)
    sweep = run.ctx.params["sweep_attack"]
    acc, _ = run.accuracy(run.attack(sweep, eps))
    chance = 100.0 / len(run.ctx.prompts.classnames)
    ok = acc <= chance + run.tol(chance)
    return _check(
        "unbounded",
        "An unbounded budget reaches chance",
        AuditStatus.PASS if ok else AuditStatus.FLAG,
        f"the sweep attack at ε = {display} leaves {acc:.2f} % (chance: {chance:.2f} %)"
        + ("" if ok else ": with almost any image allowed the attack should succeed; its gradients do not lead it"),
        numbers={"eps": display, "accuracy": acc, "chance": round(chance, 2)},
    )


def _convergence(run: _Run) -> tuple[AuditCheck, torch.Tensor | None]:
    s = run.settings
    specs = run.ctx.params["attacks"]
    steps = {spec["name"]: int(spec["steps"]) * s.steps_factor for spec in specs}
    attacks = [
        run.attack(spec, run.ctx.headline.value, steps[spec["name"]], seed=r)
        for r in range(s.restarts)
        for spec in specs
    ]
    acc, adversarial = run.accuracy(WorstCase(attacks))
    recorded = run.recorded
    if recorded is None:
        return _check(
            "convergence",
            "More steps and restarts change little",
            AuditStatus.SKIP,
            "no recorded row at the headline ε",
        ), None
    margin = max(s.margin, run.tol(recorded))
    ok = acc >= recorded - margin
    names = ", ".join(f"{name.upper()}-{n}" for name, n in steps.items())
    detail = (
        f"{names} with {s.restarts} random restarts each ({s.steps_factor}× the steps) reach {acc:.2f} % against the "
        f"recorded {recorded:.2f} % (margin {margin:.2f})"
    )
    if not ok:
        detail += ": the recorded attack had not converged; the lower number is the worst case"
    check = _check(
        "convergence",
        "More steps and restarts change little",
        AuditStatus.PASS if ok else AuditStatus.FLAG,
        detail,
        numbers={
            "recorded": recorded,
            "stronger": acc,
            "margin": round(margin, 2),
            "steps": steps,
            "restarts": s.restarts,
        },
        robust=acc,
    )
    return check, adversarial


def _compared(
    run: _Run, check_id: str, title: str, acc: float, what: str, failure: str, numbers: dict[str, Any]
) -> AuditCheck:
    """A check whose attack must not beat the recorded worst case."""
    recorded = run.recorded
    if recorded is None:
        return _check(check_id, title, AuditStatus.SKIP, "no recorded row at the headline ε")
    allowed = run.tol(recorded)
    ok = acc >= recorded - allowed
    detail = f"{what}: {acc:.2f} % correct, against the recorded worst case {recorded:.2f} % (allowed {allowed:.2f})"
    return _check(
        check_id,
        title,
        AuditStatus.PASS if ok else AuditStatus.FLAG,
        detail + ("" if ok else f": {failure}"),
        numbers={"recorded": recorded, "accuracy": acc, "allowed": round(allowed, 2), **numbers},
        robust=acc,
    )


def _black_box(run: _Run) -> AuditCheck:
    square = Square(eps=run.ctx.headline.value, queries=run.settings.square_queries)
    acc, _ = run.accuracy(square, run.defense.predict)
    return _compared(
        run,
        "black-box",
        "A gradient-free attack does not beat the white-box ones",
        acc,
        f"{square.name} on the defended pipeline (no gradients)",
        "the gradients the white-box attacks follow are masked or misleading",
        {"attack": square.name},
    )


def _transfer(run: _Run) -> AuditCheck:
    found: dict[str, float] = {}
    skipped: list[str] = []
    for name in run.settings.transfer_sources:
        if name == run.defense.id or (name == "undefended" and run.defense.id == "baseline"):
            skipped.append(f"{name} (the defense itself)")
            continue
        if name == "undefended" and run.inference:
            rows = [
                r.acc.all
                for r in run.rows
                if r.target == "base-model" and abs(r.eps.value - run.ctx.headline.value) < 1e-12
            ]
            if rows and all(v is not None for v in rows):
                found[name] = min(v for v in rows if v is not None)
                continue
        source = run.ctx.base if name == "undefended" else robust_source(run.ctx, name)
        base_attacks = [
            make_attack(s["name"], run.ctx.headline.value, int(s["steps"]), s.get("norm", "linf"))
            for s in run.ctx.params["attacks"]
        ]
        found[name], _ = run.accuracy(WorstCase(base_attacks), source)
    if not found:
        return _check(
            "transfer",
            "Transferred images do not beat the adaptive attack",
            AuditStatus.SKIP,
            "no source model besides the defense itself: " + ", ".join(skipped),
        )
    worst_source = min(found, key=lambda k: found[k])
    each = ", ".join(f"{k}: {v:.2f} %" for k, v in found.items())
    return _compared(
        run,
        "transfer",
        "Transferred images do not beat the adaptive attack",
        found[worst_source],
        f"the headline attacks crafted on the {worst_source} model ({each})",
        "images crafted on another model fool the defense more often than the attack through it: that attack is weak",
        {"sources": found, "skipped": skipped},
    )


def _autoattack(run: _Run) -> AuditCheck:
    s = run.settings
    classes = len(run.ctx.prompts.classnames)
    if classes < 4:
        return _check(
            "autoattack",
            "AutoAttack agrees with the recorded attacks",
            AuditStatus.SKIP,
            f"AutoAttack's targeted attacks need at least 4 classes; this label space has {classes}",
        )
    suite = AutoAttackSuite(
        eps=run.ctx.headline.value,
        n_classes=len(run.ctx.prompts.classnames),
        version="rand" if run.randomized else "standard",
        steps=s.autoattack_steps,
        queries=s.autoattack_queries,
        eot_samples=max(run.eot, 1),
    )
    acc, _ = run.accuracy(suite)
    standard = "100 steps, 5000 queries" if suite.version == "standard" else "100 steps, EOT-20"
    reduced = f" (budgets reduced from the standard {standard})" if suite.reduced else ""
    return _compared(
        run,
        "autoattack",
        "AutoAttack agrees with the recorded attacks",
        acc,
        f"{suite.name} through the attack surface{reduced}",
        "the reference attack is stronger than the recorded ones; its number is the worst case",
        {"attack": suite.name, "version": suite.version},
    )


def run_audit(ctx: Context, defense: Defense, clean: Accuracy, rows: list[RobustEntry]) -> Audit:
    """Every check of the profile's ``audit`` settings on the test split; skipped checks say why."""
    settings = AuditSettings.from_params(ctx.params)
    run = _Run(ctx, defense, settings, clean, rows)
    checks: list[AuditCheck] = []
    adversarial: torch.Tensor | None = None
    batch = int(ctx.params["batch_size"])
    for check_id in CHECKS:
        start = time.perf_counter()
        if check_id not in settings.checks:
            check = _check(
                check_id, check_id, AuditStatus.SKIP, "not run on this profile (its audit settings leave it out)"
            )
        elif check_id == "eps-zero":
            check = _eps_zero(run)
        elif check_id == "monotonic":
            check = monotonicity(rows, clean.all, ctx.headline, run.inference, run.n, run.randomized, settings.noise_sd)
        elif check_id == "unbounded":
            check = _unbounded(run)
        elif check_id == "convergence":
            check, adversarial = _convergence(run)
        elif check_id == "black-box":
            check = _black_box(run)
        elif check_id == "transfer":
            check = _transfer(run)
        elif check_id == "gradients":
            check = gradient_check(run.target, ctx.sets.test.images, ctx.sets.test.labels, batch)
        elif check_id == "randomness":
            test = ctx.sets.test
            check = randomness_check(
                defense, test, adversarial, settings.repeats, run.eot, batch, run.recorded, run.tol
            )
        else:
            check = _autoattack(run)
        if check.status is not AuditStatus.SKIP or check.seconds is None:
            check = check.model_copy(update={"seconds": round(time.perf_counter() - start, 2)})
        checks.append(check)
    return Audit(checks=checks, images=run.n, tolerance=tolerance_words(run.n, run.randomized, settings.noise_sd))


__all__ = ["CHECKS", "AuditSettings", "one_image", "run_audit"]
