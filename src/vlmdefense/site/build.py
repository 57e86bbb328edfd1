"""The atlas site's generated pages: Markdown, plots and executed notebooks, written into a docs tree.

:func:`generate` reads ``catalog/`` and ``reproductions/`` under a repository root and writes every
generated file of the site (home, taxonomy, one page per method, compare, results, schema reference,
plots, copies of the executed notebooks) into a folder, and returns the navigation. ``docs/gen_pages.py``
(mkdocs-gen-files) copies that folder into MkDocs' virtual docs tree at build time; nothing generated is
committed.

Every string that comes from a catalog or result file goes through :func:`text` (or :func:`attr`, or
a fenced code block), so that a title holding HTML renders as text.
"""

from __future__ import annotations

import html
import json
import logging
import re
import shutil
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from vlmdefense.catalog.bibtex import bibtex
from vlmdefense.catalog.schema import Entry, Paradigm, ReproductionStatus
from vlmdefense.catalog.validation import Catalog, load_catalog
from vlmdefense.problems import Problem, ProblemsError
from vlmdefense.runs.profiles import load_profiles
from vlmdefense.runs.records import Result, RunStatus, check_result_file, result_path
from vlmdefense.units import Epsilon
from vlmdefense.workbench.report import headline_numbers as headline
from vlmdefense.workbench.report import robust_gain

logger = logging.getLogger(__name__)

ROOT_ENV = "VLMDEFENSE_SITE_ROOT"
"""Environment variable naming the data root of a build (default: the repository of ``mkdocs.yml``)."""
BASELINE = "baseline"
PLOTS = "assets/plots"
PARADIGM_COLOURS = {
    Paradigm.TRAINING_TIME.value: "#1f77b4",
    Paradigm.TEST_TIME_ADAPTATION.value: "#ff7f0e",
    Paradigm.TRAINING_FREE.value: "#2ca02c",
}
STATUS_LABEL = {
    ReproductionStatus.REPRODUCED: "reproduced",
    ReproductionStatus.PARTIAL: "partial",
    ReproductionStatus.PLANNED: "planned",
    ReproductionStatus.NONE: "not reproduced",
}
COST_ORDER = {"none": 0, "low": 1, "medium": 2, "high": 3}
ASSUMPTION_LABELS = {
    "modifies_weights": ("Modifies the model's weights", "weights"),
    "needs_labels": ("Needs labelled data", "labels"),
    "training_data": ("Training data", None),
    "test_time_gradients": ("Computes gradients at inference", "test-time grads"),
    "needs_clean_reference": ("Needs a clean reference (data or the original model's outputs)", "clean ref"),
    "needs_text_encoder": ("Uses the text encoder (class prompts)", None),
    "randomized": ("Randomised prediction", None),
    "inference_time_optimization": ("Optimises per test input", None),
    "non_differentiable": ("Contains a non-differentiable step", None),
}
FLAGS = {
    "randomized": "randomized",
    "inference_time_optimization": "optimizes at inference",
    "non_differentiable": "non-differentiable",
}
SHORT_FLAGS = {"randomized": "random", "inference_time_optimization": "optimizes", "non_differentiable": "non-diff"}


class SiteError(Exception):
    """The site cannot be generated: the catalog or a result file is invalid."""


# --------------------------------------------------------------------------------------------------
# Escaping


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]{}|#])")


def text(value: Any) -> str:
    """``value`` as inline Markdown that renders literally: HTML escaped, Markdown syntax escaped,
    whitespace collapsed to single spaces (so that it can sit in a table cell or a list item)."""
    collapsed = " ".join(str(value).split())
    return _MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(collapsed, quote=False))


def paragraphs(value: str) -> str:
    """Multi-paragraph catalog text (blank lines separate paragraphs) as escaped Markdown."""
    parts = [p for p in re.split(r"\n\s*\n", value.strip()) if p.strip()]
    return "\n\n".join(text(p) for p in parts)


def attr(value: Any) -> str:
    """``value`` escaped for an HTML attribute."""
    return html.escape(str(value), quote=True)


def nav_title(value: str) -> str:
    """A title for MkDocs' navigation and ``<title>``: HTML-escaped, angle brackets replaced.

    Themes print navigation titles unescaped and pass page titles through ``striptags`` (which
    unescapes entities), so ``<`` and ``>`` are replaced by look-alikes here and never reach HTML.
    """
    return html.escape(" ".join(value.split()).replace("<", "‹").replace(">", "›"), quote=False)


def code(value: Any) -> str:
    """``value`` as inline code: HTML tags around escaped text (a Markdown code span would show the escapes)."""
    return f"<code>{text(value)}</code>"


def link(url: str, label: str) -> str:
    """An external link as inline HTML, URL and label escaped."""
    return f'<a href="{attr(url)}">{html.escape(label, quote=False)}</a>'


