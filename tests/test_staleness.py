"""Staleness sees the code: a result goes stale when a library module its run depends on changes, and only
then; ``vlmdefense status --format json`` lists every method × profile."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO
from vlmdefense.cli import app
from vlmdefense.runs.code_digest import PACKAGE_DIR, closure, defense_module, dependency_files, imported_names
from vlmdefense.runs.profiles import load_profiles, method_parameters, notebook_profiles
from vlmdefense.runs.staleness import (
    RunState,
    available_methods,
    input_hash,
    output_dir,
    run_inputs,
    run_state,
    state_report,
    variant_reports,
)
from vlmdefense.runs.variants import variant_dir, write_variant_file

METHODS = ("baseline", "tecoa", "fare")


@pytest.fixture
def world(tmp_path: Path) -> tuple[Path, Path]:
    """A repository with three notebooks and fresh-looking records, and a copy of the library to edit."""
    root = tmp_path / "repo"
    (root / "notebooks").mkdir(parents=True)
    for method in METHODS:
        shutil.copy(REPO / "notebooks" / f"{method}.ipynb", root / "notebooks")
    shutil.copytree(REPO / "reproductions", root / "reproductions", ignore=shutil.ignore_patterns("*.ipynb"))
    package = tmp_path / "vlmdefense"
    shutil.copytree(PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    for method in METHODS:
        params = method_parameters(load_profiles(root)["smoke"], method)
        inputs = run_inputs(root, method, params, package)
        path = root / "reproductions" / method / "smoke" / "result.json"
        record = json.loads(path.read_text(encoding="utf-8"))
        record["run"] = {**record["run"], "input_hash": input_hash(inputs), "inputs": inputs}
        path.write_text(json.dumps(record), encoding="utf-8")
    return root, package


def states(root: Path, package: Path) -> dict[str, tuple[RunState, list[str]]]:
    reports = (state_report(root, m, "smoke", package_dir=package) for m in METHODS)
    return {r.method: (r.state, r.changed) for r in reports}


def edit(path: Path) -> None:
    path.write_text(path.read_text(encoding="utf-8") + "\n# an edit\n", encoding="utf-8")


def test_fresh_records_are_ok(world: tuple[Path, Path]) -> None:
    assert {m: s for m, (s, _) in states(*world).items()} == dict.fromkeys(METHODS, RunState.OK)


def test_editing_a_defense_module_makes_only_that_method_stale(world: tuple[Path, Path]) -> None:
    root, package = world
    own = defense_module("tecoa", package)
    assert own is not None and own.parent.parent.name == "defenses", own
    edit(own)
    assert states(root, package) == {
        "baseline": (RunState.OK, []),
        "tecoa": (RunState.STALE, ["code"]),
        "fare": (RunState.OK, []),
    }


def test_editing_shared_workbench_code_makes_every_method_stale(world: tuple[Path, Path]) -> None:
    root, package = world
    edit(package / "workbench" / "attacks.py")
    assert {m: s for m, (s, _) in states(root, package).items()} == dict.fromkeys(METHODS, RunState.STALE)


def test_code_no_run_depends_on_leaves_results_ok(world: tuple[Path, Path]) -> None:
    root, package = world
    for path in (package / "site").glob("*.py"):
        edit(path)
    edit(package / "cli" / "common.py")
    assert {m: s for m, (s, _) in states(root, package).items()} == dict.fromkeys(METHODS, RunState.OK)


def test_a_parameter_change_names_parameters(world: tuple[Path, Path]) -> None:
    root, package = world
    profiles = root / "reproductions" / "profiles.yaml"
    profiles.write_text(profiles.read_text(encoding="utf-8").replace("seed: 0", "seed: 1", 1), encoding="utf-8")
    assert states(root, package)["baseline"] == (RunState.STALE, ["parameters"])


def test_run_state_is_the_state_of_the_record_the_run_would_write(world: tuple[Path, Path]) -> None:
    """What the runner asks before it skips a run: the canonical record, or the variant of the overrides."""
    root, package = world
    assert run_state(root, "tecoa", "smoke", package_dir=package) is RunState.OK
    assert run_state(root, "tecoa", "smoke", {"n_test": 10}, package) is RunState.MISSING  # its variant never ran
    assert run_state(root, "tecoa", "smoke", {"n_test": 10}, package, canonical=True) is RunState.STALE
    edit(package / "workbench" / "attacks.py")
    assert run_state(root, "tecoa", "smoke", package_dir=package) is RunState.STALE
    record = output_dir(root, "fare", "smoke") / "result.json"
    assert record == root / "reproductions" / "fare" / "smoke" / "result.json"
    record.write_text(json.dumps({**json.loads(record.read_text(encoding="utf-8")), "status": "failed"}))
    assert run_state(root, "fare", "smoke", package_dir=package) is RunState.FAILED
    record.unlink()
    assert run_state(root, "fare", "smoke", package_dir=package) is RunState.MISSING


def test_variant_records_are_reported_with_their_overrides(world: tuple[Path, Path]) -> None:
    root, package = world
    overrides = {"n_test": 10}
    folder = variant_dir(root, "tecoa", "smoke", overrides)
    write_variant_file(folder, "tecoa", "smoke", overrides)
    record = json.loads((output_dir(root, "tecoa", "smoke") / "result.json").read_text(encoding="utf-8"))
    inputs = run_inputs(root, "tecoa", method_parameters(load_profiles(root)["smoke"], "tecoa", overrides), package)
    record["run"] = {**record["run"], "input_hash": input_hash(inputs), "inputs": inputs}
    (folder / "result.json").write_text(json.dumps(record), encoding="utf-8")
    broken = variant_dir(root, "fare", "smoke", {"seed": 3})
    broken.mkdir(parents=True)
    (broken / "variant.json").write_text("{not json", encoding="utf-8")
    reports = variant_reports(root, package_dir=package)
    assert [r.as_dict() for r in reports] == [
        {
            "method": "fare",
            "profile": "smoke",
            "state": "failed",
            "changed": ["variant.json"],
            "variant": broken.name,
            "overrides": {},
        },
        {
            "method": "tecoa",
            "profile": "smoke",
            "state": "ok",
            "changed": [],
            "variant": folder.name,
            "overrides": overrides,
        },
    ]
    assert run_state(root, "tecoa", "smoke", overrides, package) is RunState.OK
    assert variant_reports(root, ["paper"], package) == []
    canonical = state_report(root, "tecoa", "smoke", package_dir=package).as_dict()
    assert canonical == {"method": "tecoa", "profile": "smoke", "state": "ok", "changed": [], "variant": None}


def test_a_missing_notebook_a_retired_profile_and_a_record_that_is_not_an_object_are_named(
    world: tuple[Path, Path],
) -> None:
    root, package = world
    (root / "notebooks" / "fare.ipynb").unlink()
    assert state_report(root, "fare", "smoke", package_dir=package).as_dict() == {
        "method": "fare",
        "profile": "smoke",
        "state": "stale",
        "changed": ["notebook"],
        "variant": None,
    }
    reproductions = root / "reproductions"
    shutil.copytree(reproductions / "tecoa" / "smoke", reproductions / "tecoa" / "retired")
    assert state_report(root, "tecoa", "retired", package_dir=package).as_dict() == {
        "method": "tecoa",
        "profile": "retired",
        "state": "stale",
        "changed": ["profile"],
        "variant": None,
    }
    (reproductions / "baseline" / "smoke" / "result.json").write_text("[]", encoding="utf-8")
    assert run_state(root, "baseline", "smoke", package_dir=package) is RunState.MISSING


def test_a_method_s_own_parameters_stale_that_method_only(world: tuple[Path, Path]) -> None:
    root, package = world
    profiles = root / "reproductions" / "profiles.yaml"
    text = profiles.read_text(encoding="utf-8")
    profiles.write_text(text.replace("  methods:", "  methods:\n    tecoa: {n_test: 7}", 1), encoding="utf-8")
    assert states(root, package) == {
        "baseline": (RunState.OK, []),
        "tecoa": (RunState.STALE, ["parameters"]),
        "fare": (RunState.OK, []),
    }


def test_available_methods_are_the_notebooks_baseline_first_without_templates(tmp_path: Path) -> None:
    (tmp_path / "notebooks").mkdir()
    for name in ("zeta", "_template", "baseline", "alpha"):
        (tmp_path / "notebooks" / f"{name}.ipynb").write_text("{}", encoding="utf-8")
    (tmp_path / "notebooks" / "notes.md").write_text("", encoding="utf-8")
    assert available_methods(tmp_path) == ["baseline", "alpha", "zeta"]


def test_imports_are_read_statically_relative_and_inside_functions() -> None:
    source = "from . import a\nfrom .b import c\nimport os\ndef f():\n    from vlmdefense.x import y\n"
    assert imported_names(source, "vlmdefense.pkg.mod") == {
        "vlmdefense.pkg",
        "vlmdefense.pkg.a",
        "vlmdefense.pkg.b",
        "vlmdefense.pkg.b.c",
        "vlmdefense.x",
        "vlmdefense.x.y",
    }
    assert imported_names("from .. import z", "vlmdefense.pkg", is_package=True) == {"vlmdefense", "vlmdefense.z"}


def test_the_closure_of_the_harness_holds_what_it_imports_and_not_the_site() -> None:
    names = {str(p.relative_to(PACKAGE_DIR)) for p in closure(["vlmdefense.workbench.harness"])}
    assert {"workbench/harness.py", "workbench/attacks.py", "runs/records.py", "__init__.py"} <= names
    assert not any(n.startswith(("site/", "cli/")) for n in names)
    files = dependency_files(REPO / "notebooks" / "tecoa.ipynb", "tecoa")
    assert defense_module("tecoa") in files and PACKAGE_DIR / "data" / "digits.yaml" in files


def test_status_json_lists_every_method_and_profile() -> None:
    result = CliRunner().invoke(app, ["status", "--format", "json"], env={"VLMDEFENSE_ROOT": str(REPO)})
    assert result.exit_code == 0, result.output
    rows = [r for r in json.loads(result.output) if r.get("variant") is None]  # canonical records only
    profiles = list(notebook_profiles(REPO))  # the zero-shot suites are for checkpoints, not notebooks
    notebooks = sorted(p.stem for p in (REPO / "notebooks").glob("*.ipynb") if not p.stem.startswith("_"))
    assert sorted({r["method"] for r in rows}) == notebooks
    assert len(rows) == len(notebooks) * len(profiles)
    assert {r["state"] for r in rows} <= {"ok", "stale", "failed", "missing"}


def test_module_names_of_packages_and_modules() -> None:
    from vlmdefense.runs.code_digest import module_name

    assert module_name(PACKAGE_DIR / "runs" / "__init__.py") == "vlmdefense.runs"
    assert module_name(PACKAGE_DIR / "runs" / "staleness.py") == "vlmdefense.runs.staleness"
    assert module_name(PACKAGE_DIR / "__init__.py") == "vlmdefense"


def test_a_renamed_data_file_changes_the_library_digest(tmp_path: Path) -> None:
    """The digest covers each file's place as well as its bytes: the code reads data files by name."""
    from vlmdefense.runs.code_digest import library_digest

    package = tmp_path / "vlmdefense"
    shutil.copytree(PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    notebook = REPO / "notebooks" / "tecoa.ipynb"
    before = library_digest(notebook, "tecoa", package)
    (package / "data" / "digits.yaml").rename(package / "data" / "digits2.yaml")
    assert library_digest(notebook, "tecoa", package) != before


def test_the_closure_follows_relative_imports_from_modules_and_packages(tmp_path: Path) -> None:
    """The library itself imports absolutely; a contributor's module may not, and its imports still count."""
    package = tmp_path / "vlmdefense"
    files = {
        "__init__.py": "",
        "a/__init__.py": "from . import b\n",
        "a/b.py": "from .c import helper\n",
        "a/c.py": "def helper():\n    from ..d import thing\n",
        "d.py": "thing = 1\n",
        "e.py": "",
    }
    for name, source in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(source, encoding="utf-8")
    found = {str(p.relative_to(package)) for p in closure(["vlmdefense.a"], package)}
    assert found == {"__init__.py", "a/__init__.py", "a/b.py", "a/c.py", "d.py"}


def test_a_profile_filter_skips_other_variants_without_stopping(world: tuple[Path, Path]) -> None:
    root, package = world
    for method, profile in (("fare", "paper"), ("tecoa", "smoke")):  # fare's folder sorts first
        folder = variant_dir(root, method, profile, {"seed": 1})
        write_variant_file(folder, method, profile, {"seed": 1})
    assert [(r.method, r.profile, r.state) for r in variant_reports(root, ["smoke"], package)] == [
        ("tecoa", "smoke", RunState.MISSING)
    ]
    canonical = state_report(root, "tecoa", "smoke", {"seed": 1}, package, canonical=True)
    assert (canonical.variant, canonical.overrides) == (None, None)  # the canonical record carries no overrides


def test_a_variant_s_report_names_its_slug_and_an_old_record_says_unrecorded(world: tuple[Path, Path]) -> None:
    root, package = world
    overrides = {"n_test": 10}
    report = state_report(root, "tecoa", "smoke", overrides, package)
    slug = variant_dir(root, "tecoa", "smoke", overrides).name
    assert report.as_dict() == {
        "method": "tecoa",
        "profile": "smoke",
        "state": "missing",
        "changed": [],
        "variant": slug,
        "overrides": overrides,
    }
    path = root / "reproductions" / "fare" / "smoke" / "result.json"
    record = json.loads(path.read_text(encoding="utf-8"))
    record["run"] = {"input_hash": "written-before-inputs-were-recorded"}
    path.write_text(json.dumps(record), encoding="utf-8")
    assert states(root, package)["fare"] == (RunState.STALE, ["unrecorded"])
