"""The atlas site's generated pages: Markdown, plots and executed notebooks, written into a docs tree.

:func:`generate` reads ``catalog/`` and ``reproductions/`` under a repository root and writes every
generated file of the site into a folder, and returns the navigation. ``docs/gen_pages.py``
(mkdocs-gen-files) copies that folder into MkDocs' virtual docs tree at build time; nothing generated is
committed.

One module per kind of page — :mod:`.home`, :mod:`.taxonomy`, :mod:`.method`, :mod:`.compare`,
:mod:`.results`, :mod:`.models`, :mod:`.schema_ref` — reads the :class:`~.data.SiteData` of :mod:`.data` and renders
templates of ``site/templates`` through :mod:`.render`, whose engine escapes every value it prints.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmdefense.site.compare import compare_page
from vlmdefense.site.data import BASELINE, SiteError, collect
from vlmdefense.site.home import home
from vlmdefense.site.leaderboard import LEADERBOARD_PAGE, leaderboard_page
from vlmdefense.site.method import method_pages
from vlmdefense.site.models import MODELS_PAGE, models_page
from vlmdefense.site.render import Writer
from vlmdefense.site.results import results_page
from vlmdefense.site.schema_ref import schema_page
from vlmdefense.site.survey import SURVEY_PAGE, survey_page
from vlmdefense.site.taxonomy import taxonomy_pages

__all__ = ["ROOT_ENV", "Generated", "SiteError", "generate"]

logger = logging.getLogger(__name__)

ROOT_ENV = "VLMDEFENSE_SITE_ROOT"
"""Environment variable naming the data root of a build (default: the repository of ``mkdocs.yml``)."""


@dataclass
class Generated:
    """What :func:`generate` wrote: file paths (relative to the output folder) and the navigation."""

    out: Path
    files: list[str] = field(default_factory=list)
    nav: list[Any] = field(default_factory=list)


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
    leaderboard_page(data, w)
    models_page(data, w)
    for profile, notebook in data.notebooks.get(BASELINE, {}).items():
        w.copy(f"{BASELINE}/{profile}.ipynb", notebook)
    schema_page(w)
    has_survey = survey_page(data, w)
    nav = [
        {"Home": "index.md"},
        {"Taxonomy": taxonomy_nav},
        *([{"The survey": SURVEY_PAGE}] if has_survey else []),
        {"Methods": methods_nav},
        {"Compare": "compare.md"},
        {"Results": "results.md"},
        {"Leaderboard": LEADERBOARD_PAGE},
        {"Models": MODELS_PAGE},
        {"Contributing": [{"How to add a method": "contributing.md"}, {"Schema reference": "schema.md"}]},
    ]
    logger.info("generated %d files for %d methods", len(w.files), len(data.entries))
    return Generated(out=out, files=w.files, nav=nav)
