"""The results page: per profile, matplotlib plots of every result record (ε sweeps per paradigm, gain vs.
cost, seen vs. unseen classes, non-adaptive vs. adaptive attacks) and the methods each plot lacks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlmdefense.catalog.schema import Entry, Paradigm, ParadigmInfo
from vlmdefense.runs.records import AuditCheck, Result
from vlmdefense.site.data import BASELINE, SiteData
from vlmdefense.site.links import PLOTS
from vlmdefense.site.render import Writer, render
from vlmdefense.workbench.audit_report import WHAT_A_FLAG_MEANS


@dataclass
class Plot:
    """One plot of the page: where it was written (``None``: not enough results) and the methods it lacks."""

    path: str | None = None
    lacking: list[Entry] = field(default_factory=list)


@dataclass
class SweepPlot(Plot):
    """The ε sweep of one paradigm's methods."""

    paradigm: ParadigmInfo | None = None


@dataclass
class ProfileResults:
    """The plots of one profile."""

    profile: str
    description: str
    done: int
    total: int
    baseline_notebook: bool
    sweeps: list[SweepPlot]
    gain: Plot
    seen_unseen: Plot
    adaptive: Plot
    flags: list[AuditFlag] = field(default_factory=list)
    unaudited: list[Entry] = field(default_factory=list)


@dataclass
class AuditFlag:
    """One flagged evaluation check of one result."""

    entry: Entry
    check: AuditCheck
    note: str


def audit_flags(data: SiteData, ok: dict[str, Result]) -> tuple[list[AuditFlag], list[Entry]]:
    """Every flagged check of the profile's method results, in catalog order, and the results with no audit."""
    flags: list[AuditFlag] = []
    unaudited: list[Entry] = []
    for e in data.entries:
        result = ok.get(e.id)
        if result is None:
            continue
        if result.audit is None:
            unaudited.append(e)
            continue
        flags += [AuditFlag(e, check, WHAT_A_FLAG_MEANS.get(check.id, "")) for check in result.audit.flags()]
    return flags, unaudited


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label(entry: Entry) -> str:
    """A method's name for a matplotlib label (``$`` would start mathtext)."""
    return entry.name.replace("$", r"\$")


def _save(fig: Any, w: Writer, path: str) -> str:
    fig.savefig(w.path(path), dpi=100)
    _pyplot().close(fig)
    return path


def _lacking(ok: dict[str, Result], scope: list[Entry]) -> list[Entry]:
    return [e for e in scope if e.id not in ok]


def profile_results(data: SiteData, w: Writer, profile: str) -> ProfileResults:
    """Draw the plots of one profile: ε sweeps per paradigm, gain vs cost, seen vs unseen, adaptive gap."""
    from vlmdefense.workbench import report

    base = data.baseline(profile)
    ok = {e.id: r for e in data.entries if (r := data.ok(e.id, profile)) is not None}
    done = [e for e in data.entries if e.id in ok]

    sweeps = []
    for info in data.catalog.taxonomy.paradigms:
        scope = data.entries_of(info.id)
        members = [e for e in scope if e.id in ok]
        if not members:
            sweeps.append(SweepPlot(paradigm=info))
            continue
        results = {label(e): ok[e.id] for e in members}
        if base is not None:
            results = {"baseline (undefended)": base, **results}
        fig = report.plot_sweep_by_method(results, title=f"{info.name} — {profile} profile")
        path = _save(fig, w, f"{PLOTS}/{profile}-sweep-{info.id.value}.png")
        sweeps.append(SweepPlot(path, _lacking(ok, scope), paradigm=info))

    gain = Plot()
    if done and base is not None:
        groups = {label(e): e.paradigm.value for e in done}
        fig = report.plot_gain_vs_cost({label(e): ok[e.id] for e in done}, base, groups)
        gain = Plot(_save(fig, w, f"{PLOTS}/{profile}-gain-cost.png"), _lacking(ok, data.entries))

    training = [e for e in data.entries if e.paradigm is Paradigm.TRAINING_TIME]
    seen_unseen = Plot()
    if any(e.id in ok for e in training):
        fig = report.plot_seen_unseen({label(e): ok[e.id] for e in training if e.id in ok}, base)
        seen_unseen = Plot(_save(fig, w, f"{PLOTS}/{profile}-seen-unseen.png"), _lacking(ok, training))

    inference = [e for e in data.entries if e.paradigm is not Paradigm.TRAINING_TIME]
    adaptive = Plot()
    if any(e.id in ok for e in inference):
        fig = report.plot_adaptive_gap({label(e): ok[e.id] for e in inference if e.id in ok}, base)
        adaptive = Plot(_save(fig, w, f"{PLOTS}/{profile}-adaptive.png"), _lacking(ok, inference))

    flags, unaudited = audit_flags(data, ok)
    return ProfileResults(
        flags=flags,
        unaudited=unaudited,
        profile=profile,
        description=data.profiles[profile].get("description", ""),
        done=len(done),
        total=len(data.entries),
        baseline_notebook=profile in data.notebooks.get(BASELINE, {}),
        sweeps=sweeps,
        gain=gain,
        seen_unseen=seen_unseen,
        adaptive=adaptive,
    )


def results_page(data: SiteData, w: Writer) -> None:
    """Write ``results.md`` and its plots."""
    sections = [profile_results(data, w, profile) for profile in data.result_profiles]
    body = render(
        "results.md.j2",
        sections=sections,
        baseline=BASELINE,
        baseline_notebooks=list(data.notebooks.get(BASELINE, {})),
    )
    w.page("results.md", "Results", body)
