"""The evaluation audit: each check passes on a sound evaluation and flags the failure it exists to catch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from vlmdefense.defenses import create_defense
from vlmdefense.defenses.base import Defense
from vlmdefense.runs.records import Accuracy, Audit, AuditCheck, AuditStatus, RobustEntry
from vlmdefense.units import Epsilon
from vlmdefense.workbench import harness
from vlmdefense.workbench.audit import CHECKS, run_audit
from vlmdefense.workbench.audit_report import audit_findings, audit_summary, audit_table
from vlmdefense.workbench.context import Context

FAST_AUDIT = {
    "square_queries": 30,
    "autoattack_steps": 3,
    "autoattack_queries": 30,
    "restarts": 1,
    "repeats": 3,
    "transfer_sources": ["undefended"],
}


def row(eps: str, value: float, adaptive: bool = False, attack: str = "PGD-10") -> RobustEntry:
    target = "defended-pipeline" if adaptive else "defended-model"
    return RobustEntry(
        attack=attack, eps=Epsilon.parse(eps), steps=10, adaptive=adaptive, target=target, acc=Accuracy(all=value)
    )


# ---- the checks on real models (quick profile) ---------------------------------------------------


@pytest.fixture(scope="module")
def quick() -> Context:
    return harness.setup("baseline", "quick", {"audit": FAST_AUDIT, "n_test": 30})


def audited(ctx: Context, defense: Defense) -> tuple[Any, dict[str, AuditCheck]]:
    result = harness.evaluate(ctx, defense)
    assert result.audit is not None
    return result, {c.id: c for c in result.audit.checks}


class Masked(Defense):
    """The undefended model behind a step with no gradient: it looks robust to gradient attacks only."""

    id = "masked"
    kind = "inference"

    def __init__(self, base: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.base = base

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.base(torch.round(images * 8) / 8)


class SecretlyRandom(Defense):
    """Declares itself deterministic but adds noise to every prediction."""

    id = "secretly-random"
    kind = "inference"

    def __init__(self, base: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.base = base

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.base((images + 0.2 * torch.randn_like(images)).clamp(0, 1))


def test_the_undefended_model_passes_every_check(quick: Context) -> None:
    defense = harness.fit(quick, create_defense("baseline", **quick.params))
    result, checks = audited(quick, defense)
    # all nine standard checks ran (or said why not)
    assert list(checks) == list(CHECKS) and len(CHECKS) == 9 and "autoattack" in CHECKS
    assert {c.id for c in result.audit.flags()} == set(), audit_table(result)
    assert checks["transfer"].status is AuditStatus.SKIP  # the undefended model is the only source
    assert checks["eps-zero"].numbers["attacked"] == result.clean.all
    assert audit_summary(result).startswith("all ")
    assert "passed and 0 flagged" in audit_findings(result)


def test_masked_gradients_are_caught_by_the_gradient_free_and_gradient_checks(quick: Context) -> None:
    result, checks = audited(quick, Masked(quick.base))
    assert checks["gradients"].status is AuditStatus.FLAG
    assert checks["unbounded"].status is AuditStatus.FLAG  # the attack through round() goes nowhere
    assert checks["black-box"].status is AuditStatus.FLAG  # Square does not need the gradient
    assert checks["transfer"].status is AuditStatus.FLAG  # images crafted on the base model go through
    # the headline's worst case is the lowest any check reached, and says which checks found it
    assert result.headline.robust_adaptive == min(c.robust for c in checks.values() if c.robust is not None)
    assert "black-box" in result.headline.lowered_by
    assert "Gradient-free" in audit_findings(result) or "gradient-free" in audit_findings(result)


def test_a_random_prediction_declared_deterministic_is_flagged(quick: Context) -> None:
    _, checks = audited(quick, SecretlyRandom(quick.base))
    assert checks["randomness"].status is AuditStatus.FLAG
    assert checks["randomness"].numbers["max_logit_difference"] > 0


def test_a_profile_can_leave_checks_out_and_turn_the_audit_off(quick: Context) -> None:
    defense = harness.fit(quick, create_defense("baseline", **quick.params))
    quick.params["audit"] = {**FAST_AUDIT, "checks": ["eps-zero", "monotonic"]}
    try:
        audit = run_audit(quick, defense, Accuracy(all=90.0), [row("8/255", 10.0)])
        assert isinstance(audit, Audit)
        skipped = [c for c in audit.checks if c.status is AuditStatus.SKIP]
        assert len(skipped) == 7 and all("not run on this profile" in c.detail for c in skipped)
        quick.params["audit"] = False
        assert harness.evaluate(quick, defense).audit is None
    finally:
        quick.params["audit"] = FAST_AUDIT
