"""The home page: what the atlas is, the paradigms at a glance (with their diagram), the catalog in numbers."""

from __future__ import annotations

from vlmdefense.catalog.schema import ReproductionStatus
from vlmdefense.catalog.survey import load_survey
from vlmdefense.site.data import SiteData
from vlmdefense.site.plots import paradigm_diagram
from vlmdefense.site.render import Writer, render


def counts(data: SiteData) -> dict[str, int]:
    """The catalog in numbers: methods, families, reproductions, results, methods needing adaptive attacks."""
    entries = data.entries
    return {
        "methods": len(entries),
        "paradigms": len(data.catalog.taxonomy.paradigms),
        "families": sum(len(p.families) for p in data.catalog.taxonomy.paradigms),
        "reproduced": sum(e.reproduction.status is ReproductionStatus.REPRODUCED for e in entries),
        "partial": sum(e.reproduction.status is ReproductionStatus.PARTIAL for e in entries),
        "with_results": sum(any(data.ok(e.id, p) for p in data.profiles) for e in entries),
        "adaptive_needed": sum(e.needs_adaptive_evaluation for e in entries),
    }


def home(data: SiteData, w: Writer) -> None:
    """Write ``index.md`` and the paradigm diagram it shows."""
    w.write("assets/paradigms.svg", paradigm_diagram(data))
    paradigms = []
    for info in data.catalog.taxonomy.paradigms:
        entries = data.entries_of(info.id)
        adaptive_needed = sum(e.needs_adaptive_evaluation for e in entries)
        paradigms.append({"info": info, "methods": len(entries), "adaptive_needed": adaptive_needed})
    survey, _ = load_survey(data.catalog.root, data.catalog.taxonomy)
    body = render("home.md.j2", paradigms=paradigms, counts=counts(data), survey=survey)
    w.page("index.md", "Home", body)
