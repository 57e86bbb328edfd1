"""The method pages: card, summary, assumptions and cost, evaluation flags, the paper's numbers, ours beside
them (with an ε sweep per profile and the commands that rerun, open and check the notebook), related methods,
sources and BibTeX; and copies of executed notebooks (canonical records only: variants stay off the site)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmdefense.catalog.bibtex import bibtex
from vlmdefense.catalog.schema import Entry
from vlmdefense.runs.records import Result, RunStatus
from vlmdefense.site import labels
from vlmdefense.site.data import SiteData, headline_eps
from vlmdefense.site.detection import with_detection
from vlmdefense.site.links import method_page, method_plot, rel
from vlmdefense.site.models import MODELS_PAGE, prior_anchor, priors_used
from vlmdefense.site.plots import method_plot as sweep_plot
from vlmdefense.site.render import Writer, nav_title, render
from vlmdefense.workbench.audit_report import audit_table, lowered_note
from vlmdefense.workbench.report import headline_numbers, robust_gain


@dataclass
class ProfileRun:
    """The last run of a method in one profile, as the page reports it."""

    profile: str
    result: Result
    failed: bool
    error: str = ""
    notebook: bool = False
    plot: str = ""
    commit: str = ""
    audit: str = ""
    audit_note: str = ""


def paper_links(entry: Entry) -> list[tuple[str, str]]:
    """(URL, label) of the paper's arXiv, DOI, proceedings and OpenReview pages, where listed."""
    links = entry.links
    found = []
    if links.arxiv:
        found.append((f"https://arxiv.org/abs/{links.arxiv}", f"arXiv {links.arxiv}"))
    if links.doi:
        found.append((f"https://doi.org/{links.doi}", f"DOI {links.doi}"))
    for key, label in (("paper", "proceedings"), ("openreview", "OpenReview")):
        url = getattr(links, key)
        if url:
            found.append((url, label))
    return found


def assumption_rows(entry: Entry) -> list[tuple[str, Any]]:
    """(label, value) of each assumption: true / false / None (not stated) or a text."""
    return [(label, getattr(entry.assumptions, key)) for key, (label, _) in labels.ASSUMPTION_LABELS.items()]


def assumptions_table(entry: Entry) -> str:
    """The Markdown table of an entry's assumptions and cost."""
    return render("method_assumptions.md.j2", entry=entry, assumptions=assumption_rows(entry))


def profile_runs(entry: Entry, data: SiteData, w: Writer) -> list[ProfileRun]:
    """The runs of ``entry`` in each profile that has a result, writing the ε sweep of each successful one."""
    runs = []
    for profile in data.profiles:
        result = data.result(entry.id, profile)
        if result is None:
            continue
        if result.status is not RunStatus.OK:
            error = result.run.error if result.run and result.run.error else "no error message recorded"
            runs.append(ProfileRun(profile, result, failed=True, error=error))
            continue
        prov = result.provenance
        commit = ""
        if prov is not None:
            commit = (prov.git_commit or "unknown")[:10] + (", uncommitted changes" if prov.dirty else "")
        plot = method_plot(entry.id, profile)
        w.write(plot, sweep_plot(entry, result, data.baseline(profile)))
        notebook = profile in data.notebooks.get(entry.id, {})
        audit, note = audit_table(result), lowered_note(result)
        runs.append(
            ProfileRun(
                profile, result, False, notebook=notebook, plot=plot, commit=commit, audit=audit, audit_note=note
            )
        )
    return runs


def headline_row(run: ProfileRun, data: SiteData) -> dict[str, Any]:
    """Our headline numbers in one profile, the undefended model's robust accuracy and the gain over it."""
    clean, robust, adaptive = headline_numbers(run.result)
    base = data.baseline(run.profile)
    return {
        "profile": run.profile,
        "eps": headline_eps(run.result),
        "clean": clean,
        "robust": robust,
        "adaptive": adaptive,
        "base_robust": headline_numbers(base)[1],
        "gain": None if base is None else robust_gain(run.result, base),
    }


def render_method(entry: Entry, data: SiteData, w: Writer) -> str:
    """The Markdown of one method page (its ε sweeps are written on the way)."""
    page = method_page(entry.id)
    info = data.catalog.taxonomy.paradigm(entry.paradigm)
    family = data.catalog.taxonomy.families_of(entry.paradigm).get(entry.family)
    runs = profile_runs(entry, data, w)
    ok = [r for r in runs if not r.failed]
    related = [data.catalog.items[o].entry for o in entry.related if o in data.catalog.items]
    text = render(
        "method.md.j2",
        entry=entry,
        page=page,
        paradigm=info,
        family_name=family.name if family else entry.family,
        paper_links=paper_links(entry),
        notebooks=list(data.notebooks.get(entry.id, {})),
        run_id=Path(entry.reproduction.notebook).stem if entry.reproduction.notebook else None,
        assumptions=assumption_rows(entry),
        flag_rows=[(labels.ASSUMPTION_LABELS[key][0], getattr(entry.assumptions, key)) for key in labels.FLAGS],
        flags=labels.flags(entry),
        runs=runs,
        headline_rows=[headline_row(r, data) for r in ok],
        beside=[(r.profile, r.result.clean.all if r.result.clean else None, r.result) for r in ok],
        plot_links={r.profile: rel(page, r.plot) for r in ok},
        related=related,
        priors=[(key, f"{rel(page, MODELS_PAGE)}#{prior_anchor(key)}") for key in priors_used(data, entry.id)],
        bibtex=bibtex(entry),
    )
    return with_detection(text, [(r.profile, r.result) for r in ok])


def method_pages(data: SiteData, w: Writer) -> list[Any]:
    """One page per method (and its executed notebooks); returns the navigation of the methods."""
    nav: list[Any] = []
    for info in data.catalog.taxonomy.paradigms:
        section = []
        for entry in data.entries_of(info.id):
            page = method_page(entry.id)
            section.append({nav_title(entry.name): page})
            w.page(page, entry.name, render_method(entry, data, w))
            for profile, notebook in data.notebooks.get(entry.id, {}).items():
                w.copy(f"methods/{entry.id}/{profile}.ipynb", notebook)
        nav.append({nav_title(info.name): section})
    return nav
