"""The site's template engine: a Jinja2 environment that escapes every value it prints, the filters the
templates share, and the writer of generated files.

Markdown templates (``*.md.j2``) are autoescaped like HTML ones, since Markdown passes HTML through: a
value printed as ``{{ value }}`` is HTML-escaped by the engine. Text that sits in Markdown goes through the
``md`` filter, which also escapes Markdown's syntax, so that a title holding HTML or ``*`` renders as text.
"""

from __future__ import annotations

import functools
import html
import json
import re
import shutil
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from vlmdefense.site import labels, links
from vlmdefense.units import Epsilon

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]{}|#])")
_NORMS = {"linf": "L∞", "l2": "L2", "l1": "L1", "l0": "L0"}


def text(value: Any) -> Markup:
    """``value`` as inline Markdown that renders literally: HTML escaped, Markdown syntax escaped,
    whitespace collapsed to single spaces (so that it can sit in a table cell or a list item)."""
    collapsed = " ".join(str(value).split())
    return Markup(_MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(collapsed, quote=False)))


def paragraphs(value: str) -> Markup:
    """Multi-paragraph catalog text (blank lines separate paragraphs) as escaped Markdown."""
    parts = [p for p in re.split(r"\n\s*\n", value.strip()) if p.strip()]
    return Markup("\n\n").join(text(p) for p in parts)


def nav_title(value: str) -> str:
    """A title for MkDocs' navigation and ``<title>``: HTML-escaped, angle brackets replaced.

    Themes print navigation titles unescaped and pass page titles through ``striptags`` (which
    unescapes entities), so ``<`` and ``>`` are replaced by look-alikes here and never reach HTML.
    """
    return html.escape(" ".join(value.split()).replace("<", "‹").replace(">", "›"), quote=False)


def front_title(value: str) -> Markup:
    """A page title as a YAML (JSON) string for front matter, escaped by :func:`nav_title`."""
    return Markup(json.dumps(nav_title(value), ensure_ascii=False))


def to_json(value: Any) -> Markup:
    """``value`` as JSON (front matter lists)."""
    return Markup(json.dumps(value))


def fence(body: str, lang: str = "") -> Markup:
    """A fenced code block longer than any backtick run inside ``body`` (Markdown shows its content as is)."""
    longest = max((len(m) for m in re.findall(r"`+", body)), default=0)
    ticks = "`" * max(3, longest + 1)
    return Markup(f"{ticks}{lang}\n{body.rstrip()}\n{ticks}")


def code_span(value: Any) -> Markup:
    """``value`` as a Markdown code span (Markdown shows its content as is)."""
    body = str(value)
    longest = max((len(m) for m in re.findall(r"`+", body)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if longest else ""
    return Markup(f"{ticks}{pad}{body}{pad}{ticks}")


def fmt(value: float | None, signed: bool = False) -> str:
    """A percentage for a table: one decimal, ``–`` when missing."""
    if value is None:
        return "–"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def yes_no(value: bool | None) -> str:
    """yes / no, or "not stated" for a fact the sources leave open (null in the catalog)."""
    return "not stated" if value is None else "yes" if value else "no"


def eps(value: Epsilon, norm: str = "linf") -> Markup:
    """An ε with its norm, e.g. ``L∞ 4/255``."""
    return text(_NORMS.get(norm, norm)) + Markup(" ") + text(value.display)


def number(value: float | None, suffix: str = "") -> str:
    """A cost figure in ``%g`` notation, ``–`` when missing."""
    return "–" if value is None else f"{value:g}{suffix}"


@functools.cache
def environment() -> Environment:
    """The Jinja2 environment of ``site/templates`` (autoescaped, strict about undefined names)."""
    env = Environment(
        loader=PackageLoader("vlmdefense.site", "templates"),
        autoescape=select_autoescape(("html.j2", "svg.j2", "md.j2"), default_for_string=True, default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(
        md=text,
        paragraphs=paragraphs,
        front_title=front_title,
        json=to_json,
        fence=fence,
        code_span=code_span,
        pct=fmt,
        yes_no=yes_no,
        eps=eps,
        number=number,
        status=labels.status,
    )
    env.globals.update(
        rel=links.rel,
        method_page=links.method_page,
        paradigm_page=links.paradigm_page,
        family_page=links.family_page,
    )
    return env


def render(template: str, **context: Any) -> str:
    """Render one template of ``site/templates``."""
    return environment().get_template(template).render(**context)


class Writer:
    """Writes files under ``out`` and remembers them."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.files: list[str] = []

    def path(self, rel: str) -> Path:
        """The path of a new file ``rel`` (its folder created), recorded as written."""
        target = self.out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        self.files.append(rel)
        return target

    def write(self, rel: str, content: str) -> None:
        self.path(rel).write_text(content, encoding="utf-8")

    def page(self, rel: str, title: str, body: str, hide: tuple[str, ...] = ()) -> None:
        """A Markdown page: front matter (its title, the parts of the theme it hides), then ``body``."""
        front = render("front_matter.md.j2", title=title, hide=list(hide))
        self.write(rel, front + body.rstrip() + "\n")

    def copy(self, rel: str, source: Path) -> None:
        shutil.copyfile(source, self.path(rel))
