"""The compare page: every method in one sortable, filterable table, with our accuracies per profile."""

from __future__ import annotations

from dataclasses import dataclass

from vlmdefense.catalog.schema import Entry, ReproductionStatus
from vlmdefense.runs.records import Result
from vlmdefense.site import labels
from vlmdefense.site.data import HeadlineNumbers, SiteData, headline_eps
from vlmdefense.site.render import Writer, render
from vlmdefense.units import Epsilon
from vlmdefense.workbench.report import headline_numbers


@dataclass
class CompareRow:
    """One method in the table: its entry, family name, tags, and headline numbers per result profile."""

    entry: Entry
    family: str
    cost_rank: int
    assumptions: list[str]
    flags: list[str]
    numbers: list[HeadlineNumbers]
    audits: list[str]


@dataclass
class ProfileNote:
    """A result profile's headline ε and the undefended model's robust accuracy there (``None``: no baseline)."""

    profile: str
    eps: Epsilon
    baseline: float | None
    has_baseline: bool


AUDIT_VERDICTS = ("pass", "flagged", "not audited")


def audit_verdict(result: Result | None) -> str:
    """The compare table's audit cell: ``pass``, ``flagged``, ``not audited``, or ``–`` without a result."""
    if result is None:
        return "–"
    if result.audit is None:
        return "not audited"
    return "flagged" if result.audit.flags() else "pass"


def compare_rows(data: SiteData, profiles: list[str]) -> list[CompareRow]:
    """One row per catalog entry, in catalog order."""
    rows = []
    for e in data.entries:
        family = data.catalog.taxonomy.families_of(e.paradigm).get(e.family)
        rows.append(
            CompareRow(
                entry=e,
                family=family.name if family else e.family,
                cost_rank=labels.cost_rank(e),
                assumptions=labels.assumption_tags(e),
                flags=labels.short_flags(e),
                numbers=[headline_numbers(data.ok(e.id, p)) for p in profiles],
                audits=[audit_verdict(data.ok(e.id, p)) for p in profiles],
            )
        )
    return rows


def profile_notes(data: SiteData, profiles: list[str]) -> list[ProfileNote]:
    """The ε each profile's columns are at (from its first result), and the baseline's robust accuracy."""
    notes = []
    for p in profiles:
        base = data.baseline(p)
        eps = next((headline_eps(data.ok(e.id, p)) for e in data.entries if data.ok(e.id, p)), None)
        if eps is not None:
            notes.append(ProfileNote(p, eps, headline_numbers(base)[1], base is not None))
    return notes


def compare_page(data: SiteData, w: Writer) -> None:
    """Write ``compare.md``."""
    profiles = data.result_profiles
    filters = {
        "Paradigm": [p.id.value for p in data.catalog.taxonomy.paradigms],
        "Cost": list(labels.COST_ORDER),
        "Reproduction": [labels.status(s) for s in ReproductionStatus],
        **{f"Audit ({p})": list(AUDIT_VERDICTS) for p in profiles},
    }
    body = render(
        "compare.md.j2",
        profiles=profiles,
        rows=compare_rows(data, profiles),
        notes=profile_notes(data, profiles),
        filters=filters,
    )
    w.page("compare.md", "Compare", body, hide=("navigation", "toc"))
