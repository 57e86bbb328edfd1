"""Every reproduction notebook runs under papermill with the fastest parameters (the quick profile).

The runs go through the local executor, two jobs side by side with one torch thread each, as
``vlmdefense run --all --executor local`` would run them: the suite's two cores stay busy while a kernel starts.
"""

from __future__ import annotations

import ast
import importlib.util
import shutil
from pathlib import Path

import nbformat
import pytest

from conftest import REPO
from vlmdefense.catalog.validation import load_catalog
from vlmdefense.runs.executors import ClusterOptions, Job, run_jobs
from vlmdefense.runs.records import check_result_file, read_result
from vlmdefense.runs.runner import RunOutcome
from vlmdefense.runs.staleness import RunState, available_methods, run_state
from vlmdefense.runs.submissions import latest_submission
from vlmdefense.workbench.models import ensure_small_clip

METHODS = available_methods(REPO)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("notebooks") / "repo"
    root.mkdir()
    shutil.copytree(REPO / "notebooks", root / "notebooks")
    shutil.copytree(REPO / "catalog", root / "catalog")
    (root / "reproductions").mkdir()
    shutil.copy(REPO / "reproductions" / "profiles.yaml", root / "reproductions" / "profiles.yaml")
    return root


def test_every_reproduced_entry_has_a_notebook() -> None:
    catalog, _ = load_catalog(REPO / "catalog")
    assert catalog is not None
    for item in catalog.items.values():
        notebook = item.entry.reproduction.notebook
        if notebook is not None:
            assert Path(notebook).stem in METHODS, f"{item.entry.id}: {notebook} is not a runnable notebook"


def library_imports(notebook: Path) -> list[tuple[int, str, str]]:
    """``(cell, module, name)`` of every ``from vlmdefense… import name`` in a notebook's code cells."""
    found = []
    cells = nbformat.read(str(notebook), as_version=4).cells
    for number, cell in enumerate(cells):
        if cell.cell_type != "code":
            continue
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vlmdefense"):
                found.extend((number, str(node.module), alias.name) for alias in node.names)
    return found


@pytest.mark.parametrize("notebook", sorted((REPO / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_every_library_name_a_notebook_imports_exists(notebook: Path) -> None:
    """A renamed or moved function fails here in a second, not after minutes of papermill."""
    missing = []
    for cell, module, name in library_imports(notebook):
        imported = importlib.import_module(module)
        submodule = hasattr(imported, "__path__") and importlib.util.find_spec(f"{module}.{name}") is not None
        if not hasattr(imported, name) and not submodule:
            missing.append(f"cell {cell}: from {module} import {name}")
    assert missing == []


@pytest.fixture(scope="module")
def quick_runs(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, RunOutcome]:
    """Every notebook on the quick profile, through the local executor (two jobs at once, one thread each)."""
    ensure_small_clip(progress=False)  # trained once here, not by two kernels at the same time
    jobs = [Job(method, "quick") for method in METHODS]
    logs = tmp_path_factory.mktemp("logs")
    outcomes, submission = run_jobs(repo, jobs, "local", ClusterOptions(cpus=1, parallel=2), logs)
    written = latest_submission(logs)  # what `vlmdefense status` and `--resume` read
    assert written is not None and written.id == submission.id
    assert [j.state for j in written.jobs] == [o.state for o in outcomes]
    assert all(j.job_id and j.log for j in written.jobs)
    return {outcome.method: outcome for outcome in outcomes}


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_notebook_runs_on_the_quick_profile(repo: Path, quick_runs: dict[str, RunOutcome], method: str) -> None:
    outcome = quick_runs[method]
    assert outcome.state == "ran", outcome.message
    assert run_state(repo, method, "quick") is RunState.OK
    path = repo / "reproductions" / method / "quick" / "result.json"
    assert check_result_file(path, {method}, {"quick"}) == []
    result = read_result(path)
    assert result.clean is not None and result.robust
    assert result.provenance is not None and result.cost is not None
    adaptive = {r.adaptive for r in result.robust}
    catalog, _ = load_catalog(REPO / "catalog")
    if catalog is not None and method in catalog.items and catalog.items[method].entry.needs_adaptive_evaluation:
        assert adaptive == {False, True}, "flagged entries need both non-adaptive and adaptive numbers"
