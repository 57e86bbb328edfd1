"""The evaluation audit in words and tables: for notebooks' results and Findings, the site and the CLI."""

from __future__ import annotations

from vlmdefense.runs.records import AuditCheck, AuditStatus, Result

VERDICTS = {AuditStatus.PASS: "pass", AuditStatus.FLAG: "**flag**", AuditStatus.SKIP: "skip"}


def audit_summary(result: Result | None) -> str:
    """One short verdict: ``not audited``, ``all N pass`` or ``K flag(s): a, b``."""
    if result is None or result.audit is None:
        return "not audited"
    flags = result.audit.flags()
    ran = [c for c in result.audit.checks if c.status is not AuditStatus.SKIP]
    if not flags:
        return f"all {len(ran)} pass"
    return f"{len(flags)} flag{'s' if len(flags) > 1 else ''}: " + ", ".join(c.id for c in flags)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def audit_table(result: Result) -> str:
    """Markdown: every check (name and verdict in one narrow column), and what it measured, with its seconds."""
    if result.audit is None:
        return "This result has no evaluation audit (it predates the audit, or its profile turns it off)."
    rows = ["| check | what was measured |", "| --- | --- |"]
    for c in result.audit.checks:
        seconds = "" if c.seconds is None else f" ({c.seconds:.0f} s)"
        rows.append(f"| {VERDICTS[c.status]}: {_cell(c.title)} (`{c.id}`) | {_cell(c.detail)}{seconds} |")
    return "\n".join(rows) + f"\n\nTolerance: {result.audit.tolerance}."


def recorded_worst(result: Result) -> float | None:
    """The worst case of the recorded attacks at the headline ε, before the audit lowered it."""
    if result.headline is None:
        return None
    adaptive = any(r.adaptive for r in result.robust)
    return result.worst_robust(result.headline.eps.value, adaptive=adaptive if adaptive else None)


def lowered_note(result: Result) -> str:
    """A sentence when the audit lowered the headline's worst case, else empty."""
    h = result.headline
    if h is None or not h.lowered_by:
        return ""
    before = recorded_worst(result)
    after = h.robust_adaptive if any(r.adaptive for r in result.robust) else h.robust
    if before is None or after is None:
        return ""
    checks = ", ".join(f"`{c}`" for c in h.lowered_by)
    return (
        f"The audit lowered the worst-case robust accuracy at ε = {h.eps.display} from {before:.2f} % (the recorded "
        f"attacks) to {after:.2f} % ({checks}): the headline shows the lower number."
    )


WHAT_A_FLAG_MEANS = {
    "eps-zero": "the pipeline scores attacked images differently from clean ones even when nothing was changed",
    "monotonic": "a larger budget found fewer adversarial images, so the attack fails at large ε (the smaller "
    "budget's accuracy bounds the larger's)",
    "unbounded": "even a budget that allows almost any image does not reach chance, so the attack's gradients "
    "do not lead it to the decision boundary",
    "convergence": "more steps and restarts still lower accuracy, so the recorded attack had not converged",
    "black-box": "a gradient-free attack beat the gradient attacks, the classic sign of masked gradients",
    "transfer": "images crafted on another model fool the defense more often than the attack through it",
    "gradients": "some input gradients are zero or not finite, so a gradient attack cannot move those images",
    "randomness": "counting an image as robust only when every call classifies it right lowers the number",
    "autoattack": "the maintained reference attack is stronger than the recorded ones",
}


def flag_sentence(check: AuditCheck) -> str:
    """One sentence on a flagged check: what it measured and what that means."""
    meaning = WHAT_A_FLAG_MEANS.get(check.id, "the check found the evaluation wanting")
    return f"**{check.title}** flagged — {check.detail}. In short: {meaning}."


def audit_findings(result: Result) -> str:
    """The Findings paragraph on the audit: how many checks passed, each flag explained, the lowered headline."""
    if result.audit is None:
        return "This run has no evaluation audit."
    audit = result.audit
    ran = [c for c in audit.checks if c.status is not AuditStatus.SKIP]
    skipped = [c for c in audit.checks if c.status is AuditStatus.SKIP]
    flags = audit.flags()
    text = (
        f"**Evaluation audit.** {len(ran)} of the {len(audit.checks)} standard checks ran on the {audit.images} "
        f"test images; {len(ran) - len(flags)} passed and {len(flags)} flagged."
    )
    if skipped:
        text += " Skipped: " + "; ".join(f"`{c.id}` ({c.detail})" for c in skipped) + "."
    if flags:
        text += "\n\n" + "\n".join(f"- {flag_sentence(c)}" for c in flags)
    else:
        text += " Nothing in the evaluation looks masked or unconverged at this budget."
    note = lowered_note(result)
    if note:
        text += "\n\n" + note
    return text
