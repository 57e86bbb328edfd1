"""What the pages are made of: the catalog, the site's profiles, every result record and executed notebook."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmdefense.catalog.schema import Entry, Paradigm
from vlmdefense.catalog.validation import Catalog, load_catalog
from vlmdefense.problems import Problem, ProblemsError
from vlmdefense.runs.checkpoint_records import CHECKPOINTS_DIR, CheckpointResult, check_checkpoint_file
from vlmdefense.runs.profiles import is_suite_profile, load_profiles, notebook_profiles
from vlmdefense.runs.records import Result, RunStatus, check_result_file, result_path
from vlmdefense.units import Epsilon
from vlmdefense.workbench.report import headline_numbers

BASELINE = "baseline"

HeadlineNumbers = tuple[float | None, float | None, float | None]
"""(clean, robust, robust adaptive) at a result's headline ε."""


class SiteError(Exception):
    """The site cannot be generated: the catalog or a result file is invalid."""


@dataclass
class SiteData:
    """Everything the pages are made of."""

    root: Path
    catalog: Catalog
    profiles: dict[str, dict[str, Any]]
    results: dict[str, dict[str, Result]] = field(default_factory=dict)
    notebooks: dict[str, dict[str, Path]] = field(default_factory=dict)
    suite_profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    checkpoints: list[CheckpointResult] = field(default_factory=list)

    @property
    def entries(self) -> list[Entry]:
        return self.catalog.entries

    def entries_of(self, paradigm: Paradigm) -> list[Entry]:
        """The entries of one paradigm, in catalog order."""
        return [e for e in self.entries if e.paradigm == paradigm]

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

    def best_headline(self, method: str) -> HeadlineNumbers:
        """The headline numbers of the first profile (profiles.yaml order, paper first if it ran) with a result."""
        for profile in sorted(self.profiles, key=lambda p: p != "paper"):
            result = self.ok(method, profile)
            if result is not None:
                return headline_numbers(result)
        return None, None, None


def worst(*values: float | None) -> float | None:
    """The lowest of the values given (the honest robust number), ``None`` when there is none."""
    present = [v for v in values if v is not None]
    return min(present) if present else None


def headline_eps(result: Result | None) -> Epsilon | None:
    """The ε of a result's headline numbers."""
    if result is None or result.headline is None:
        return None
    return result.headline.eps


def site_profiles(root: Path) -> dict[str, dict[str, Any]]:
    """Profiles of the reproductions shown on the site: all of ``reproductions/profiles.yaml`` but the ``fast``
    ones (their numbers are not meaningful) and the zero-shot suites (the leaderboard shows those)."""
    return {name: body for name, body in notebook_profiles(root).items() if not body.get("fast")}


def collect(root: Path, catalog_dir: Path | None = None) -> SiteData:
    """Load the catalog and every canonical result record and executed notebook under ``root``
    (``reproductions/<method>/<profile>/``; variants under ``.../variants/`` are experiments, never shown).

    Raises:
        SiteError: the catalog holds a problem, or a result file is invalid.
    """
    root = Path(root)
    catalog, problems = load_catalog(catalog_dir or root / "catalog")
    if problems or catalog is None:
        raise SiteError("the catalog is invalid (run `vlmdefense validate`):\n" + "\n".join(map(str, problems)))
    try:
        profiles = site_profiles(root)
        suites = {name: body for name, body in load_profiles(root).items() if is_suite_profile(body)}
    except ProblemsError as exc:
        raise SiteError(str(exc)) from exc
    data = SiteData(root=root, catalog=catalog, profiles=profiles, suite_profiles=suites)
    bad: list[Problem] = []
    for path in sorted((root / "reproductions" / CHECKPOINTS_DIR).glob("*/*/result.json")):
        found = check_checkpoint_file(path)
        bad += found
        if not found:
            data.checkpoints.append(CheckpointResult.model_validate_json(path.read_text("utf-8")))
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
