"""Every reproduction notebook runs under papermill with the fastest parameters (the quick profile)."""

from __future__ import annotations

import ast
import importlib.util
import shutil
from pathlib import Path

import nbformat
import pytest

from conftest import REPO
from vlmdefense.catalog.validation import load_catalog
from vlmdefense.runs.records import check_result_file, read_result
from vlmdefense.runs.runner import run_one
from vlmdefense.runs.staleness import available_methods

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


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_notebook_runs_on_the_quick_profile(repo: Path, method: str) -> None:
    outcome = run_one(repo, method, "quick", progress=False)
    assert outcome.state == "ran", outcome.message
    path = repo / "reproductions" / method / "quick" / "result.json"
    assert check_result_file(path, {method}, {"quick"}) == []
    result = read_result(path)
    assert result.clean is not None and result.robust
    assert result.provenance is not None and result.cost is not None
    adaptive = {r.adaptive for r in result.robust}
    catalog, _ = load_catalog(REPO / "catalog")
    if catalog is not None and method in catalog.items and catalog.items[method].entry.needs_adaptive_evaluation:
        assert adaptive == {False, True}, "flagged entries need both non-adaptive and adaptive numbers"
