"""``vlmdefense check ID``: validate one entry, run its notebook, build its page, say what is missing."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmdefense.runs.records import RESULT_FILE
from vlmdefense.runs.variants import record_dir


@dataclass
class Step:
    """One step of the check: passed (True), failed (False) or not reached (None)."""

    name: str
    ok: bool | None
    detail: str = ""
    problems: list[str] = field(default_factory=list)


@dataclass
class CheckReport:
    """All steps, plus what a contributor still has to add."""

    method: str
    steps: list[Step]
    missing: list[str]

    @property
    def ok(self) -> bool:
        """True when every step passed."""
        return all(step.ok for step in self.steps)


def _validate(root: Path, method: str) -> tuple[Step, Any]:
    from vlmdefense.catalog.validation import load_catalog, unknown_id_message

    catalog, problems = load_catalog(root / "catalog")
    mine = [str(p) for p in problems if Path(p.path).stem == method or f"'{method}'" in p.message]
    if catalog is None:
        return Step("validate", False, "the taxonomy is broken", [str(p) for p in problems]), None
    if method not in catalog.items:
        detail = unknown_id_message(method, list(catalog.items))
        return Step("validate", False, detail, mine), None
    others = len(problems) - len(mine)
    detail = "entry valid" if not mine else f"{len(mine)} problem(s)"
    if others:
        detail += f" ({others} problem(s) in other files)"
    return Step("validate", not mine, detail, mine), catalog.items[method].entry


def _missing(entry: Any) -> list[str]:
    """Things a reviewer would ask for that the schema does not require."""
    out = []
    if not entry.reported:
        out.append("reported: no numbers from the paper (add its headline numbers with their exact setting)")
    if not entry.links.code:
        out.append("links.code: no official code URL (leave it empty only if there is none)")
    if not entry.limitations:
        out.append("limitations: none listed")
    if not entry.related:
        out.append("related: no related entries")
    if entry.reproduction.notebook and not entry.reproduction.deviations:
        out.append("reproduction.deviations: none listed (how does the small-scale run differ from the paper?)")
    return out


def check_method(
    root: Path,
    method: str,
    profile: str = "smoke",
    overrides: dict[str, Any] | None = None,
    site_dir: Path | None = None,
    progress: bool = False,
) -> CheckReport:
    """Run the three steps in order; a later step runs only when the earlier ones passed."""
    from vlmdefense.runs.runner import run_one
    from vlmdefense.site.cli import SiteBuildError, build_site

    root = Path(root).resolve()
    step, entry = _validate(root, method)
    steps = [step]
    if entry is None:
        return CheckReport(method, [*steps, Step("notebook", None), Step("site", None)], [])
    missing = _missing(entry)
    notebook = entry.reproduction.notebook
    if notebook is None:
        steps.append(Step("notebook", False, "no notebook named under reproduction.notebook"))
    elif not step.ok:
        steps.append(Step("notebook", None, "not run: fix the entry first"))
    else:
        outcome = run_one(root, Path(notebook).stem, profile, overrides, progress=progress)
        result = record_dir(root, Path(notebook).stem, profile, overrides) / RESULT_FILE
        detail = {"ran": f"ran in {outcome.seconds:.0f} s", "skipped": "up to date"}.get(outcome.state, outcome.message)
        where = f", variant {outcome.variant}" if outcome.variant else ""
        steps.append(
            Step(
                "notebook",
                outcome.state != "failed",
                f"{profile}{where}: {detail}",
                [] if outcome.state != "failed" else [f"see {result.parent / (Path(notebook).stem + '.ipynb')}"],
            )
        )
    if not all(s.ok for s in steps):
        steps.append(Step("site", None, "not built: fix the steps above first"))
        return CheckReport(method, steps, missing)
    with tempfile.TemporaryDirectory(prefix="vlmdefense-site-") as scratch:
        out = Path(site_dir) if site_dir is not None else Path(scratch) / "site"
        try:
            seconds = build_site(root / "mkdocs.yml", out, data_root=root)
        except SiteBuildError as exc:
            steps.append(Step("site", False, "the strict build failed", str(exc).splitlines()[:10]))
            return CheckReport(method, steps, missing)
        page = out / "methods" / method / "index.html"
        if not page.is_file():
            steps.append(Step("site", False, f"no page methods/{method}/ in the built site"))
        else:
            steps.append(Step("site", True, f"page methods/{method}/ built ({seconds:.1f} s)"))
    return CheckReport(method, steps, missing)
