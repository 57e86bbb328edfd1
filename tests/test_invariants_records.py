"""Invariants of what a run writes and what decides whether it is current.

- an atomic write interrupted at any point leaves the previous file intact and no temporary file behind,
  and a reader never sees the target half-written;
- a run's input hash changes with each of its inputs (notebook source, every parameter, the library code
  the run imports, the version) and with nothing else (outputs of the notebook, code it does not import);
- the catalog validator rejects unknown fields, values of the wrong type that lax parsing would coerce,
  and YAML tags that construct Python objects, each as ``path:line: field: message``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import nbformat
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import field_validator

from conftest import REPO, VALID_ENTRY, write_entry
from vlmdefense import fileio
from vlmdefense.catalog.validation import load_catalog
from vlmdefense.runs import staleness
from vlmdefense.runs.code_digest import PACKAGE_DIR
from vlmdefense.runs.profiles import load_profiles, method_parameters
from vlmdefense.runs.record_base import Record, parse_record_file
from vlmdefense.runs.staleness import input_hash, run_inputs

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# ---------------------------------------------------------------------------------------------------------
# Atomic writes.

WRITERS = {
    "bytes": lambda path, value: fileio.atomic_write_bytes(path, json.dumps(value).encode()),
    "text": lambda path, value: fileio.atomic_write_text(path, json.dumps(value)),
    "json": fileio.atomic_write_json,
}


class Injected(RuntimeError):
    """The failure a test injects into a write."""


def leftovers(folder: Path, keep: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != keep)


@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
@pytest.mark.parametrize("existing", [True, False])
def test_a_failure_in_the_middle_of_a_write_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str, where: str, existing: bool
) -> None:
    target = tmp_path / "out" / "result.json"
    target.parent.mkdir()
    old = b'{"old": true}\n'
    if existing:
        target.write_bytes(old)
    calls: list[str] = []

    def fail(*args: Any, **kwargs: Any) -> None:
        calls.append(where)
        raise Injected(where)

    if where == "write":
        real_fdopen = os.fdopen

        def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
            handle = real_fdopen(fd, *args, **kwargs)
            real_write = handle.write

            def half_write(data: bytes) -> int:
                real_write(data[: len(data) // 2])  # a partial write, then the disk fails
                fail()
                return 0

            handle.write = half_write
            return handle

        monkeypatch.setattr(os, "fdopen", fdopen)
    else:
        monkeypatch.setattr(os, where, fail)
    with pytest.raises(Injected):
        WRITERS[writer](target, {"new": list(range(50))})
    assert calls == [where]
    if existing:
        assert target.read_bytes() == old
    else:
        assert not target.exists()
    assert leftovers(target.parent, target.name) == []


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_reader_sees_the_old_file_until_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    target = tmp_path / "result.json"
    target.write_text("old", encoding="utf-8")
    real_replace = os.replace
    seen: list[tuple[str, str, str]] = []

    names: list[str] = []

    def spy(src: Any, dst: Any) -> None:
        seen.append((Path(src).parent.name, Path(dst).read_text(encoding="utf-8"), Path(src).read_text("utf-8")))
        names.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    WRITERS[writer](target, {"new": 1})
    assert len(seen) == 1
    # staged hidden, named after its target and ending in .tmp: a write killed before the rename leaves a file
    # that no glob for records (result.json, *.json) picks up and that a reader recognises
    assert re.fullmatch(r"\.result\.json\.[^.]+\.tmp", names[0]), names[0]
    folder, before, staged = seen[0]
    assert folder == tmp_path.name and before == "old" and json.loads(staged) == {"new": 1}
    assert json.loads(target.read_text(encoding="utf-8")) == {"new": 1}
    assert leftovers(tmp_path, target.name) == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@FAST
@given(payload=json_values)
def test_atomic_json_round_trips(tmp_path: Path, payload: Any) -> None:
    target = tmp_path / "sub" / "deeper" / "x.json"  # missing parents are created
    fileio.atomic_write_json(target, payload)
    text = target.read_text(encoding="utf-8")
    assert json.loads(text) == payload and text.endswith("\n")
    assert text == json.dumps(payload, indent=2, ensure_ascii=False) + "\n"
    fileio.atomic_write_text(target, "é")
    assert target.read_bytes() == "é".encode()
    assert leftovers(target.parent, target.name) == []


# ---------------------------------------------------------------------------------------------------------
# The run's input hash.

METHOD = "tecoa"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    """A repository with one notebook and the profiles, a copy of the library, and the run's parameters."""
    base = tmp_path_factory.mktemp("world")
    root = base / "repo"
    (root / "notebooks").mkdir(parents=True)
    (root / "reproductions").mkdir()
    shutil.copy(REPO / "notebooks" / f"{METHOD}.ipynb", root / "notebooks")
    shutil.copy(REPO / "reproductions" / "profiles.yaml", root / "reproductions")
    package = base / "vlmdefense"
    shutil.copytree(PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    return root, package, method_parameters(load_profiles(root)["smoke"], METHOD)


def changed_inputs(before: dict[str, str], after: dict[str, str]) -> list[str]:
    assert list(before) == list(after) == ["notebook", "parameters", "code", "version"]
    return [k for k in before if before[k] != after[k]]


def test_inputs_are_deterministic(world: tuple[Path, Path, dict[str, Any]]) -> None:
    root, package, params = world
    first = run_inputs(root, METHOD, params, package)
    assert run_inputs(root, METHOD, dict(reversed(list(params.items()))), package) == first
    assert input_hash(first) == input_hash(dict(reversed(list(first.items()))))
    assert first["version"] == staleness.__version__


def mutated(value: Any) -> Any:
    """A different value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [*value, value[0] if value else 1]
    if isinstance(value, dict):
        return {**value, "extra": 1}
    return "changed"


def test_each_parameter_changes_the_hash(world: tuple[Path, Path, dict[str, Any]]) -> None:
    root, package, params = world
    before = run_inputs(root, METHOD, params, package)
    assert len(params) > 5
    for key, value in params.items():
        after = run_inputs(root, METHOD, {**params, key: mutated(value)}, package)
        assert changed_inputs(before, after) == ["parameters"], key
        assert input_hash(after) != input_hash(before), key
    added = run_inputs(root, METHOD, {**params, "new_parameter": None}, package)
    assert changed_inputs(before, added) == ["parameters"]


@FAST
@given(
    inputs=st.fixed_dictionaries({k: st.text(max_size=8) for k in ("notebook", "parameters", "code", "version")}),
    key=st.sampled_from(["notebook", "parameters", "code", "version"]),
    suffix=st.text(min_size=1, max_size=4),
)
def test_input_hash_changes_with_any_one_input(inputs: dict[str, str], key: str, suffix: str) -> None:
    assert input_hash({**inputs, key: inputs[key] + suffix}) != input_hash(inputs)
    assert input_hash(inputs) == input_hash(dict(sorted(inputs.items())))


def test_the_notebook_source_changes_the_hash_and_its_outputs_do_not(
    world: tuple[Path, Path, dict[str, Any]],
) -> None:
    root, package, params = world
    path = staleness.notebook_path(root, METHOD)
    original = path.read_bytes()
    try:
        before = run_inputs(root, METHOD, params, package)
        notebook = nbformat.read(str(path), as_version=4)
        code = next(c for c in notebook.cells if c.cell_type == "code")
        code["outputs"] = [nbformat.v4.new_output("stream", text="printed\n")]
        code["execution_count"] = 42
        nbformat.write(notebook, str(path))
        assert changed_inputs(before, run_inputs(root, METHOD, params, package)) == []
        for cell in notebook.cells:
            cell.source += "\n# edited"
            nbformat.write(notebook, str(path))
            after = run_inputs(root, METHOD, params, package)
            assert changed_inputs(before, after) == ["notebook"]
            cell.source = cell.source.removesuffix("\n# edited")
        notebook.cells.append(nbformat.v4.new_markdown_cell("a new cell"))
        nbformat.write(notebook, str(path))
        assert changed_inputs(before, run_inputs(root, METHOD, params, package)) == ["notebook"]
    finally:
        path.write_bytes(original)


@pytest.mark.parametrize(
    ("relative", "changes"),
    [
        ("workbench/attacks.py", True),
        ("workbench/evaluation.py", True),
        ("workbench/harness.py", True),
        ("runs/records.py", True),
        ("fileio.py", True),
        ("__init__.py", True),
        ("data/digits.yaml", True),
        ("model_configs/vlmd-small-clip.json", True),
        ("defenses/training_time/tecoa.py", True),
        ("site/build.py", False),
        ("cli/common.py", False),
        ("defenses/training_free/ttc.py", False),
    ],
)
def test_library_code_changes_the_hash_when_the_run_imports_it(
    world: tuple[Path, Path, dict[str, Any]], relative: str, changes: bool
) -> None:
    root, package, params = world
    path = package / relative
    original = path.read_bytes()
    try:
        before = run_inputs(root, METHOD, params, package)
        path.write_bytes(original + b"\n")
        after = run_inputs(root, METHOD, params, package)
        assert changed_inputs(before, after) == (["code"] if changes else [])
    finally:
        path.write_bytes(original)


def test_the_version_changes_the_hash(
    world: tuple[Path, Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, package, params = world
    before = run_inputs(root, METHOD, params, package)
    monkeypatch.setattr(staleness, "__version__", before["version"] + ".post1")
    after = run_inputs(root, METHOD, params, package)
    assert changed_inputs(before, after) == ["version"] and input_hash(after) != input_hash(before)


# ---------------------------------------------------------------------------------------------------------
# The catalog validator.


def problems_for(catalog_dir: Path, text: str) -> list[tuple[str, int, str, str]]:
    write_entry(catalog_dir, text=text)
    _, problems = load_catalog(catalog_dir)
    return [(p.path, p.line, p.field, p.message) for p in problems]


def line_of(text: str, needle: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), start=1) if needle in line)


VALID = VALID_ENTRY.format(id="example", related="[]")
KNOWN = {"id", "name", "title", "authors", "year", "venue", "links", "paradigm", "family", "summary", "mechanism"}
KNOWN |= {"assumptions", "cost", "threat_model", "targets", "reported", "sources", "reproduction", "limitations"}
KNOWN |= {"related", "level", "training", "inference", "modifies_weights", "needs_labels", "randomized"}
# YAML reads these keys as booleans or null, not as names
YAML_WORDS = {"true", "false", "null"}
field_names = st.from_regex(r"[a-z][a-z_]{0,12}", fullmatch=True).filter(lambda n: n not in KNOWN | YAML_WORDS)
PLACES = {
    "top level": ("summary:", "", ""),
    "cost": ("  level: low", "  ", "cost."),
    "assumptions": ("  randomized: false", "  ", "assumptions."),
    "links": ("  arxiv: 2401.00001", "  ", "links."),
}


@FAST
@given(name=field_names, place=st.sampled_from(sorted(PLACES)))
def test_unknown_fields_are_rejected_where_they_are(catalog_dir: Path, name: str, place: str) -> None:
    anchor, indent, prefix = PLACES[place]
    text = VALID.replace(anchor, f"{indent}{name}: 1\n{anchor}", 1)
    found = problems_for(catalog_dir, text)
    assert len(found) == 1, found
    path, line, field, message = found[0]
    assert path.endswith("training-time/example.yaml")
    assert (line, field) == (line_of(text, f"{indent}{name}: 1"), prefix + name)
    assert message.startswith("unknown field")


@pytest.mark.parametrize("name", ["on", "no"])
def test_an_unknown_key_that_yaml_1_1_reads_as_a_boolean_is_located(catalog_dir: Path, name: str) -> None:
    text = VALID.replace("  randomized: false", f"  {name}: 1\n  randomized: false", 1)
    found = problems_for(catalog_dir, text)
    assert [(line, field) for _, line, field, _ in found] == [(line_of(text, f"  {name}: 1"), f"assumptions.{name}")]


COERCIONS = [
    ("year: 2024", 'year: "2024"', "year"),
    ("year: 2024", "year: 2024.0", "year"),
    ("year: 2024", "year: true", "year"),
    ("  modifies_weights: true", '  modifies_weights: "yes"', "assumptions.modifies_weights"),
    ("  modifies_weights: true", '  modifies_weights: "true"', "assumptions.modifies_weights"),
    ("  modifies_weights: true", "  modifies_weights: 1", "assumptions.modifies_weights"),
    ("  randomized: false", "  randomized: 0", "assumptions.randomized"),
    ("  randomized: false", '  randomized: "off"', "assumptions.randomized"),
    ("  needs_labels: true", '  needs_labels: "no"', "assumptions.needs_labels"),
    ("  randomized: false", "  randomized: off", "assumptions.randomized"),
    ("  randomized: false", "  randomized: No", "assumptions.randomized"),
    ("  modifies_weights: true", "  modifies_weights: yes", "assumptions.modifies_weights"),
    ("  modifies_weights: true", "  modifies_weights: On", "assumptions.modifies_weights"),
    ("    robust: 30.25", '    robust: "30.25"', "reported[0].robust"),
    ("    clean: 50.5", "    clean: true", "reported[0].clean"),
    ("name: Example", "name: true", "name"),  # a boolean is not text, though a number in a text field is read as text
]


@pytest.mark.parametrize(("old", "new", "field"), COERCIONS)
def test_values_of_the_wrong_type_are_rejected_not_coerced(catalog_dir: Path, old: str, new: str, field: str) -> None:
    text = VALID.replace(old, new, 1)
    assert text != VALID
    found = problems_for(catalog_dir, text)
    assert [(line, f) for _, line, f, _ in found] == [(line_of(text, new.strip()), field)], found
    assert found[0][0].endswith("example.yaml")


@pytest.mark.parametrize(
    "tagged",
    [
        "year: !!python/object:builtins.int 3",
        "name: !!python/object/apply:os.system ['true']",
        "name: !!python/name:os.system ''",
        "summary: !!python/tuple [a, b]",
        "venue: !custom ICLR",
    ],
)
def test_yaml_tags_are_rejected_with_their_line(catalog_dir: Path, tagged: str) -> None:
    key = tagged.split(":", 1)[0]
    text = "\n".join(tagged if line.startswith(f"{key}:") else line for line in VALID.splitlines()) + "\n"
    found = problems_for(catalog_dir, text)
    assert len(found) == 1, found
    path, line, field, message = found[0]
    assert path.endswith("example.yaml") and (line, field) == (line_of(text, tagged), key)
    assert "invalid YAML" in message and "tag" in message


# ---------------------------------------------------------------------------------------------------------
# Checking a result file: every problem names its file, line and field.


def _baseline() -> dict[str, Any]:
    return json.loads((REPO / "reproductions" / "baseline" / "smoke" / "result.json").read_text(encoding="utf-8"))


def _line_of(text: str, key: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), start=1) if f'"{key}":' in line)


def test_each_problem_of_a_result_file_names_its_line_and_field(tmp_path: Path) -> None:
    from vlmdefense.runs.records import check_result_file, read_result

    def check(record: dict[str, Any], where: str = "baseline/smoke", **known: Any) -> tuple[str, list[Any]]:
        path = tmp_path / where / "result.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(record, indent=2)
        path.write_text(text, encoding="utf-8")
        return text, check_result_file(path, known.get("methods"), known.get("profiles"))

    text, problems = check(_baseline(), methods={"baseline"}, profiles={"smoke"})
    assert problems == []
    record = _baseline()
    record["clean"] = None
    text, problems = check(record)
    assert [(p.field, p.line) for p in problems] == [("clean", _line_of(text, "status"))]
    assert "an ok result needs clean accuracy" in problems[0].message
    record = _baseline()
    record.pop("provenance")
    text, problems = check(record)
    assert [(p.field, p.line) for p in problems] == [("provenance", 1)]
    text, problems = check(_baseline(), methods={"tecoa"}, profiles={"paper"})
    assert [(p.field, p.line) for p in problems] == [
        ("method", _line_of(text, "method")),
        ("profile", _line_of(text, "profile")),
    ]
    assert "unknown method 'baseline'" in problems[0].message and "unknown profile 'smoke'" in problems[1].message
    text, problems = check(_baseline(), where="tecoa/smoke")
    assert [(p.field, p.line) for p in problems] == [("method", _line_of(text, "method"))]
    assert problems[0].message == "file belongs in reproductions/baseline/smoke/result.json"
    assert all(str(p.path).endswith("result.json") for p in problems)
    record = _baseline()
    record["profile"] = 3
    text, problems = check(record)
    assert [(p.field, p.line) for p in problems] == [("profile", _line_of(text, "profile"))]
    with pytest.raises(ValueError, match="profile"):
        read_result(tmp_path / "baseline" / "smoke" / "result.json")
    assert read_result(REPO / "reproductions" / "baseline" / "smoke" / "result.json").method == "baseline"


def test_result_problems_read_in_full_and_a_bad_record_is_refused_with_all_of_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole ``path:line: field: message`` text of each problem, as ``vlmdefense validate`` prints it."""
    from vlmdefense.problems import display_path
    from vlmdefense.runs.record_base import json_line
    from vlmdefense.runs.records import check_result_file, read_result

    monkeypatch.chdir(tmp_path)
    path = Path("tecoa") / "smoke" / "result.json"  # three parts, relative: the layout is still checked
    path.parent.mkdir(parents=True)
    record = _baseline()
    record.pop("provenance")
    record["clean"] = None
    text = json.dumps(record, indent=2)
    path.write_text(text, encoding="utf-8")
    shown = display_path(path)
    expected = [
        f"{shown}:1: provenance: provenance missing: a result must say how it was produced",
        f"{shown}:{_line_of(text, 'status')}: clean: an ok result needs clean accuracy",
        f"{shown}:{_line_of(text, 'method')}: method: unknown method 'baseline'",
        f"{shown}:{_line_of(text, 'profile')}: profile: unknown profile 'smoke'",
        f"{shown}:{_line_of(text, 'method')}: method: file belongs in reproductions/baseline/smoke/result.json",
    ]
    assert [str(p) for p in check_result_file(path, {"tecoa"}, {"paper"})] == expected
    with pytest.raises(ValueError) as raised:
        read_result(path)
    assert str(raised.value) == "\n".join([expected[0], expected[1], expected[4]])
    assert json_line(text, "no-such-key") == 1 and json_line(text, 3) == 1 and json_line(text, None) == 1


def test_a_record_that_cannot_be_read_parsed_or_validated_gets_one_located_problem_each(tmp_path: Path) -> None:
    from vlmdefense.problems import display_path
    from vlmdefense.runs.records import Result

    path = tmp_path / "result.json"
    shown = display_path(path)

    def parsed(content: bytes | None) -> tuple[str, list[str]]:
        if content is not None:
            path.write_bytes(content)
        record, text, problems = parse_record_file(path, Result)
        assert record is None
        return text, [str(problem) for problem in problems]

    text, problems = parsed(None)  # no file
    assert text == "" and len(problems) == 1
    assert problems[0].startswith(f"{shown}:1: -: cannot read result: [Errno 2]")
    text, problems = parsed(b'{"method": "\xff"}')
    assert text == "" and problems[0].startswith(f"{shown}:1: -: cannot read result: 'utf-8' codec can't decode")
    broken = '{\n  "method": "baseline",\n  oops\n}'
    text, problems = parsed(broken.encode())
    message = "Expecting property name enclosed in double quotes"
    assert text == broken and problems == [f"{shown}:3: -: invalid JSON: {message}"]
    text, problems = parsed(b"[]")  # valid JSON, not an object: the problem has no field and sits on line 1
    assert problems == [f"{shown}:1: -: Input should be a valid dictionary or instance of Result"]
    record, text, problems = parse_record_file(write(path, '{\n  "name": "Upper"\n}'), _Lowercase)
    assert record is None and [str(p) for p in problems] == [f"{shown}:2: name: names are lower-case"]
    assert parse_record_file(write(path, '{"name": "lower"}'), _Lowercase)[0] == _Lowercase(name="lower")


class _Lowercase(Record):
    """A record whose validator raises ValueError: pydantic prefixes its message with "Value error, "."""

    name: str

    @field_validator("name")
    @classmethod
    def _lower(cls, value: str) -> str:
        if value != value.lower():
            raise ValueError("names are lower-case")
        return value


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_robust_rows_are_selected_by_eps_and_kind() -> None:
    from vlmdefense.runs.records import read_result

    result = read_result(REPO / "reproductions" / "a-tpt" / "smoke" / "result.json")
    eps = result.robust[0].eps.value
    rows = result.robust_at(eps)
    assert rows and all(abs(r.eps.value - eps) < 1e-9 for r in rows)
    for adaptive in (True, False):
        kind = [r for r in rows if r.adaptive == adaptive]
        assert result.robust_at(eps, adaptive) == kind
        values = [r.acc.all for r in kind if r.acc.all is not None]
        assert result.worst_robust(eps, adaptive) == (min(values) if values else None)
    assert result.worst_robust(eps) == min(r.acc.all for r in rows if r.acc.all is not None)
    assert result.robust_at(eps + 1e-6) == [] and result.worst_robust(eps + 1e-6) is None


def test_an_audit_lists_exactly_its_flagged_checks_and_finds_each_by_id() -> None:
    from vlmdefense.runs.records import Audit, AuditCheck, AuditStatus

    checks = [
        AuditCheck(id=name, title=name, status=status, detail="")
        for name, status in (
            ("eps-zero", AuditStatus.PASS),
            ("monotonic", AuditStatus.FLAG),
            ("unbounded", AuditStatus.SKIP),
            ("black-box", AuditStatus.FLAG),
        )
    ]
    audit = Audit(checks=checks, images=10, tolerance="none")
    assert audit.flags() == [checks[1], checks[3]]
    assert [audit.check(c.id) for c in checks] == checks
    assert audit.check("transfer") is None
    assert Audit(checks=checks[:1], images=1, tolerance="none").flags() == []


def test_the_harness_reads_reported_numbers_and_the_baseline_and_writes_a_record(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from vlmdefense.runs.records import read_result, result_path
    from vlmdefense.workbench import harness

    catalog, _ = load_catalog(REPO / "catalog")
    assert catalog is not None
    with_numbers = next(i for i, item in sorted(catalog.items.items()) if item.entry.reported)
    assert harness._reported(with_numbers, REPO) == list(catalog.items[with_numbers].entry.reported)
    assert harness._reported("no-such-method", REPO) == []
    assert harness._reported(with_numbers, tmp_path) == []  # no catalog there

    baseline = harness.load_baseline(SimpleNamespace(root=REPO, profile="smoke"))  # type: ignore[arg-type]
    assert baseline is not None and baseline == read_result(result_path(REPO, "baseline", "smoke"))
    assert harness.load_baseline(SimpleNamespace(root=tmp_path, profile="smoke")) is None  # type: ignore[arg-type]
    broken = result_path(tmp_path, "baseline", "smoke")
    broken.parent.mkdir(parents=True)
    broken.write_text('{"method": "baseline"}', encoding="utf-8")
    assert harness.load_baseline(SimpleNamespace(root=tmp_path, profile="smoke")) is None  # type: ignore[arg-type]

    target = result_path(tmp_path / "out", "baseline", "smoke")
    assert harness.save_result(baseline, target) == target
    assert read_result(target) == baseline
    assert harness.save_result(baseline, "") is None and harness.save_result(baseline, None) is None
