"""The command line: exit codes 0/1/2, one-line user errors, list formats, new, bibtex."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO, write_entry
from vlmdefense.catalog.schema import schema_text
from vlmdefense.catalog.validation import load_catalog
from vlmdefense.cli import app
from vlmdefense.runs.records import RESULT_SCHEMA_FILE, result_schema_text

runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_version() -> None:
    code, out, _ = run("--version")
    assert code == 0 and out.startswith("vlmdefense ")


def test_validate_ok_prints_one_line_summary(catalog_dir: Path) -> None:
    code, out, _ = run("validate", str(catalog_dir))
    assert code == 0
    assert out.strip().splitlines() == [
        "catalog ok: 1 entries (1 training-time, 0 test-time-adaptation, 0 training-free)"
    ]


def test_validate_reports_all_errors_then_exits_1(catalog_dir: Path) -> None:
    write_entry(catalog_dir, method_id="b", text="- x\n")
    write_entry(catalog_dir, method_id="c", text="")
    code, out, err = run("validate", str(catalog_dir))
    assert code == 1
    lines = out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("b.yaml:1: -: top level must be a mapping, got a list")
    assert "2 problem(s) in 2 file(s)" in err


def test_validate_missing_directory(tmp_path: Path) -> None:
    code, out, _ = run("validate", str(tmp_path / "nowhere"))
    assert code == 1
    assert "catalog directory not found" in out


def test_list_formats(catalog_dir: Path) -> None:
    code, out, _ = run("list", "--catalog", str(catalog_dir), "--format", "json")
    assert code == 0
    payload = json.loads(out)
    assert [e["id"] for e in payload] == ["example"]
    assert payload[0]["reported"][0]["eps"] == {"value": pytest.approx(1 / 255), "display": "1/255"}
    assert payload[0]["needs_adaptive_evaluation"] is False
    code, out, _ = run("list", "-c", str(catalog_dir), "-f", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rows[0]["id"] == "example" and rows[0]["arxiv"] == "2401.00001"
    assert "PGD-100" in rows[0]["reported"] and "Table 1" in rows[0]["reported"]
    code, out, _ = run("list", "-c", str(catalog_dir))
    assert code == 0 and "example" in out


def test_list_filters(catalog_dir: Path) -> None:
    code, out, _ = run("list", "-c", str(catalog_dir), "--paradigm", "training-free", "-f", "json")
    assert code == 0 and json.loads(out) == []
    code, out, _ = run("list", "-c", str(catalog_dir), "--family", "adversarial-fine-tuning", "-f", "json")
    assert len(json.loads(out)) == 1
    code, _, err = run("list", "-c", str(catalog_dir), "--family", "nope")
    assert code == 2 and "unknown family 'nope'" in err


def test_usage_error_exits_2(catalog_dir: Path) -> None:
    code, _, _ = run("list", "--paradigm", "post-hoc")
    assert code == 2
    code, _, _ = run("show")
    assert code == 2


def test_show_and_unknown_id(catalog_dir: Path) -> None:
    code, out, _ = run("show", "example", "-c", str(catalog_dir))
    assert code == 0 and "An Example Defense for Tests" in out and "Table 1" in out
    code, out, err = run("show", "exampel", "-c", str(catalog_dir))
    assert code == 1
    assert err.strip() == "error: no method 'exampel' in the catalog (did you mean 'example'?)"


def test_bibtex(catalog_dir: Path) -> None:
    code, out, _ = run("bibtex", "example", "-c", str(catalog_dir))
    assert code == 0
    assert out.startswith("@inproceedings{lovelace2024example,")
    assert "author = {Ada Lovelace and Alan Turing}" in out and "eprint = {2401.00001}" in out
    code, _, err = run("bibtex", "nope", "-c", str(catalog_dir))
    assert code == 1 and "no method 'nope'" in err


def test_new_scaffolds_an_entry_that_fails_until_filled(catalog_dir: Path) -> None:
    scaffold = ("new", "my-defense", "--paradigm", "training-free", "--family", "counterattack", "--no-notebook")
    code, _, _ = run(*scaffold, "-c", str(catalog_dir))
    assert code == 0
    path = catalog_dir / "training-free" / "my-defense.yaml"
    assert path.is_file()
    _, problems = load_catalog(catalog_dir)
    assert problems and all(p.path.endswith("my-defense.yaml") for p in problems)
    assert any("placeholder 'TODO'" in p.message for p in problems)
    code, _, err = run(*scaffold, "-c", str(catalog_dir))
    assert code == 1 and "exists already" in err
    code, _, err = run(
        "new",
        "other",
        "--paradigm",
        "training-free",
        "--family",
        "adversarial-fine-tuning",
        "--no-notebook",
        "-c",
        str(catalog_dir),
    )
    assert code == 1 and "unknown family" in err
    code, _, err = run(
        "new",
        "Bad_Id",
        "--paradigm",
        "training-free",
        "--family",
        "counterattack",
        "--no-notebook",
        "-c",
        str(catalog_dir),
    )
    assert code == 1 and "invalid id" in err


def test_python_dash_m_entry_point(catalog_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vlmdefense", "validate", str(catalog_dir)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("catalog ok")


def test_schema_json_matches_the_models() -> None:
    committed = (REPO / "catalog" / "schema.json").read_text(encoding="utf-8")
    assert committed == schema_text(), "catalog/schema.json drifted: run `vlmdefense schema --write`"


def test_result_schema_json_matches_the_models() -> None:
    committed = (REPO / "catalog" / RESULT_SCHEMA_FILE).read_text(encoding="utf-8")
    assert committed == result_schema_text(), f"catalog/{RESULT_SCHEMA_FILE} drifted: run `vlmdefense schema --write`"


def test_committed_results_validate_against_the_exported_schema() -> None:
    import jsonschema

    schema = json.loads(result_schema_text())
    listed = subprocess.run(
        ["git", "ls-files", "reproductions/*/*/result.json"], cwd=REPO, capture_output=True, text=True, check=True
    )
    paths = [REPO / line for line in listed.stdout.split()]
    assert paths, "no committed result records"
    for path in paths:
        jsonschema.validate(json.loads(path.read_text(encoding="utf-8")), schema)


def test_schema_json_accepts_the_yaml_shorthands(catalog_dir: Path) -> None:
    import jsonschema
    import yaml

    data = yaml.safe_load((catalog_dir / "training-time" / "example.yaml").read_text())
    data["links"]["arxiv"] = str(data["links"]["arxiv"])
    jsonschema.validate(data, json.loads(schema_text()))


def test_the_real_catalog_is_valid() -> None:
    catalog, problems = load_catalog(REPO / "catalog")
    assert problems == [], "\n".join(map(str, problems))
    assert catalog is not None


def test_new_without_a_template_writes_nothing(catalog_dir: Path) -> None:
    code, _, err = run(
        "new", "lonely", "--paradigm", "training-free", "--family", "counterattack", "-c", str(catalog_dir)
    )
    assert code == 1 and "template" in err
    assert not (catalog_dir / "training-free" / "lonely.yaml").exists()


def test_new_scaffolds_the_notebook_from_the_template(catalog_dir: Path) -> None:
    notebooks = catalog_dir.parent / "notebooks"
    notebooks.mkdir()
    shutil.copy(REPO / "notebooks" / "_template.ipynb", notebooks / "_template.ipynb")
    code, out, _ = run(
        "new", "my-defense", "--paradigm", "training-free", "--family", "counterattack", "-c", str(catalog_dir)
    )
    assert code == 0, out
    text = (notebooks / "my-defense.ipynb").read_text()
    assert 'harness.setup(\\"my-defense\\"' in text and "METHOD_ID" not in text
    assert '"parameters"' in text


def test_validate_checks_result_files(catalog_dir: Path) -> None:
    root = catalog_dir.parent
    (root / "reproductions").mkdir()
    shutil.copy(REPO / "reproductions" / "profiles.yaml", root / "reproductions" / "profiles.yaml")
    record = json.loads((REPO / "reproductions" / "baseline" / "smoke" / "result.json").read_text())
    target = root / "reproductions" / "baseline" / "smoke" / "result.json"
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps(record, indent=2))
    code, out, _ = run("validate", str(catalog_dir))
    assert code == 0 and "1 result file(s) ok" in out
    record["method"] = "ghost"
    record["clean"]["all"] = "high"
    stray = root / "reproductions" / "ghost" / "smoke" / "result.json"
    stray.parent.mkdir(parents=True)
    stray.write_text(json.dumps(record, indent=2))
    code, out, _ = run("validate", str(catalog_dir))
    assert code == 1
    assert "ghost/smoke/result.json" in out and "clean.all" in out


def test_audit_prints_each_check_and_exits_1_on_a_flag() -> None:
    from vlmdefense.runs.records import read_result, result_path

    for method in ("baseline", "clipure"):
        record = read_result(result_path(REPO, method, "smoke"))
        assert record.audit is not None, f"the committed {method} result has no audit"
        result = runner.invoke(app, ["audit", method, "--format", "csv"])
        rows = list(csv.DictReader(io.StringIO(result.stdout)))
        assert [r["check"] for r in rows] == [c.id for c in record.audit.checks]
        assert [r["status"] for r in rows] == [c.status.value for c in record.audit.checks]
        assert all(r["seconds"] != "" for r in rows)
        assert result.exit_code == (1 if record.audit.flags() else 0)
    flagged = runner.invoke(app, ["audit", "clipure", "--flags", "--format", "json"])
    assert {c["status"] for c in json.loads(flagged.stdout)} <= {"flag"}
    missing = runner.invoke(app, ["audit", "baseline", "--profile", "quick"])
    assert missing.exit_code == 1 and "no quick result" in missing.output
