"""The taxonomy pages: the overview, one page per paradigm and one per family, each listing its methods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmdefense.catalog.schema import Entry
from vlmdefense.site import labels
from vlmdefense.site.data import SiteData, worst
from vlmdefense.site.links import family_page, paradigm_page
from vlmdefense.site.render import Writer, nav_title, render


@dataclass
class MethodRow:
    """A method in a taxonomy table: its entry, flags, cost rank and our robust accuracy."""

    entry: Entry
    flags: list[str]
    cost_rank: int
    robust: float | None


def method_rows(data: SiteData, entries: list[Entry]) -> list[MethodRow]:
    """The rows of a taxonomy page's list of methods (robust: the lower of non-adaptive and adaptive)."""
    rows = []
    for e in entries:
        _, robust, adaptive = data.best_headline(e.id)
        rows.append(MethodRow(e, labels.short_flags(e), labels.cost_rank(e), worst(robust, adaptive)))
    return rows


def taxonomy_pages(data: SiteData, w: Writer) -> list[Any]:
    """The taxonomy overview, one page per paradigm and per family; returns their navigation."""
    taxonomy = data.catalog.taxonomy
    nav: list[Any] = ["taxonomy/index.md"]
    overview = []
    for info in taxonomy.paradigms:
        p = info.id.value
        entries = data.entries_of(info.id)
        page = paradigm_page(p)
        families = []
        section: list[Any] = [page]
        for family in info.families:
            rows = method_rows(data, [e for e in entries if e.family == family.id])
            families.append({"family": family, "rows": rows})
            fpage = family_page(p, family.id)
            body = render("family.md.j2", page=fpage, paradigm=info, family=family, rows=rows)
            w.page(fpage, family.name, body, hide=("toc",))
            section.append({nav_title(family.name): fpage})
        body = render("paradigm.md.j2", page=page, paradigm=info, methods=len(entries), families=families)
        w.page(page, info.name, body)
        nav.append({nav_title(info.name): section})
        overview.append({"paradigm": info, "families": families})
    w.page("taxonomy/index.md", "Taxonomy", render("taxonomy.md.j2", paradigms=overview))
    return nav