def fence(body: str, lang: str = "") -> str:
    """A fenced code block longer than any backtick run inside ``body``."""
    longest = max((len(m) for m in re.findall(r"`+", body)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{lang}\n{body.rstrip()}\n{ticks}"


def front_matter(title: str, hide: tuple[str, ...] = ()) -> str:
    """YAML front matter setting the page's ``<title>`` (escaped) and the parts of the theme it hides."""
    hidden = f"hide: {json.dumps(list(hide))}\n" if hide else ""
    return f"---\ntitle: {json.dumps(nav_title(title), ensure_ascii=False)}\n{hidden}---\n\n"


def fmt(value: float | None, signed: bool = False) -> str:
    """A percentage for a table: one decimal, ``–`` when missing."""
    if value is None:
        return "–"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def yes_no(value: bool | None) -> str:
    """yes / no, or "not stated" for a fact the sources leave open (null in the catalog)."""
    return "not stated" if value is None else "yes" if value else "no"


def sortable(value: Any, shown: str) -> str:
    """A table cell whose sort key differs from what it shows."""
    return f'<span data-sort="{attr(value)}">{shown}</span>'


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (cells must be escaped already)."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell or " " for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Data


@dataclass
class SiteData:
    """Everything the pages are made of."""

    root: Path
    catalog: Catalog
    profiles: dict[str, dict[str, Any]]
    results: dict[str, dict[str, Result]] = field(default_factory=dict)
    notebooks: dict[str, dict[str, Path]] = field(default_factory=dict)

    @property
    def entries(self) -> list[Entry]:
        return self.catalog.entries

    def result(self, method: str, profile: str) -> Result | None:
        return self.results.get(method, {}).get(profile)

    def ok(self, method: str, profile: str) -> Result | None:
        """The result of ``method`` in ``profile`` when that run succeeded."""
        found = self.result(method, profile)
        return found if found is not None and found.status is RunStatus.OK else None

    def baseline(self, profile: str) -> Result | None:
        return self.ok(BASELINE, profile)

    @property
    def result_profiles(self) -> list[str]:
        """Profiles (in profiles.yaml order) with at least one successful result of a catalog method."""
        known = set(self.catalog.items)
        return [p for p in self.profiles if any(self.ok(m, p) is not None for m in self.results if m in known)]


def site_profiles(root: Path) -> dict[str, dict[str, Any]]:
    """Profiles shown on the site: all of ``reproductions/profiles.yaml`` but the ``fast`` ones (their
    numbers are not meaningful)."""
    return {name: body for name, body in load_profiles(root).items() if not body.get("fast")}


def collect(root: Path, catalog_dir: Path | None = None) -> SiteData:
    """Load the catalog and every result record and executed notebook under ``root``.

    Raises:
        SiteError: the catalog holds a problem, or a result file is invalid.
    """
    root = Path(root)
    catalog, problems = load_catalog(catalog_dir or root / "catalog")
    if problems or catalog is None:
        raise SiteError("the catalog is invalid (run `vlmdefense validate`):\n" + "\n".join(map(str, problems)))
    try:
        profiles = site_profiles(root)
    except ProblemsError as exc:
        raise SiteError(str(exc)) from exc
    data = SiteData(root=root, catalog=catalog, profiles=profiles)
    bad: list[Problem] = []
    for method in [BASELINE, *catalog.items]:
        for profile in profiles:
            path = result_path(root, method, profile)
            if not path.is_file():
                continue
            found = check_result_file(path, known_profiles=set(profiles))
            if found:
                bad += found
                continue
            data.results.setdefault(method, {})[profile] = Result.model_validate_json(path.read_text("utf-8"))
            notebook = path.parent / f"{method}.ipynb"
            if notebook.is_file():
                data.notebooks.setdefault(method, {})[profile] = notebook
    if bad:
        raise SiteError("invalid result files:\n" + "\n".join(map(str, bad)))
    return data


# --------------------------------------------------------------------------------------------------
# Numbers


def worst(*values: float | None) -> float | None:
    """The lowest of the values given (the honest robust number), ``None`` when there is none."""
    present = [v for v in values if v is not None]
    return min(present) if present else None


def headline_eps(result: Result | None) -> Epsilon | None:
    if result is None or result.headline is None:
        return None
    return result.headline.eps


# --------------------------------------------------------------------------------------------------
# Pages


@dataclass
class Generated:
    """What :func:`generate` wrote: file paths (relative to the output folder) and the navigation."""

    out: Path
    files: list[str] = field(default_factory=list)
    nav: list[Any] = field(default_factory=list)


class Writer:
    """Writes files under ``out`` and remembers them."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.files: list[str] = []

    def path(self, rel: str) -> Path:
        target = self.out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        self.files.append(rel)
        return target

    def page(self, rel: str, title: str, body: str, hide: tuple[str, ...] = ()) -> None:
        self.path(rel).write_text(front_matter(title, hide) + body.rstrip() + "\n", encoding="utf-8")

    def copy(self, rel: str, source: Path) -> None:
        shutil.copyfile(source, self.path(rel))


def method_page(entry_id: str) -> str:
    return f"methods/{entry_id}.md"


def paradigm_page(paradigm: str) -> str:
    return f"taxonomy/{paradigm}/index.md"


def family_page(paradigm: str, family: str) -> str:
    return f"taxonomy/{paradigm}/{family}.md"


def rel(from_page: str, target: str) -> str:
    """A relative link from one docs file to another (MkDocs resolves and checks it)."""
    depth = from_page.count("/")
    return "../" * depth + target


def method_link(from_page: str, entry: Entry) -> str:
    return f"[{text(entry.name)}]({rel(from_page, method_page(entry.id))})"


def _flags(entry: Entry) -> list[str]:
    a = entry.assumptions
    return [label for key, label in FLAGS.items() if getattr(a, key)]


def _short_flags(entry: Entry) -> list[str]:
    return [short for key, short in SHORT_FLAGS.items() if getattr(entry.assumptions, key)]


def _assumption_tags(entry: Entry) -> list[str]:
    a = entry.assumptions
    tags = []
    for key, (_, short) in ASSUMPTION_LABELS.items():
        value = getattr(a, key)
        if short and value is None:
            tags.append(f"{short}?")  # the sources leave it open
        elif short and value:
            tags.append(short)
    return tags


def methods_table(data: SiteData, entries: list[Entry], from_page: str) -> str:
    """The list of methods of a taxonomy page."""
    rows = []
    for e in entries:
        _, robust, adaptive = _best_headline(data, e.id)
        rows.append(
            [
                method_link(from_page, e),
                text(e.title),
                text(e.venue),
                sortable(COST_ORDER[e.cost.level.value], text(e.cost.level.value)),
                text(", ".join(_short_flags(e)) or "–"),
                text(STATUS_LABEL[e.reproduction.status]),
                fmt(worst(robust, adaptive)),
            ]
        )
    header = ["Method", "Title", "Venue", "Cost", "Flags", "Reproduction", "Robust (ours)"]
    return table(header, rows)


def _best_headline(data: SiteData, method: str) -> tuple[float | None, float | None, float | None]:
    """The headline numbers of the first profile (profiles.yaml order, paper first if it ran) with a result."""
    for profile in sorted(data.profiles, key=lambda p: p != "paper"):
        result = data.ok(method, profile)
        if result is not None:
            return headline(result)
    return None, None, None


def _counts(data: SiteData) -> dict[str, int]:
    entries = data.entries
    return {
        "methods": len(entries),
        "families": sum(len(p.families) for p in data.catalog.taxonomy.paradigms),
        "reproduced": sum(e.reproduction.status is ReproductionStatus.REPRODUCED for e in entries),
        "partial": sum(e.reproduction.status is ReproductionStatus.PARTIAL for e in entries),
        "with_results": sum(any(data.ok(e.id, p) for p in data.profiles) for e in entries),
        "adaptive_needed": sum(e.needs_adaptive_evaluation for e in entries),
    }


def home(data: SiteData, w: Writer) -> None:
    taxonomy = data.catalog.taxonomy
    counts = _counts(data)
    by_paradigm = {info.id.value: [e for e in data.entries if e.paradigm == info.id] for info in taxonomy.paradigms}
    w.path("assets/paradigms.svg").write_text(paradigm_diagram(data), encoding="utf-8")
    lines = [
        "# VLM Defense Atlas",
        "",
        "A knowledge base and reproducibility workbench for **adversarial defenses of vision-language "
        "models** (CLIP and the models built on it). Every defense has a validated catalog entry — paper, "
        "mechanism, assumptions, cost, threat model and the paper's own numbers with their exact setting — "
        "and, where it has been reproduced, an executed notebook whose result record is the number shown "
        "here. Every page is generated from `catalog/` and `reproductions/` at build time, so the number on "
        "a page is the number the code produced.",
        "",
        "## The three paradigms at a glance",
        "",
        "![The three paradigms of adversarial defense: training-time defenses harden weights or prompts "
        "before deployment; test-time adaptation tunes prompts or parameters on each test input; "
        "training-free defenses process the input, the features or the prediction at inference]"
        "(assets/paradigms.svg){ .vlmd-diagram }",
        "",
    ]
    rows = []
    for info in taxonomy.paradigms:
        entries = by_paradigm[info.id.value]
        families = ", ".join(f"[{text(f.name)}]({family_page(info.id.value, f.id)})" for f in info.families)
        rows.append(
            [
                f"[{text(info.name)}]({paradigm_page(info.id.value)})",
                str(len(entries)),
                families,
                str(sum(e.needs_adaptive_evaluation for e in entries)),
            ]
        )
    lines += [
        table(["Paradigm", "Methods", "Families", "Need adaptive evaluation"], rows),
        "",
        "## In numbers",
        "",
        f"- **{counts['methods']}** defenses in **{len(taxonomy.paradigms)}** paradigms and "
        f"**{counts['families']}** families;",
        f"- **{counts['reproduced']}** reproduced and **{counts['partial']}** partially reproduced; "
        f"**{counts['with_results']}** with a result record on this site;",
        f"- **{counts['adaptive_needed']}** randomise, optimise at inference or contain a non-differentiable "
        "step, and are unranked until an adaptive attack (EOT, BPDA) has evaluated them.",
        "",
        "## How to use it",
        "",
        "- **Browse** the [taxonomy](taxonomy/index.md): a page per paradigm and per family, every method in it.",
        "- **Read a method**: its card, mechanism, assumptions and cost, the paper's numbers beside ours, the "
        "executed notebook and a BibTeX record to copy. The search box (top right, or press `/`) finds a method "
        "by name, acronym or paper title.",
        "- **Compare** all methods in one [sortable, filterable table](compare.md) — paradigm, cost, "
        "assumptions, evaluation flags, reproduction status and our clean / robust / adaptive accuracy.",
        "- **Look at the [results](results.md)**: robust accuracy against ε, robustness gained per unit of "
        "cost, seen vs. unseen classes, non-adaptive vs. adaptive attacks.",
        "- **Add a method** with the [contributing guide](contributing.md): `vlmdefense new`, fill the YAML, "
        "`vlmdefense validate`, the notebook, `vlmdefense run`, `vlmdefense site build`.",
        "",
        "The same data from the command line:",
        "",
        fence(
            "vlmdefense list --paradigm training-free     # one line per defense\n"
            "vlmdefense show tecoa                         # one entry in full\n"
            "vlmdefense status                             # which reproductions are up to date\n"
            "vlmdefense site serve                         # build this site and serve it on localhost",
            "bash",
        ),
    ]
    w.page("index.md", "Home", "\n".join(lines))


def paradigm_diagram(data: SiteData) -> str:
    """An SVG of the three paradigms: when each intervenes, what it changes, its families and counts."""
    taxonomy = data.catalog.taxonomy
    when = {
        "training-time": ("before deployment", "trains weights or prompts once", "pays in training compute"),
        "test-time-adaptation": ("at inference, per input", "tunes prompts or parameters", "pays per prediction"),
        "training-free": ("at inference, nothing learned", "processes input, features, output", "plugs into any model"),
    }
    col, gap, margin, top = 320, 24, 12, 92
    width = 2 * margin + 3 * col + 2 * gap
    boxes = []
    heights = []
    for index, info in enumerate(taxonomy.paradigms):
        x = margin + index * (col + gap)
        colour = PARADIGM_COLOURS.get(info.id.value, "#555")
        entries = [e for e in data.entries if e.paradigm == info.id]
        lines = when.get(info.id.value, ("", "", ""))
        parts = [
            f'<rect x="{x}" y="{top}" width="{col}" height="56" rx="8" fill="{colour}"/>',
            f'<text x="{x + col / 2}" y="{top + 24}" class="h">{attr(info.name)}</text>',
            f'<text x="{x + col / 2}" y="{top + 45}" class="c">{len(entries)} methods</text>',
        ]
        y = top + 84
        for line in lines:
            parts.append(f'<text x="{x + col / 2}" y="{y}" class="w">{attr(line)}</text>')
            y += 24
        y += 12
        for family in info.families:
            n = sum(e.family == family.id for e in entries)
            parts.append(
                f'<rect x="{x + 12}" y="{y - 17}" width="{col - 24}" height="28" rx="5" fill="{colour}" '
                'fill-opacity="0.12" stroke="' + colour + '"/>'
            )
            parts.append(f'<text x="{x + 24}" y="{y + 1}" class="f">{attr(family.name)}</text>')
            parts.append(f'<text x="{x + col - 24}" y="{y + 1}" class="n">{n}</text>')
            y += 36
        heights.append(y)
        boxes.append("\n".join(parts))
    height = max(heights, default=top + 100) + 10
    arrow_y = 40
    return f"""<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" \
viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif">
<style>
text {{ fill: #222; }}
.h {{ fill: #fff; font-size: 19px; font-weight: bold; text-anchor: middle; }}
.c {{ fill: #fff; font-size: 15px; text-anchor: middle; }}
.w {{ font-size: 16px; text-anchor: middle; }}
.f {{ font-size: 14px; }}
.n {{ font-size: 15px; font-weight: bold; text-anchor: end; }}
.t {{ font-size: 15px; fill: #555; text-anchor: middle; }}
</style>
<defs><marker id="arrow" markerWidth="10" markerHeight="10" refX="9" refY="5" orient="auto">
<path d="M0,0 L10,5 L0,10 z" fill="#888"/></marker></defs>
<line x1="20" y1="{arrow_y}" x2="{width - 20}" y2="{arrow_y}" stroke="#888" stroke-width="2" \
marker-end="url(#arrow)"/>
<text x="{margin + col / 2}" y="{arrow_y - 12}" class="t">before deployment: training, once</text>
<line x1="{margin + col + gap / 2}" y1="{arrow_y - 10}" x2="{margin + col + gap / 2}" y2="{arrow_y + 10}" \
stroke="#888" stroke-width="2"/>
<text x="{margin + 2 * col + 1.5 * gap}" y="{arrow_y - 12}" class="t">deployment: for each test input</text>
<text x="{width / 2}" y="{arrow_y + 30}" class="t">where a defense of a vision-language model intervenes</text>
{chr(10).join(boxes)}
</svg>
"""


def taxonomy_pages(data: SiteData, w: Writer) -> list[Any]:
    """The taxonomy overview, one page per paradigm and per family; returns their navigation."""
    taxonomy = data.catalog.taxonomy
    overview = ["# Taxonomy", "", "Three paradigms, each split into families; every method is in one family.", ""]
    nav: list[Any] = ["taxonomy/index.md"]
    for info in taxonomy.paradigms:
        p = info.id.value
        entries = [e for e in data.entries if e.paradigm == info.id]
        overview += [f"## [{text(info.name)}]({info.id.value}/index.md)", "", text(info.description), ""]
        overview += [
            f"- [{text(f.name)}]({p}/{f.id}.md) — {sum(e.family == f.id for e in entries)} methods"
            for f in info.families
        ]
        overview.append("")
        page = paradigm_page(p)
        body = [
            f"# {text(info.name)}",
            "",
            text(info.description),
            "",
            f"{len(entries)} methods in {len(info.families)} families. [All paradigms](../index.md).",
            "",
        ]
        section: list[Any] = [page]
        for family in info.families:
            members = [e for e in entries if e.family == family.id]
            body += [
                f"## {text(family.name)}",
                "",
                f"{text(family.description)} [Family page]({family.id}.md).",
                "",
                methods_table(data, members, page) if members else "No method of this family in the catalog yet.",
                "",
            ]
            fpage = family_page(p, family.id)
            w.page(
                fpage,
                family.name,
                "\n".join(
                    [
                        f"# {text(family.name)}",
                        "",
                        f"A family of [{text(info.name)}](index.md).",
                        "",
                        text(family.description),
                        "",
                        f"## Methods ({len(members)})",
                        "",
                        methods_table(data, members, fpage) if members else "No method of this family yet.",
                    ]
                ),
                hide=("toc",),
            )
            section.append({nav_title(family.name): fpage})
        w.page(page, info.name, "\n".join(body))
        nav.append({nav_title(info.name): section})
    w.page("taxonomy/index.md", "Taxonomy", "\n".join(overview))
    return nav


def _eps(e: Epsilon, norm: str = "linf") -> str:
    symbol = {"linf": "L∞", "l2": "L2", "l1": "L1", "l0": "L0"}.get(norm, norm)
    return f"{text(symbol)} {text(e.display)}"


def _card(entry: Entry, data: SiteData, page: str) -> str:
    links = entry.links
    items = []
    if links.arxiv:
        items.append(link(f"https://arxiv.org/abs/{links.arxiv}", f"arXiv {links.arxiv}"))
    if links.doi:
        items.append(link(f"https://doi.org/{links.doi}", f"DOI {links.doi}"))
    for key, label in (("paper", "proceedings"), ("openreview", "OpenReview")):
        url = getattr(links, key)
        if url:
            items.append(link(url, label))
    info = data.catalog.taxonomy.paradigm(entry.paradigm)
    family = data.catalog.taxonomy.families_of(entry.paradigm).get(entry.family)
    family_name = family.name if family else entry.family
    reproduction = text(STATUS_LABEL[entry.reproduction.status])
    notebooks = data.notebooks.get(entry.id, {})
    if notebooks:
        reproduction += " — executed notebook: " + ", ".join(f"[{text(p)}]({entry.id}/{p}.ipynb)" for p in notebooks)
    rows = [
        ["**Paper**", " · ".join(items) or "no link listed"],
        ["**Authors**", text(", ".join(entry.authors))],
        ["**Venue**", f"{text(entry.venue)} ({entry.year})"],
        [
            "**Paradigm / family**",
            f"[{text(info.name)}]({rel(page, paradigm_page(entry.paradigm.value))}) → "
            f"[{text(family_name)}]({rel(page, family_page(entry.paradigm.value, entry.family))})",
        ],
        ["**Code**", link(links.code, links.code) if links.code else "no official code listed"],
        *([["**Project page**", link(links.project, links.project)]] if links.project else []),
        ["**Cost level**", text(entry.cost.level.value)],
        ["**Reproduction**", reproduction],
        ["**Catalog id**", f"`{entry.id}`"],
    ]
    return '<div class="vlmd-card" markdown>\n\n' + table(["", ""], rows) + "\n\n</div>"


def _assumptions_table(entry: Entry) -> str:
    rows = []
    for key, (label, _) in ASSUMPTION_LABELS.items():
        value = getattr(entry.assumptions, key)
        rows.append([text(label), yes_no(value) if value is None or isinstance(value, bool) else text(value)])
    c = entry.cost
    rows += [
        ["Training cost", text(c.training)],
        ["Inference cost", text(c.inference)],
        ["Extra forward passes per image", "–" if c.extra_forward_passes is None else f"{c.extra_forward_passes:g}"],
        [
            "Extra backward passes per image",
            "–" if c.extra_backward_passes is None else f"{c.extra_backward_passes:g}",
        ],
        ["Relative latency", "–" if c.relative_latency is None else f"{c.relative_latency:g}×"],
        ["Overall cost level", f"**{text(c.level.value)}**"],
    ]
    return table(["Assumption / cost", "Value"], rows)


def _flags_section(entry: Entry) -> str:
    a = entry.assumptions
    rows = [[text(ASSUMPTION_LABELS[key][0]), yes_no(getattr(a, key))] for key in FLAGS]
    rows.append(
        [
            "The paper attacks the full defended pipeline (adaptive attack)",
            yes_no(entry.threat_model.adaptive_attacks_evaluated),
        ]
    )
    out = [table(["Evaluation flag", "Value"], rows), ""]
    if entry.needs_adaptive_evaluation:
        reasons = ", ".join(_flags(entry))
        paper = (
            "The paper reports an adaptive evaluation."
            if entry.threat_model.adaptive_attacks_evaluated
            else "The paper does not report one: its robust numbers are potentially unreliable."
        )
        out += [
            '!!! warning "Needs adaptive evaluation"',
            "",
            f"    This defense is {text(reasons)}. Following RobustBench and AutoAttack, it is unranked until an "
            f"attack that sees the whole defended pipeline (EOT for randomness, BPDA for non-differentiable steps) "
            f"has evaluated it. {paper}",
            "",
        ]
    else:
        out += [
            "Deterministic, differentiable and without per-input optimisation: a standard white-box attack on "
            "the defended model is already adaptive.",
            "",
        ]
    return "\n".join(out)


def _reported_table(entry: Entry) -> str:
    rows = [
        [
            str(i),
            text(r.model),
            text(r.dataset),
            text(r.attack),
            _eps(r.eps, r.norm.value),
            fmt(r.clean),
            fmt(r.robust),
        ]
        for i, r in enumerate(entry.reported, start=1)
    ]
    settings = [f"{i}. {text(r.setting)} *Source: {text(r.source)}.*" for i, r in enumerate(entry.reported, start=1)]
    return "\n".join(
        [
            table(["#", "Model", "Dataset", "Attack", "ε", "Clean", "Robust"], rows),
            "",
            "The setting of each row, in the paper's terms, and where the number is printed:",
            "",
            *settings,
        ]
    )


def _arrow(paper: float | None, ours: float | None) -> str:
    """``paper → ours (Δ)`` for the side-by-side table."""
    if paper is None:
        return f"– → {fmt(ours)}"
    if ours is None:
        return f"{fmt(paper)} → not measured"
    return f"{fmt(paper)} → {fmt(ours)} ({fmt(ours - paper, signed=True)})"


def _reproduced_section(entry: Entry, data: SiteData, w: Writer) -> str:
    out: list[str] = []
    headline_rows = []
    beside_rows = []
    notes = []
    for profile in data.profiles:
        result = data.result(entry.id, profile)
        if result is None:
            continue
        if result.status is not RunStatus.OK:
            error = result.run.error if result.run and result.run.error else "no error message recorded"
            notes.append(f"The last **{text(profile)}** run failed: {text(error)}")
            continue
        clean, robust, adaptive = headline(result)
        eps = headline_eps(result)
        base = data.baseline(profile)
        _, base_robust, _ = headline(base)
        headline_rows.append(
            [
                f"**{text(profile)}**",
                text(eps.display) if eps else "–",
                fmt(clean),
                fmt(robust),
                fmt(adaptive),
                fmt(base_robust),
                fmt(None if base is None else robust_gain(result, base), signed=True),
            ]
        )
        ours_clean = result.clean.all if result.clean else None
        for i, r in enumerate(entry.reported, start=1):
            beside_rows.append(
                [
                    str(i),
                    text(r.eps.display),
                    text(profile),
                    _arrow(r.clean, ours_clean),
                    _arrow(r.robust, result.worst_robust(r.eps.value)),
                ]
            )
        setup = []
        if result.model is not None:
            setup.append(f"model {code(result.model.name)}")
        dataset = result.dataset
        if dataset is not None:
            setup.append(f"test set {text(dataset.test)} ({dataset.test_images} images)")
        if dataset is not None and dataset.transfer:
            setup.append(f"transfer set {text(dataset.transfer)} ({dataset.transfer_images} images)")
        prov = result.provenance
        if prov is not None:
            commit = (prov.git_commit or "unknown")[:10] + (", uncommitted changes" if prov.dirty else "")
            setup.append(
                f"run {text(prov.started)} on {text(prov.device)} in {prov.duration_seconds:.0f} s "
                f"(commit {code(commit)}, seed {prov.seed})"
            )
        nb = data.notebooks.get(entry.id, {}).get(profile)
        nb_link = f" **[Executed notebook ({text(profile)})]({entry.id}/{profile}.ipynb)**." if nb else ""
        notes.append(f"**{text(profile)}**: {'; '.join(setup)}.{nb_link}")
        plot = f"{PLOTS}/methods/{entry.id}-{profile}.svg"
        w.path(plot).write_text(_method_plot(entry, result, base), encoding="utf-8")
        notes.append(
            f"![Accuracy of {text(entry.name)} against ε in the {text(profile)} profile, beside the undefended "
            f"baseline]({rel(method_page(entry.id), plot)})"
        )
    if not headline_rows and not notes:
        status = STATUS_LABEL[entry.reproduction.status]
        out.append(
            f"**No result yet.** Reproduction status: {text(status)}. "
            + (
                f"The notebook {code(entry.reproduction.notebook)} has not been run for any profile."
                if entry.reproduction.notebook
                else "There is no notebook for this method yet; see [Contributing](../contributing.md)."
            )
        )
        return "\n".join(out)
    if headline_rows:
        out += [
            "At each profile's headline ε (L∞), robust accuracy (%) is the per-example worst case over the "
            "profile's attacks; *gain* is the robust accuracy (the lower of non-adaptive and adaptive) minus the "
            "undefended model's in the same profile.",
            "",
            table(["Profile", "ε", "Clean", "Robust", "Robust (adaptive)", "Undefended robust", "Gain"], headline_rows),
            "",
        ]
    if beside_rows:
        out += [
            "### Beside the paper's numbers",
            "",
            "Each row (#) of the paper's numbers above, then ours at the same ε: paper → ours (Δ = ours − paper). "
            "The **smoke** profile runs a small CLIP on 8×8 digits, so its levels differ from the paper's by "
            "design: compare the direction and the gain over the undefended model, not the absolute numbers.",
            "",
            table(["#", "ε", "Profile", "Clean: paper → ours (Δ)", "Robust: paper → ours (Δ)"], beside_rows),
            "",
        ]
    out += [n + "\n" for n in notes]
    if entry.reproduction.deviations:
        out += ["**Deviations from the paper:**", ""] + [f"- {text(d)}" for d in entry.reproduction.deviations]
    return "\n".join(out)


def svg_sweep(series: list[tuple[str, list[tuple[float, float]], str, bool]], title: str) -> str:
    """A small SVG line chart of accuracy against ε (×1/255): ``(label, points, colour, dashed)`` per line.

    Written directly (no matplotlib) because every method page has one and the build must stay fast.
    """
    width, height = 640, 320
    left, right, top, bottom = 52, 170, 34, 44
    xs = [x * 255 for _, points, _, _ in series for x, _ in points] or [0.0, 1.0]
    x_max = max(max(xs), 1.0)
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + plot_w * (x * 255) / x_max

    def py(y: float) -> float:
        return top + plot_h * (1 - y / 100)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="Helvetica, Arial, sans-serif" font-size="12">',
        '<rect width="100%" height="100%" fill="#fff"/>',
        f'<text x="{left + plot_w / 2}" y="20" text-anchor="middle" font-size="14">{attr(title)}</text>',
    ]
    for tick in range(0, 101, 20):
        y = py(tick)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{tick}</text>')
    for tick in sorted({round(x, 3) for x in xs}):
        x = left + plot_w * tick / x_max
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" stroke="#eee"/>')
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{tick:g}</text>')
    parts += [
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#888"/>',
        f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle">ε (×1/255, L∞)</text>',
        f'<text transform="translate(14 {top + plot_h / 2}) rotate(-90)" text-anchor="middle">accuracy (%)</text>',
    ]
    for index, (label, points, colour, dashed) in enumerate(series):
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        dash = ' stroke-dasharray="6 4"' if dashed else ""
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"/>' for x, y in points]
        ly = top + 12 + 20 * index
        lx = left + plot_w + 12
        parts.append(f'<line x1="{lx}" y1="{ly}" x2="{lx + 22}" y2="{ly}" stroke="{colour}" stroke-width="2"{dash}/>')
        parts.append(f'<text x="{lx + 28}" y="{ly + 4}">{attr(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _method_plot(entry: Entry, result: Result, baseline: Result | None) -> str:
    from vlmdefense.workbench.report import sweep

    colour = PARADIGM_COLOURS.get(entry.paradigm.value, "#d62728")
    series = []
    if baseline is not None and baseline.method != result.method:
        series.append(("undefended", sweep(baseline, False), "#777777", False))
    series.append((entry.name, sweep(result, False), colour, False))
    if any(r.adaptive for r in result.robust):
        series.append((f"{entry.name} (adaptive)", sweep(result, True), colour, True))
    return svg_sweep([s for s in series if s[1]], f"{entry.name} — {result.profile} profile")


def method_pages(data: SiteData, w: Writer) -> list[Any]:
    """One page per method (and its executed notebooks); returns the navigation of the methods."""
    taxonomy = data.catalog.taxonomy
    nav: list[Any] = []
    for info in taxonomy.paradigms:
        section = []
        for entry in [e for e in data.entries if e.paradigm == info.id]:
            page = method_page(entry.id)
            section.append({nav_title(entry.name): page})
            w.page(page, entry.name, render_method(entry, data, w))
            for profile, notebook in data.notebooks.get(entry.id, {}).items():
                w.copy(f"methods/{entry.id}/{profile}.ipynb", notebook)
        nav.append({nav_title(info.name): section})
    return nav


def render_method(entry: Entry, data: SiteData, w: Writer) -> str:
    """The Markdown of one method page."""
    page = method_page(entry.id)
    tm = entry.threat_model
    related = []
    for other_id in entry.related:
        other = data.catalog.items.get(other_id)
        if other is not None:
            o = other.entry
            related.append(f"- {method_link(page, o)} — {text(o.title)} ({text(o.venue)}; {text(o.paradigm.value)})")
    body = [
        f"# {text(entry.name)}",
        "",
        f'<p class="vlmd-subtitle">{html.escape(entry.title, quote=False)}</p>',
        "",
        _card(entry, data, page),
        "",
        "## Summary",
        "",
        paragraphs(entry.summary),
        "",
        "## Mechanism",
        "",
        paragraphs(entry.mechanism),
        "",
        "## Assumptions and cost",
        "",
        _assumptions_table(entry),
        "",
        "## Threat model and targets",
        "",
        table(
            ["Threat model and targets", "As the paper states them"],
            [
                ["Norms", text(", ".join(n.value for n in tm.norms))],
                ["ε", text(", ".join(e.display for e in tm.eps)) or "not stated"],
                ["Attacks", text(", ".join(tm.attacks)) or "not stated"],
                ["Models", text(", ".join(entry.targets.models))],
                ["Tasks", text(", ".join(entry.targets.tasks))],
            ],
        ),
        "",
        "## Evaluation flags",
        "",
        _flags_section(entry),
        "## Reported by the paper",
        "",
        _reported_table(entry) if entry.reported else "The catalog holds no reported numbers for this method.",
        "",
        "## Reproduced here",
        "",
        _reproduced_section(entry, data, w),
        "",
    ]
    if entry.limitations:
        body += ["## Limitations", "", *[f"- {text(item)}" for item in entry.limitations], ""]
    body += ["## Related methods", "", *(related or ["None listed."]), ""]
    body += ["## Sources", "", *[f"- {link(url, url)}" for url in entry.sources], ""]
    body += ["## BibTeX", "", fence(bibtex(entry), "bibtex"), ""]
    return "\n".join(body)


def compare_page(data: SiteData, w: Writer) -> None:
    profiles = data.result_profiles
    header = ["Method", "Paradigm", "Family", "Venue", "Year", "Cost", "Assumptions", "Flags", "Reproduction"]
    for p in profiles:
        header += [f"Clean ({text(p)})", f"Robust ({text(p)})", f"Adaptive ({text(p)})"]
    rows = []
    for e in data.entries:
        family = data.catalog.taxonomy.families_of(e.paradigm).get(e.family)
        flags = _short_flags(e)
        row = [
            method_link("compare.md", e),
            text(e.paradigm.value),
            text(family.name if family else e.family),
            text(e.venue),
            str(e.year),
            sortable(COST_ORDER[e.cost.level.value], text(e.cost.level.value)),
            text(", ".join(_assumption_tags(e)) or "–"),
            text(", ".join(flags) or "–"),
            text(STATUS_LABEL[e.reproduction.status]),
        ]
        for p in profiles:
            clean, robust, adaptive = headline(data.ok(e.id, p))
            row += [fmt(clean), fmt(robust), fmt(adaptive)]
        rows.append(row)
    eps_notes = []
    for p in profiles:
        base = data.baseline(p)
        eps = next((headline_eps(data.ok(e.id, p)) for e in data.entries if data.ok(e.id, p)), None)
        base_note = f"; the undefended model scores {fmt(headline(base)[1])}" if base else ""
        if eps is not None:
            eps_notes.append(f"**{text(p)}** at ε = {text(eps.display)} (L∞){base_note}")
    options = {
        "Paradigm": [p.id.value for p in data.catalog.taxonomy.paradigms],
        "Cost": list(COST_ORDER),
        "Reproduction": [STATUS_LABEL[s] for s in ReproductionStatus],
    }
    selects = "\n".join(
        f'<label>{attr(col)} <select data-filter-column="{attr(col)}"><option value="">all</option>'
        + "".join(f'<option value="{attr(v)}">{attr(v)}</option>' for v in values)
        + "</select></label>"
        for col, values in options.items()
    )
    body = [
        "# Compare all methods",
        "",
        "Every defense of the catalog in one table. Click a column header to sort (again to reverse); type to "
        "filter by any text in a row (name, family, venue, flags); narrow by paradigm, cost or reproduction status.",
        "",
        "*Assumptions*: what the defense needs — changed *weights*, labelled data (*labels*), gradients at test time "
        "(*test-time grads*), a clean reference (*clean ref*). *Flags*: what makes a standard attack insufficient — "
        "a *random*ised prediction, per-input optimisation (*optimizes*), a non-differentiable step (*non-diff*); "
        "a flagged defense is unranked until an adaptive attack has evaluated it.",
        "",
    ]
    if eps_notes:
        body += [
            "Our accuracies (%) are at each profile's headline ε, worst case over the profile's attacks: "
            + "; ".join(eps_notes)
            + ". *Adaptive* is the attack that sees the whole defended pipeline (EOT / BPDA); – means not run.",
            "",
        ]
    else:
        body += ["No reproduction result yet, so there are no accuracy columns.", ""]
    body += [
        '<div class="vlmd-filters" data-table="compare">',
        '<input type="search" data-filter-text placeholder="Filter methods…" aria-label="Filter methods">',
        selects,
        '<span class="vlmd-count" aria-live="polite"></span>',
        "</div>",
        "",
        '<div class="vlmd-compare" markdown>',
        "",
        table(header, rows),
        "",
        "</div>",
    ]
    w.page("compare.md", "Compare", "\n".join(body), hide=("navigation", "toc"))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label(entry: Entry) -> str:
    """A method's name for a matplotlib label (``$`` would start mathtext)."""
    return entry.name.replace("$", r"\$")


def _save_plot(fig: Any, w: Writer, path: str) -> str:
    fig.savefig(w.path(path), dpi=100)
    _pyplot().close(fig)
    return path


def _no_result_note(data: SiteData, profile: str, scope: list[Entry], what: str) -> list[str]:
    """``No <profile> result for N <what>: A, B.`` (nothing when every method of ``scope`` has one)."""
    lacking = [e for e in scope if data.ok(e.id, profile) is None]
    if not lacking:
        return []
    names = ", ".join(method_link("results.md", e) for e in lacking)
    return [f"No {text(profile)} result for {len(lacking)} {what}: {names}.", ""]


def _profile_results(data: SiteData, w: Writer, profile: str) -> list[str]:
    """The plots of one profile: ε sweeps per paradigm, gain vs cost, seen vs unseen, adaptive gap."""
    from vlmdefense.workbench import report

    base = data.baseline(profile)
    ok = {e.id: r for e in data.entries if (r := data.ok(e.id, profile)) is not None}
    done = [e for e in data.entries if e.id in ok]
    body = [f"## Profile: {text(profile)}", "", text(data.profiles[profile].get("description", "")), ""]
    body += [f"{len(done)} of {len(data.entries)} methods have a {text(profile)} result.", ""]
    if BASELINE in data.notebooks and profile in data.notebooks[BASELINE]:
        body += [
            f"The undefended baseline every plot compares with: [its executed notebook]({BASELINE}/{profile}.ipynb).",
            "",
        ]

    body += ["### Robust accuracy against ε", ""]
    for info in data.catalog.taxonomy.paradigms:
        scope = [e for e in data.entries if e.paradigm == info.id]
        members = [e for e in scope if e.id in ok]
        body += [f"#### {text(info.name)}", ""]
        if not members:
            body += [f"No {text(info.name.lower())} method has a {text(profile)} result yet.", ""]
            continue
        results = {label(e): ok[e.id] for e in members}
        if base is not None:
            results = {"baseline (undefended)": base, **results}
        fig = report.plot_sweep_by_method(results, title=f"{info.name} — {profile} profile")
        path = _save_plot(fig, w, f"{PLOTS}/{profile}-sweep-{info.id.value}.png")
        body += [f"![Robust accuracy against ε, {text(info.name)}, {text(profile)} profile]({path})", ""]
        body += _no_result_note(data, profile, scope, "methods of this paradigm")

    body += [
        "### Robustness gained against cost",
        "",
        "Gain = robust accuracy (the lower of non-adaptive and adaptive) minus the undefended model's, at the "
        "headline ε; cost = measured training seconds, and image-tower passes per test image.",
        "",
    ]
    if done and base is not None:
        groups = {label(e): e.paradigm.value for e in done}
        fig = report.plot_gain_vs_cost({label(e): ok[e.id] for e in done}, base, groups)
        path = _save_plot(fig, w, f"{PLOTS}/{profile}-gain-cost.png")
        body += [f"![Robustness gain against cost, {text(profile)} profile]({path})", ""]
        body += _no_result_note(data, profile, data.entries, "methods")
    else:
        body += ["Needs at least one method's result and the baseline's result in this profile.", ""]

    training = [e for e in data.entries if e.paradigm is Paradigm.TRAINING_TIME]
    body += [
        "### Seen vs. unseen classes (training-time methods)",
        "",
        "Training-time defenses are fitted on the seen classes only; zero-shot robustness is measured on the "
        "unseen ones. Points below the diagonal lose on the classes they were not trained on.",
        "",
    ]
    if any(e.id in ok for e in training):
        fig = report.plot_seen_unseen({label(e): ok[e.id] for e in training if e.id in ok}, base)
        path = _save_plot(fig, w, f"{PLOTS}/{profile}-seen-unseen.png")
        body += [f"![Seen against unseen accuracy, {text(profile)} profile]({path})", ""]
        body += _no_result_note(data, profile, training, "training-time methods")
    else:
        body += [f"No training-time method has a {text(profile)} result yet.", ""]

    inference = [e for e in data.entries if e.paradigm is not Paradigm.TRAINING_TIME]
    body += [
        "### Non-adaptive vs. adaptive attacks (test-time and training-free methods)",
        "",
        "A defense that randomises, optimises per input or hides gradients can look robust to an attack on the "
        "base model and fail against one that sees the whole pipeline.",
        "",
    ]
    if any(e.id in ok for e in inference):
        fig = report.plot_adaptive_gap({label(e): ok[e.id] for e in inference if e.id in ok}, base)
        path = _save_plot(fig, w, f"{PLOTS}/{profile}-adaptive.png")
        body += [f"![Non-adaptive against adaptive robust accuracy, {text(profile)} profile]({path})", ""]
        body += _no_result_note(data, profile, inference, "test-time and training-free methods")
    else:
        body += [f"No test-time or training-free method has a {text(profile)} result yet.", ""]
    return body


def results_page(data: SiteData, w: Writer) -> None:
    body = [
        "# Results",
        "",
        "Plots of every result record under `reproductions/`, regenerated at each build. Robust accuracy is "
        "the per-example worst case over the profile's attacks; adaptive attacks (dashed lines) see the whole "
        "defended pipeline. The undefended baseline is drawn in every plot where it applies.",
        "",
    ]
    profiles = data.result_profiles
    if not profiles:
        body += [
            "**No method has a result yet.** Run `vlmdefense run ID --profile smoke`, then rebuild the site.",
            "",
        ]
        body += [
            f"- The undefended baseline, {text(profile)} profile: [executed notebook]({BASELINE}/{profile}.ipynb)."
            for profile in data.notebooks.get(BASELINE, {})
        ]
    for profile in profiles:
        body += _profile_results(data, w, profile)
    w.page("results.md", "Results", "\n".join(body))


# --------------------------------------------------------------------------------------------------
# Schema reference


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """Strip ``Annotated`` and ``None`` from a union; returns the inner type and whether it was optional."""
    optional = False
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
            continue
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            optional = optional or len(args) < len(typing.get_args(annotation))
            if len(args) == 1:
                annotation = args[0]
                continue
        return annotation, optional


def _type_name(annotation: Any) -> str:
    inner, optional = _unwrap(annotation)
    origin = typing.get_origin(inner)
    if origin is list:
        name = f"list of {_type_name(typing.get_args(inner)[0])}"
    elif isinstance(inner, type) and issubclass(inner, Enum):
        name = " \\| ".join(f"`{m.value}`" for m in inner)
    elif inner is Epsilon:
        name = "ε: `4/255` or a number"
    elif isinstance(inner, type) and issubclass(inner, BaseModel):
        name = "mapping"
    elif isinstance(inner, type):
        name = {"str": "text", "int": "integer", "float": "number", "bool": "true / false"}.get(
            inner.__name__, inner.__name__
        )
    else:
        name = text(str(inner))
    return name + (" or null" if optional else "")


def _description(info: FieldInfo) -> str:
    if info.description:
        return info.description
    stack = [info.annotation]
    while stack:
        current = stack.pop()
        if typing.get_origin(current) is typing.Annotated:
            for meta in typing.get_args(current)[1:]:
                if isinstance(meta, FieldInfo) and meta.description:
                    return meta.description
            stack.append(typing.get_args(current)[0])
        else:
            stack.extend(typing.get_args(current))
    return ""


def _model_of(annotation: Any) -> type[BaseModel] | None:
    inner, _ = _unwrap(annotation)
    if typing.get_origin(inner) is list:
        inner, _ = _unwrap(typing.get_args(inner)[0])
    if isinstance(inner, type) and issubclass(inner, BaseModel) and inner is not Epsilon:
        return inner
    return None


def schema_rows(model: type[BaseModel] = Entry, prefix: str = "") -> list[list[str]]:
    """One row per field of ``model`` and of its nested models: field, type, required, default, description."""
    rows = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        inner, _ = _unwrap(info.annotation)
        is_list = typing.get_origin(inner) is list
        required = info.is_required()
        default = "" if required else _default_text(info)
        rows.append(
            [
                f"`{path}`",
                _type_name(info.annotation),
                "yes" if required else "no",
                default,
                text(_description(info) or _model_doc(info.annotation)) or "–",
            ]
        )
        nested = _model_of(info.annotation)
        if nested is not None:
            rows += schema_rows(nested, f"{path}[]." if is_list else f"{path}.")
    return rows


def _model_doc(annotation: Any) -> str:
    nested = _model_of(annotation)
    return (nested.__doc__ or "").strip().splitlines()[0] if nested is not None and nested.__doc__ else ""


def _default_text(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
        if isinstance(value, BaseModel):
            return "see below"
        return f"`{json.dumps(value)}`"
    value = info.default
    if isinstance(value, Enum):
        value = value.value
    return f"`{json.dumps(value)}`"


def schema_page(w: Writer) -> None:
    body = [
        "# Schema reference",
        "",
        "Every field of a catalog entry (`catalog/<paradigm>/<id>.yaml`), generated from the pydantic models in "
        "`src/vlmdefense/catalog.py` — the authority; `catalog/schema.json` is exported from the same models "
        "(`vlmdefense schema --write`). Nested fields are written with dots, list items with `[]`. Unknown "
        "fields are errors, and every problem is reported as `path:line: field: message`.",
        "",
        table(["Field", "Type", "Required", "Default", "Description"], schema_rows()),
        "",
        "A *family* must be one of the families of the entry's paradigm in `catalog/taxonomy.yaml`; *related* ids "
        "must exist and list this entry back; a *reproduction.status* of `reproduced` or `partial` needs a notebook.",
    ]
    w.page("schema.md", "Schema reference", "\n".join(body))


# --------------------------------------------------------------------------------------------------
# Entry point


def generate(root: Path, out: Path, catalog_dir: Path | None = None) -> Generated:
    """Write every generated page, plot and notebook of the site into ``out`` (emptied first).

    Args:
        root: The repository root (``catalog/``, ``reproductions/``).
        out: The folder to write into: it becomes part of the docs tree.
        catalog_dir: Another catalog folder (default ``root/catalog``).

    Returns:
        The files written and the site's navigation (MkDocs ``nav`` structure).

    Raises:
        SiteError: the catalog or a result file is invalid.
    """
    data = collect(root, catalog_dir)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    w = Writer(out)
    home(data, w)
    taxonomy_nav = taxonomy_pages(data, w)
    methods_nav = method_pages(data, w)
    compare_page(data, w)
    results_page(data, w)
    for profile, notebook in data.notebooks.get(BASELINE, {}).items():
        w.copy(f"{BASELINE}/{profile}.ipynb", notebook)
    schema_page(w)
    nav = [
        {"Home": "index.md"},
        {"Taxonomy": taxonomy_nav},
        {"Methods": methods_nav},
        {"Compare": "compare.md"},
        {"Results": "results.md"},
        {"Contributing": [{"How to add a method": "contributing.md"}, {"Schema reference": "schema.md"}]},
    ]
    logger.info("generated %d files for %d methods", len(w.files), len(data.entries))
    return Generated(out=out, files=w.files, nav=nav)
