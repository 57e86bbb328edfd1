"""The detection section of a method page: a detector's operating point and its detection of each attack, from
the record's ``detection`` sections (one per variant)."""

from __future__ import annotations

from collections.abc import Sequence

from vlmdefense.runs.detection import DetectionSection
from vlmdefense.runs.records import Result
from vlmdefense.site.render import environment

TITLES = {"deployed": "Detection", "stochastic": "Detection, stochastic variant"}
ANCHORS = ("## Limitations", "## Related methods")

TEMPLATE = (
    '{% import "_macros.md.j2" as m %}\n'
    "### {{ title|md }} ({{ profile|md }})\n\n"
    'Score: {{ s.score|md }}; inputs scoring below τ = {{ "%.3f"|format(s.threshold) }} are flagged '
    "({{ s.threshold_rule|md }}). On the {{ s.clean_images }} clean test images "
    "{{ s.clean_false_positive_rate|pct }} % are flagged; accuracy after rejection is "
    "{{ s.clean_accuracy_after_rejection|pct }} % (the classifier alone: {{ s.clean_accuracy|pct }} %).\n\n"
    '{{ m.thead(["Attack", "ε", "Adaptive", "Success (%)", "AUROC", "TPR at 5 % FPR (%)", "Flagged at τ (%)", '
    '"Evading (%)", "Accuracy after rejection (%)"]) }}\n'
    "{% for r in s.rows %}\n"
    '{{ m.row([r.attack|md, r.eps.display|md, "yes" if r.adaptive else "no", r.attack_success|pct, '
    '"–" if r.auroc is none else "%.2f"|format(r.auroc), r.tpr_at_5_fpr|pct, r.detection_rate|pct, '
    "r.evading|pct, r.accuracy_after_rejection|pct]) }}\n"
    "{% endfor %}\n\n"
    "{{ s.definitions|md }}\n"
)


def sections(result: Result) -> list[tuple[str, DetectionSection]]:
    """(title, section) of each detection section the record holds, in the record's order."""
    return [(TITLES.get(key, f"Detection, {key}"), section) for key, section in result.detection.items()]


def detection_markdown(runs: Sequence[tuple[str, Result]]) -> str:
    """The Markdown of the detection sections of ``(profile, result)`` runs; empty when none has one."""
    template = environment().from_string(TEMPLATE)
    parts = [
        template.render(title=title, profile=profile, s=section)
        for profile, result in runs
        for title, section in sections(result)
    ]
    if not parts:
        return ""
    intro = (
        "## Detection\n\nThis method flags inputs instead of changing labels: the robust accuracy above is the "
        "classifier's, and accuracy after rejection (clean: correct and not flagged; attacked: flagged or still "
        "correct) is the detector's counterpart.\n\n"
    )
    return intro + "\n".join(parts) + "\n"


def with_detection(page: str, runs: Sequence[tuple[str, Result]]) -> str:
    """``page`` with the detection sections inserted before its Limitations (else Related methods) heading."""
    block = detection_markdown(runs)
    if not block:
        return page
    for anchor in ANCHORS:
        at = page.find("\n" + anchor)
        if at >= 0:
            return page[: at + 1] + block + "\n" + page[at + 1 :]
    return page.rstrip("\n") + "\n\n" + block
