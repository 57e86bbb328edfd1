"""The papermill runner: success, provenance, resume (skip / stale / force), failure, CLI exit codes."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from typer.testing import CliRunner

from conftest import REPO
from vlmdefense.cli import app
from vlmdefense.runs.jupyter import runner_kernel
from vlmdefense.runs.profiles import deep_merge, load_profiles, method_parameters, parse_overrides
from vlmdefense.runs.records import check_result_file, read_result
from vlmdefense.runs.runner import check_results, result_files, run_many, run_one
from vlmdefense.runs.staleness import RunState, available_methods, run_state
from vlmdefense.runs.variants import variant_slug


def make_repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "notebooks").mkdir(parents=True)
    (root / "reproductions").mkdir()
    shutil.copy(REPO / "notebooks" / "baseline.ipynb", root / "notebooks" / "baseline.ipynb")
    shutil.copy(REPO / "reproductions" / "profiles.yaml", root / "reproductions" / "profiles.yaml")
    shutil.copytree(REPO / "catalog", root / "catalog")
    return root


def broken_notebook(path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile = "smoke"\noverrides = {}\nresult_path = ""')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("raise RuntimeError('the defense diverged')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_repo(tmp_path_factory.mktemp("runner"))
    outcome = run_one(root, "baseline", "quick", progress=False)
    assert outcome.state == "ran", outcome.message
    return root


def test_run_writes_a_valid_result_with_provenance(repo: Path) -> None:
    path = repo / "reproductions" / "baseline" / "quick" / "result.json"
    assert check_result_file(path, {"baseline"}, set(load_profiles(repo))) == []
    result = read_result(path)
    assert result.status.value == "ok" and result.method == "baseline" and result.profile == "quick"
    assert result.clean is not None and result.clean.all > 50
    assert {r.eps.display for r in result.robust} == {"8/255"}
    p = result.provenance
    assert p is not None and p.seed == 0 and p.versions["torch"] and p.duration_seconds > 0
    assert p.templates is not None and p.templates.templates and p.command == "vlmdefense run baseline --profile quick"
    assert result.run is not None and result.run.executed_notebook == "reproductions/baseline/quick/baseline.ipynb"
    executed = nbformat.read(str(repo / result.run.executed_notebook), as_version=4)
    assert any(cell.get("outputs") for cell in executed.cells if cell.cell_type == "code")
    assert not list((repo / "reproductions" / "baseline" / "quick").glob(".baseline-*")), "no scratch left behind"


def test_up_to_date_runs_are_skipped_and_changes_make_them_stale(repo: Path) -> None:
    assert run_state(repo, "baseline", "quick") is RunState.OK
    assert run_one(repo, "baseline", "quick", progress=False).state == "skipped"
    assert run_state(repo, "baseline", "quick", {"n_test": 20}) is RunState.MISSING, "a variant not run yet"
    assert run_state(repo, "baseline", "quick", {"n_test": 20}, canonical=True) is RunState.STALE
    assert run_state(repo, "baseline", "smoke") is RunState.MISSING


def test_editing_the_notebook_makes_the_run_stale_and_force_reruns(tmp_path: Path, repo: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(repo, root)
    notebook = root / "notebooks" / "baseline.ipynb"
    nb = nbformat.read(str(notebook), as_version=4)
    nb.cells[0].source += "\n\nEdited."
    nbformat.write(nb, str(notebook))
    assert run_state(root, "baseline", "quick") is RunState.STALE
    before = json.loads((root / "reproductions/baseline/quick/result.json").read_text())
    assert run_one(root, "baseline", "quick", force=True, progress=False).state == "ran"
    after = json.loads((root / "reproductions/baseline/quick/result.json").read_text())
    assert after["run"]["input_hash"] != before["run"]["input_hash"]
    assert after["clean"] == before["clean"], "same seed, same metrics"
    assert run_state(root, "baseline", "quick") is RunState.OK


def test_a_failed_run_is_recorded_and_does_not_stop_the_others(tmp_path: Path, repo: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(repo, root)
    broken_notebook(root / "notebooks" / "broken.ipynb")
    assert available_methods(root) == ["baseline", "broken"]
    outcomes = run_many(root, ["broken", "baseline"], "quick", progress=False)
    assert [o.state for o in outcomes] == ["failed", "skipped"]
    assert "the defense diverged" in outcomes[0].message
    record = json.loads((root / "reproductions/broken/quick/result.json").read_text())
    assert record["status"] == "failed" and "RuntimeError" in record["run"]["error"]
    assert record["provenance"]["git_commit"] is None
    executed = (root / "reproductions/broken/quick/broken.ipynb").read_text()
    assert ("the defense diverged" in executed and "Traceback" in executed) or "RuntimeError" in executed
    assert run_state(root, "broken", "quick") is RunState.FAILED


def test_a_notebook_that_writes_no_fresh_result_fails_instead_of_passing_off_the_old_one(
    tmp_path: Path, repo: Path
) -> None:
    root = tmp_path / "copy"
    shutil.copytree(repo, root)
    old = root / "reproductions/baseline/quick/result.json"
    silent = nbformat.read(str(root / "notebooks/baseline.ipynb"), as_version=4)
    silent.cells = [c for c in silent.cells if "parameters" in c.metadata.get("tags", [])]
    nbformat.write(silent, str(root / "notebooks/silent.ipynb"))
    target = root / "reproductions/silent/quick"
    target.mkdir(parents=True)
    shutil.copy(old, target / "result.json")
    outcome = run_one(root, "silent", "quick", force=True, progress=False)
    assert outcome.state == "failed" and "did not write reproductions/silent/quick/result.json" in outcome.message
    assert json.loads((target / "result.json").read_text())["status"] == "failed"


def test_cli_run_and_status(tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "copy"
    shutil.copytree(repo, root)
    broken_notebook(root / "notebooks" / "broken.ipynb")
    monkeypatch.chdir(root)
    runner = CliRunner()
    result = runner.invoke(app, ["run", "--all", "--profile", "quick"])
    assert result.exit_code == 1
    assert "0 ran, 1 up to date, 1 failed" in result.stdout
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 0
    assert "failed" in result.stdout and "ok" in result.stdout and "missing" in result.stdout
    assert runner.invoke(app, ["run", "nope"]).exit_code == 1
    assert runner.invoke(app, ["run"]).exit_code == 2
    assert runner.invoke(app, ["run", "baseline", "--profile", "nope"]).exit_code == 2
    assert runner.invoke(app, ["run", "baseline", "-p", "novalue"]).exit_code == 2


def test_profiles_and_overrides() -> None:
    profiles = load_profiles(REPO)
    assert {"smoke", "paper", "quick"} <= set(profiles)
    quick = profiles["quick"]
    assert quick["model"] == profiles["smoke"]["model"] and quick["n_test"] == 40 and "extends" not in quick
    assert profiles["smoke"]["headline_eps"] == "8/255"
    assert profiles["smoke"]["methods"] and quick["methods"] == {}, "a profile's own methods replace its parent's"
    assert method_parameters(profiles["smoke"], "r-tpt")["n_test"] == 60
    assert method_parameters(quick, "r-tpt")["n_test"] == 40
    assert profiles["paper"]["model"] == {"name": "ViT-B-32", "pretrained": "openai"}
    overrides = parse_overrides(["n_test=12", "eps=[1/255, 4/255]", "pretrained=/ckpt/model.pt", "model.name=RN50"])
    assert overrides == {
        "n_test": 12,
        "eps": ["1/255", "4/255"],
        "model": {"pretrained": "/ckpt/model.pt", "name": "RN50"},
    }
    params = method_parameters(profiles["smoke"], "x", overrides)
    assert params["model"] == {"name": "RN50", "pretrained": "/ckpt/model.pt"}
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}
    with pytest.raises(ValueError):
        parse_overrides(["=3"])


def test_run_outputs_do_not_make_the_checkout_dirty(tmp_path: Path) -> None:
    import subprocess

    from vlmdefense.runs.provenance import git_state

    root = tmp_path / "git"
    (root / "reproductions" / "tte" / "smoke").mkdir(parents=True)
    (root / "reproductions" / "profiles.yaml").write_text("smoke: {}\n")
    (root / "reproductions" / "tte" / "smoke" / "result.json").write_text("{}\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([*git, "add", "."], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=root, check=True)
    commit, dirty = git_state(root)
    assert commit and dirty is False
    (root / "reproductions" / "tte" / "smoke" / "result.json").write_text('{"new": 1}\n')
    assert git_state(root) == (commit, False), "a rewritten result is an output, not an input"
    (root / "reproductions" / "profiles.yaml").write_text("smoke: {n_test: 1}\n")
    assert git_state(root) == (commit, True), "the profiles are an input"


def test_a_run_with_overrides_is_a_variant_beside_the_canonical_record(tmp_path: Path, repo: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(repo, root)
    canonical = root / "reproductions/baseline/quick"
    before = {name: (canonical / name).read_bytes() for name in ("result.json", "baseline.ipynb")}
    outcome = run_one(root, "baseline", "quick", {"n_test": 20}, force=True, progress=False)
    assert outcome.state == "ran", outcome.message
    assert outcome.variant is not None and re.fullmatch(r"n_test=20-[0-9a-f]{6}", outcome.variant)
    assert {name: (canonical / name).read_bytes() for name in before} == before, "the canonical record is untouched"
    folder = canonical / "variants" / outcome.variant
    assert sorted(p.name for p in folder.iterdir()) == ["baseline.ipynb", "result.json", "variant.json"]
    result = read_result_anywhere(folder / "result.json")
    assert result["parameters"]["n_test"] == 20 and result["dataset"]["test_images"] == 20
    assert (
        result["run"]["executed_notebook"] == f"reproductions/baseline/quick/variants/{outcome.variant}/baseline.ipynb"
    )
    assert result["provenance"]["command"] == "vlmdefense run baseline --profile quick -p n_test=20"
    executed = nbformat.read(str(folder / "baseline.ipynb"), as_version=4)
    assert executed.metadata.language_info.name == "python", "Jupyter opens it without asking for a kernel"
    kernel = runner_kernel() or "of the notebook"
    assert result["run"]["runner"].endswith(f"kernel {kernel}")
    assert executed.metadata.kernelspec.name == (runner_kernel() or "python3")
    assert run_state(root, "baseline", "quick") is RunState.OK, "the canonical state ignores variants"
    assert run_state(root, "baseline", "quick", {"n_test": 20}) is RunState.OK
    assert run_one(root, "baseline", "quick", {"n_test": 20}, progress=False).state == "skipped"
    assert run_one(root, "baseline", "quick", progress=False).state == "skipped", "never takes the variant for it"
    assert check_results(root, {"baseline"}) == [], "validate accepts a variant in its place"
    assert len(result_files(root)) == 2 and result_files(root, variants=False) == [canonical / "result.json"]

    runner = CliRunner()
    rows = json.loads(runner.invoke(app, ["status", "-f", "json"], env={"VLMDEFENSE_ROOT": str(root)}).stdout)
    variants = [r for r in rows if r["variant"]]
    assert variants == [
        {
            "method": "baseline",
            "profile": "quick",
            "state": "ok",
            "changed": [],
            "variant": outcome.variant,
            "overrides": {"n_test": 20},
        }
    ]
    assert {(r["profile"], r["state"]) for r in rows if r["variant"] is None} >= {("quick", "ok")}
    table = runner.invoke(app, ["status"], env={"VLMDEFENSE_ROOT": str(root)}).stdout
    assert table.index("variants") > table.index("reproductions") and "-p n_test=20" in table


def test_a_misplaced_variant_is_reported_and_kept_apart(tmp_path: Path, repo: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(repo, root)
    folder = root / "reproductions/baseline/smoke/variants/n_test=20-000000"
    folder.mkdir(parents=True)
    shutil.copy(root / "reproductions/baseline/quick/result.json", folder / "result.json")
    messages = [p.message for p in check_results(root, {"baseline"})]
    assert messages == ["variant belongs in reproductions/baseline/quick/variants/n_test=20-000000/"]
    (folder / "result.json").unlink()
    shutil.move(str(folder), root / "reproductions/baseline/quick/variants/n_test=20-000000")
    shutil.copy(
        root / "reproductions/baseline/quick/result.json",
        root / "reproductions/baseline/quick/variants/n_test=20-000000/result.json",
    )
    messages = [p.message for p in check_results(root, {"baseline"})]
    assert len(messages) == 1 and "variant.json" in messages[0]


def test_variant_slugs_are_readable_safe_and_stable() -> None:
    assert variant_slug({"epochs": 5}).startswith("epochs=5-")
    slug = variant_slug({"model": {"pretrained": "/ckpt/a b.pt"}, "eps": ["4/255", "8/255"]})
    assert slug.startswith("eps=4_255+8_255,model.pretrained=_ckpt_a_b.pt-") and "/" not in slug and " " not in slug
    assert variant_slug({"b": 1, "a": 2}) == variant_slug({"a": 2, "b": 1})
    assert variant_slug({"n": 1}) != variant_slug({"n": "1"}), "the hash tells values that render alike apart"
    assert len(variant_slug({"x": "y" * 500})) <= 70
    with pytest.raises(ValueError):
        variant_slug({})


def read_result_anywhere(path: Path) -> dict:
    """A result record, validated by its schema wherever it lies."""
    from vlmdefense.runs.records import Result

    data = json.loads(path.read_text(encoding="utf-8"))
    Result.model_validate(data)
    return data
