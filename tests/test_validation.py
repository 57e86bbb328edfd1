"""Every kind of bad catalog input is reported as ``path:line: field: message``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import VALID_ENTRY, write_entry
from vlmdefense.catalog.validation import load_catalog, load_valid_catalog, unknown_id_message
from vlmdefense.problems import Problem, ProblemsError, display_path


def valid_text(method_id: str = "example", related: str = "[]") -> str:
    return VALID_ENTRY.format(id=method_id, related=related)


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line containing ``needle``."""
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in text")


def problems_in(root: Path, name: str) -> list[Problem]:
    _, problems = load_catalog(root)
    return [p for p in problems if p.path.endswith(name)]


def single(root: Path, name: str) -> Problem:
    found = problems_in(root, name)
    assert len(found) == 1, found
    return found[0]


def test_valid_catalog_has_no_problems(catalog_dir: Path) -> None:
    catalog, problems = load_catalog(catalog_dir)
    assert problems == []
    entry = catalog.get("example")
    assert entry.reported[0].eps.display == "1/255"
    assert entry.reported[0].eps.value == pytest.approx(1 / 255)
    assert entry.reported[0].norm.value == "linf"
    assert [e.display for e in entry.threat_model.eps] == ["1/255", "4/255"]


def test_load_valid_catalog_returns_the_catalog_or_raises_every_problem(catalog_dir: Path) -> None:
    assert [e.id for e in load_valid_catalog(catalog_dir).entries] == ["example"]
    write_entry(catalog_dir, text=valid_text().replace("name: Example", "name: [Example"), method_id="broken")
    write_entry(catalog_dir, "listed", text="\n- id: x\n")
    with pytest.raises(ProblemsError) as raised:
        load_valid_catalog(catalog_dir)
    assert sorted(Path(p.path).name for p in raised.value.problems) == ["broken.yaml", "listed.yaml"]
    with pytest.raises(ProblemsError):
        load_valid_catalog(catalog_dir / "missing")


def test_an_unknown_id_names_itself_and_the_one_closest_known_id(catalog_dir: Path) -> None:
    write_entry(catalog_dir, "example-two")
    catalog = load_valid_catalog(catalog_dir)
    assert catalog.get("example").id == "example"
    with pytest.raises(KeyError) as raised:
        catalog.get("exampel")
    assert raised.value.args == ("no method 'exampel' in the catalog (did you mean 'example'?)",)
    assert unknown_id_message("zzz", ["example"]) == "no method 'zzz' in the catalog"
    assert unknown_id_message("examp", ["example", "example-two"]) == (
        "no method 'examp' in the catalog (did you mean 'example'?)"
    )


def test_problem_prints_as_path_line_field_message() -> None:
    assert str(Problem("catalog/x.yaml", 12, "cost.inference", "field required")) == (
        "catalog/x.yaml:12: cost.inference: field required"
    )


def test_invalid_yaml(catalog_dir: Path) -> None:
    text = valid_text().replace("name: Example", "name: [Example")
    write_entry(catalog_dir, text=text)
    problem = single(catalog_dir, "example.yaml")
    assert problem.field == "-"
    assert "invalid YAML" in problem.message
    assert problem.line >= line_of(text, "name: [Example")


def test_top_level_not_a_mapping(catalog_dir: Path) -> None:
    write_entry(catalog_dir, text="\n- id: example\n- name: x\n")
    problem = single(catalog_dir, "example.yaml")
    assert (problem.line, problem.field) == (2, "-")
    assert "top level must be a mapping, got a list" in problem.message


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_empty_file(catalog_dir: Path, text: str) -> None:
    write_entry(catalog_dir, text=text)
    problem = single(catalog_dir, "example.yaml")
    assert (problem.line, problem.field) == (1, "-")
    assert "empty" in problem.message


def test_not_utf8(catalog_dir: Path) -> None:
    path = write_entry(catalog_dir)
    data = valid_text().encode("utf-8").replace(b"Ada Lovelace", b"Ada Lovel\xe9ce")
    path.write_bytes(data)
    problem = single(catalog_dir, "example.yaml")
    assert (problem.line, problem.field) == (line_of(valid_text(), "Ada Lovelace"), "-")
    assert "not UTF-8" in problem.message


def test_missing_required_field(catalog_dir: Path) -> None:
    text = valid_text().replace("  level: low\n", "")
    write_entry(catalog_dir, text=text)
    problem = single(catalog_dir, "example.yaml")
    assert (problem.line, problem.field, problem.message) == (line_of(text, "cost:"), "cost.level", "field required")


def test_missing_top_level_field(catalog_dir: Path) -> None:
    text = valid_text().replace("mechanism: Fine-tunes nothing; it only exists to be validated.\n", "")
    write_entry(catalog_dir, text=text)
    problem = single(catalog_dir, "example.yaml")
    assert (problem.line, problem.field, problem.message) == (1, "mechanism", "field required")


def test_unknown_field_suggests_the_right_one(catalog_dir: Path) -> None:
    text = valid_text().replace("summary:", "sumary:")
    write_entry(catalog_dir, text=text)
    found = problems_in(catalog_dir, "example.yaml")
    unknown = next(p for p in found if p.field == "sumary")
    assert unknown.line == line_of(text, "sumary:")
    assert "unknown field (did you mean 'summary'?)" in unknown.message
    assert any(p.field == "summary" and p.message == "field required" for p in found)


def test_unknown_nested_field(catalog_dir: Path) -> None:
    text = valid_text().replace("  level: low", "  level: low\n  levle: high")
    write_entry(catalog_dir, text=text)
    problem = single(catalog_dir, "example.yaml")
    assert (problem.line, problem.field) == (line_of(text, "levle:"), "cost.levle")
    assert "did you mean 'level'?" in problem.message


def test_wrong_type(catalog_dir: Path) -> None:
    text = valid_text().replace("year: 2024", "year: twenty-twenty-four")
    write_entry(catalog_dir, text=text)
    problem = single(catalog_dir, "example.yaml")
    assert (problem.line, problem.field) == (line_of(text, "year:"), "year")
    assert "integer" in problem.message


def test_wrong_type_bool(catalog_dir: Path) -> None:
    text = valid_text().replace("  randomized: false", "  randomized: sometimes")
    write_entry(catalog_dir, text=text)
    problem = single(catalog_dir, "example.yaml")
    assert (problem.line, problem.field) == (line_of(text, "randomized:"), "assumptions.randomized")


def test_value_outside_enumeration(catalog_dir: Path) -> None:
    text = valid_text().replace("  level: low", "  level: huge")
    write_entry(catalog_dir, text=text)
    problem = single(catalog_dir, "example.yaml")
    assert (problem.line, problem.field) == (line_of(text, "level: huge"), "cost.level")
    assert "'none', 'low', 'medium' or 'high'" in problem.message


def test_family_of_another_paradigm(catalog_dir: Path) -> None:
    text = valid_text().replace("family: adversarial-fine-tuning", "family: counterattack")
    write_entry(catalog_dir, text=text)
    problem = single(catalog_dir, "example.yaml")
    assert (problem.line, problem.field) == (line_of(text, "family:"), "family")
    assert "belongs to paradigm 'training-free'" in problem.message


def test_unknown_family(catalog_dir: Path) -> None:
    text = valid_text().replace("family: adversarial-fine-tuning", "family: adversarial-fine-tunning")
    write_entry(catalog_dir, text=text)
    problem = single(catalog_dir, "example.yaml")
    assert problem.field == "family"
    assert "did you mean 'adversarial-fine-tuning'?" in problem.message


def test_file_in_folder_of_another_paradigm(catalog_dir: Path) -> None:
    (catalog_dir / "training-time" / "example.yaml").unlink()
    write_entry(catalog_dir, paradigm="training-free")
    problem = single(catalog_dir, "training-free/example.yaml")
    assert (problem.line, problem.field) == (line_of(valid_text(), "paradigm:"), "paradigm")
    assert "move it to catalog/training-time/" in problem.message


def test_id_differs_from_file_name(catalog_dir: Path) -> None:
    write_entry(catalog_dir, method_id="other", text=valid_text("another"))
    problem = single(catalog_dir, "other.yaml")
    assert (problem.line, problem.field) == (1, "id")
    assert "differs from the file name 'other'" in problem.message


def test_duplicate_id(catalog_dir: Path) -> None:
    write_entry(catalog_dir, method_id="copy", text=valid_text("example"))
    found = problems_in(catalog_dir, "copy.yaml")
    duplicate = next(p for p in found if "duplicate id" in p.message)
    assert (duplicate.line, duplicate.field) == (1, "id")
    assert "example.yaml" in duplicate.message


def test_malformed_arxiv_id(catalog_dir: Path) -> None:
    text = valid_text().replace("arxiv: 2401.00001", "arxiv: arXiv-2401")
    write_entry(catalog_dir, text=text)
    problem = single(catalog_dir, "example.yaml")
    assert (problem.line, problem.field) == (line_of(text, "arxiv:"), "links.arxiv")


@pytest.mark.parametrize(
    "bad",
    ["2212.7016", "2213.07016", "2200.07016", "1412.012345", "0612.0001", "2401.000001", "hep-th/9913001"],
)
def test_arxiv_ids_with_an_impossible_month_or_length(catalog_dir: Path, bad: str) -> None:
    text = valid_text().replace("arxiv: 2401.00001", f'arxiv: "{bad}"')
    write_entry(catalog_dir, text=text)
    problem = single(catalog_dir, "example.yaml")
    assert (problem.line, problem.field) == (line_of(text, "arxiv:"), "links.arxiv")


@pytest.mark.parametrize("good", ["2212.07016", "1501.00001", "0704.0001", "1412.7016", "hep-th/9912001"])
def test_well_formed_arxiv_ids(catalog_dir: Path, good: str) -> None:
    write_entry(catalog_dir, text=valid_text().replace("arxiv: 2401.00001", f'arxiv: "{good}"'))
    assert problems_in(catalog_dir, "example.yaml") == []


def test_malformed_url_and_doi(catalog_dir: Path) -> None:
    text = valid_text().replace("code: https://github.com/example/example", "code: github.com/x\n  doi: 11.2/x")
    write_entry(catalog_dir, text=text)
    fields = {(p.field, p.line) for p in problems_in(catalog_dir, "example.yaml")}
    assert fields == {("links.code", line_of(text, "code:")), ("links.doi", line_of(text, "doi:"))}


@pytest.mark.parametrize("value", ["150", "-1"])
def test_accuracy_outside_0_100(catalog_dir: Path, value: str) -> None:
    text = valid_text().replace("clean: 50.5", f"clean: {value}")
    write_entry(catalog_dir, text=text)
    problem = single(catalog_dir, "example.yaml")
    assert (problem.line, problem.field) == (line_of(text, "clean:"), "reported[0].clean")


def test_accuracy_as_string_is_rejected(catalog_dir: Path) -> None:
    text = valid_text().replace("clean: 50.5", 'clean: "50.5%"')
    write_entry(catalog_dir, text=text)
    problem = single(catalog_dir, "example.yaml")
    assert problem.field == "reported[0].clean"


@pytest.mark.parametrize("eps", ["four", "4/0", "-1/255", "true"])
def test_unparsable_epsilon(catalog_dir: Path, eps: str) -> None:
    text = valid_text().replace("    eps: 1/255", f"    eps: {eps}")
    write_entry(catalog_dir, text=text)
    problem = single(catalog_dir, "example.yaml")
    assert (problem.line, problem.field) == (line_of(text, f"eps: {eps}"), "reported[0].eps")


def test_epsilon_in_threat_model_list(catalog_dir: Path) -> None:
    text = valid_text().replace("eps: [1/255, 4/255]", "eps: [1/255, lots]")
    write_entry(catalog_dir, text=text)
    problem = single(catalog_dir, "example.yaml")
    assert (problem.line, problem.field) == (line_of(text, "lots"), "threat_model.eps[1]")


def test_related_id_that_does_not_exist(catalog_dir: Path) -> None:
    text = valid_text(related="[exampel-x, exmaple]")
    write_entry(catalog_dir, text=text)
    found = problems_in(catalog_dir, "example.yaml")
    assert [p.field for p in found] == ["related[0]", "related[1]"]
    assert all(p.line == line_of(text, "related:") for p in found)
    assert "did you mean 'example'?" in found[1].message


def test_related_must_link_both_ways(catalog_dir: Path) -> None:
    write_entry(catalog_dir, method_id="second", related="[example]")
    problem = single(catalog_dir, "second.yaml")
    assert problem.field == "related[0]"
    assert "does not list 'second' back" in problem.message
    write_entry(catalog_dir, related="[second]")
    assert load_catalog(catalog_dir)[1] == []


def test_missing_notebook(catalog_dir: Path) -> None:
    text = valid_text() + "reproduction:\n  notebook: notebooks/example.ipynb\n  status: planned\n"
    write_entry(catalog_dir, text=text)
    problem = single(catalog_dir, "example.yaml")
    assert (problem.line, problem.field) == (line_of(text, "notebook:"), "reproduction.notebook")
    assert "not found" in problem.message
    notebook = catalog_dir.parent / "notebooks" / "example.ipynb"
    notebook.parent.mkdir()
    notebook.write_text("{}")
    assert load_catalog(catalog_dir)[1] == []


def test_reproduced_status_needs_a_notebook(catalog_dir: Path) -> None:
    text = valid_text() + "reproduction:\n  status: reproduced\n"
    write_entry(catalog_dir, text=text)
    problem = single(catalog_dir, "example.yaml")
    assert (problem.line, problem.field) == (line_of(text, "reproduction:"), "reproduction")


def test_python_tags_are_rejected_never_executed(catalog_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    text = valid_text().replace("name: Example", f"name: !!python/object/apply:os.system ['touch {marker}']")
    write_entry(catalog_dir, text=text)
    problem = single(catalog_dir, "example.yaml")
    assert (problem.line, problem.field) == (line_of(text, "name:"), "name")
    assert "tag not allowed" in problem.message
    assert not marker.exists()


def test_duplicate_key(catalog_dir: Path) -> None:
    text = valid_text().replace("year: 2024", "year: 2024\nyear: 2023")
    write_entry(catalog_dir, text=text)
    problem = single(catalog_dir, "example.yaml")
    assert problem.line == line_of(text, "year: 2023")
    assert "duplicate key 'year'" in problem.message


def test_todo_placeholder_is_rejected(catalog_dir: Path) -> None:
    text = valid_text().replace("training: 2 epochs", "training: TODO")
    write_entry(catalog_dir, text=text)
    problem = single(catalog_dir, "example.yaml")
    assert (problem.line, problem.field) == (line_of(text, "training: TODO"), "cost.training")


def test_reported_needs_a_number(catalog_dir: Path) -> None:
    text = valid_text().replace("    clean: 50.5\n    robust: 30.25\n", "")
    write_entry(catalog_dir, text=text)
    problem = single(catalog_dir, "example.yaml")
    assert (problem.line, problem.field) == (line_of(text, "- setting:"), "reported[0]")


def test_stray_files_and_folders(catalog_dir: Path) -> None:
    (catalog_dir / "loose.yaml").write_text("id: loose\n")
    (catalog_dir / "post-hoc").mkdir()
    (catalog_dir / "training-time" / "notes.yml").write_text("x: 1\n")
    _, problems = load_catalog(catalog_dir)
    paths = {Path(p.path).name for p in problems}
    assert paths == {"loose.yaml", "post-hoc", "notes.yml"}


def test_all_problems_are_reported_not_just_the_first(catalog_dir: Path) -> None:
    write_entry(catalog_dir, method_id="bad-one", text=valid_text("bad-one").replace("year: 2024", "year: x"))
    write_entry(catalog_dir, method_id="bad-two", text="- a list\n")
    _, problems = load_catalog(catalog_dir)
    assert {Path(p.path).name for p in problems} == {"bad-one.yaml", "bad-two.yaml"}


def test_broken_taxonomy_is_reported(catalog_dir: Path) -> None:
    (catalog_dir / "taxonomy.yaml").write_text("paradigms:\n  - id: post-hoc\n    name: x\n")
    catalog, problems = load_catalog(catalog_dir)
    assert catalog is None
    assert any(p.path.endswith("taxonomy.yaml") and p.field == "paradigms[0].id" and p.line == 2 for p in problems)


def test_an_entry_says_why_it_has_no_reported_numbers(catalog_dir: Path) -> None:
    text = valid_text()
    start = text.index("reported:")
    end = text.index("sources:")
    without = text[:start] + "reported: []\n" + text[end:]
    write_entry(catalog_dir, text=without)
    problem = single(catalog_dir, "example.yaml")
    assert "not_reported_reason" in problem.message
    write_entry(catalog_dir, text=without.replace("reported: []\n", "reported: []\nnot_reported_reason: only plots\n"))
    assert problems_in(catalog_dir, "example.yaml") == []
    write_entry(catalog_dir, text=text.replace("sources:", "not_reported_reason: only plots\nsources:", 1))
    assert "keep one" in single(catalog_dir, "example.yaml").message


@pytest.mark.parametrize(
    ("line", "key"),
    [(1, "id"), (2, "name"), (3, "-"), (4, "norms"), (5, "eps"), (0, "-"), (6, "-"), (-1, "-")],
)
def test_the_key_written_on_a_line_is_found_from_the_first_line_to_the_last(line: int, key: str) -> None:
    from vlmdefense.catalog.yaml_source import _key_on_line

    text = "id: x\nname: y\n  # a comment\n  - norms: [linf]\n eps: 1"
    assert _key_on_line(text, line) == key


def test_a_number_in_a_text_field_keeps_its_source_text_and_the_document_is_untouched(catalog_dir: Path) -> None:
    from vlmdefense.catalog.yaml_source import load_yaml_mapping

    text = valid_text().replace("arxiv: 2401.00001", "arxiv: 2301.10210")  # YAML reads the float 2301.1021
    path = write_entry(catalog_dir, text=text)
    catalog, problems = load_catalog(catalog_dir)
    assert problems == [] and catalog is not None
    assert catalog.get("example").links.arxiv == "2301.10210"
    doc = load_yaml_mapping(path)
    assert doc.numbers_as_text[("links", "arxiv")] == "2301.10210" and ("name",) not in doc.numbers_as_text
    assert doc.with_text_at([("links", "arxiv"), ("year",)]) == {
        **doc.data,
        "year": "2024",
        "links": {**doc.data["links"], "arxiv": "2301.10210"},
    }
    assert doc.data["links"]["arxiv"] == 2301.1021 and doc.data["year"] == 2024  # the copy changed, not the data
    nested = doc.with_text_at([("reported", 0, "robust")])
    assert nested["reported"][0]["robust"] == "30.25" and doc.data["reported"][0]["robust"] == 30.25


def test_locations_print_as_fields_and_an_unlocated_problem_sits_on_line_one(tmp_path: Path) -> None:
    from vlmdefense.catalog.yaml_source import YamlDocument, format_loc, load_yaml_mapping

    assert format_loc(("reported", 2, "eps")) == "reported[2].eps" and format_loc(()) == "-"
    assert YamlDocument(tmp_path / "x.yaml", {}).line_of(("links", "arxiv")) == 1
    with pytest.raises(ProblemsError) as raised:
        load_yaml_mapping(tmp_path / "missing.yaml")
    assert [str(p) for p in raised.value.problems] == [
        f"{display_path(tmp_path / 'missing.yaml')}:1: -: cannot read file: No such file or directory"
    ]


def test_every_catalog_level_problem_reads_in_full(catalog_dir: Path) -> None:
    """What ``vlmdefense validate`` prints for each misplaced file, broken link and unknown name, line for line."""
    from vlmdefense.catalog.validation import load_taxonomy

    shown = display_path
    (catalog_dir / ".DS_Store").write_text("", encoding="utf-8")  # hidden files are not entries ...
    (catalog_dir / "training-time" / ".example.yaml.swp").write_text("", encoding="utf-8")
    (catalog_dir / "training-time" / "notes.txt").write_text("", encoding="utf-8")  # ... other files are named
    (catalog_dir / "stray.yaml").write_text("id: stray\n", encoding="utf-8")
    write_entry(catalog_dir, "lost", paradigm="training-tim")
    write_entry(catalog_dir, "selfish", related="[selfish]")
    write_entry(catalog_dir, "one-way", related="[example]")
    odd = valid_text("odd").replace("family: adversarial-fine-tuning", "family: zzz")
    write_entry(catalog_dir, "odd", text=odd)
    for folder in ("training-free", "test-time-adaptation", "training-time"):
        write_entry(catalog_dir, "twin", paradigm=folder, text=valid_text("twin"))
    catalog, problems = load_catalog(catalog_dir)
    assert catalog is not None and catalog.root == catalog_dir and catalog.taxonomy == load_taxonomy(catalog_dir)
    assert "example" in catalog.items and "one-way" in catalog.items  # the catalog goes on after each problem
    text = valid_text("one-way", related="[example]")
    families = ", ".join(catalog.taxonomy.families_of("training-time"))
    twins = [
        catalog_dir / folder / "twin.yaml" for folder in ("test-time-adaptation", "training-free", "training-time")
    ]
    expected = {
        f"{shown(catalog_dir / 'stray.yaml')}:1: -: entries belong in a paradigm folder: catalog/<paradigm>/<id>.yaml",
        f"{shown(catalog_dir / 'training-tim')}:1: -: unknown paradigm folder (expected one of: "
        "test-time-adaptation, training-free, training-time)",
        f"{shown(catalog_dir / 'training-time' / 'notes.txt')}:1: -: not a catalog entry: entries end in .yaml",
        f"{shown(catalog_dir / 'training-time' / 'selfish.yaml')}:{line_of(text, 'related:')}: related[0]: "
        "an entry cannot be related to itself",
        f"{shown(catalog_dir / 'training-time' / 'one-way.yaml')}:{line_of(text, 'related:')}: related[0]: "
        "'example' does not list 'one-way' back under related (related entries are linked both ways)",
        f"{shown(catalog_dir / 'training-time' / 'odd.yaml')}:{line_of(odd, 'family:')}: family: "
        f"unknown family 'zzz' (one of: {families})",
        f"{shown(twins[0])}:1: id: duplicate id 'twin' (also in {shown(twins[1])}, {shown(twins[2])})",
        f"{shown(twins[2])}:1: id: duplicate id 'twin' (also in {shown(twins[0])}, {shown(twins[1])})",
    }
    printed = {str(p) for p in problems}
    assert expected <= printed, sorted(expected - printed)
    assert not any(".DS_Store" in line or ".swp" in line for line in printed)


def test_a_missing_catalog_or_taxonomy_is_named(tmp_path: Path) -> None:
    from vlmdefense.catalog.validation import load_taxonomy

    assert [str(p) for p in load_catalog(tmp_path / "none")[1]] == [
        f"{display_path(tmp_path / 'none')}:1: -: catalog directory not found"
    ]
    with pytest.raises(ProblemsError) as raised:
        load_taxonomy(tmp_path)
    assert [str(p) for p in raised.value.problems] == [
        f"{display_path(tmp_path / 'taxonomy.yaml')}:1: -: taxonomy file not found"
    ]


def test_the_survey_is_checked_against_the_catalog_s_taxonomy(catalog_dir: Path) -> None:
    from conftest import REPO

    text = (REPO / "catalog" / "survey.yaml").read_text(encoding="utf-8")
    moved = text.replace("      - adversarial-fine-tuning\n", "      - test-time-prompt-tuning\n", 1)
    (catalog_dir / "survey.yaml").write_text(moved, encoding="utf-8")
    _, problems = load_catalog(catalog_dir)
    line = line_of(moved, "      - test-time-prompt-tuning")
    assert [str(p) for p in problems] == [
        f"{display_path(catalog_dir / 'survey.yaml')}:{line}: paradigms[0].our_families[0]: "
        "family 'test-time-prompt-tuning' is not in paradigm 'training-time' of the taxonomy"
    ]


def test_validation_logs_what_it_read_at_debug_level(catalog_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_entry(catalog_dir, "second")
    (catalog_dir / "stray.txt").write_text("", encoding="utf-8")
    with caplog.at_level("DEBUG", logger="vlmdefense.catalog.validation"):
        load_catalog(catalog_dir)
    assert caplog.messages == ["validated 2 files, 1 problems"]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("", 1, "file is empty: expected a YAML mapping"),
        ("null\n", 1, "file is empty: expected a YAML mapping"),  # a document that is only null
        ("\n\n- a\n- b\n", 3, "top level must be a mapping, got a list"),
        ("just words\n", 1, "top level must be a mapping, got a str"),
        ("\n42\n", 2, "top level must be a mapping, got a int"),
        ("id: a\nyear: 1\nyear: 2\n", 3, "invalid YAML: duplicate key 'year'"),
    ],
)
def test_a_file_that_is_not_a_mapping_reads_in_full(tmp_path: Path, text: str, line: int, message: str) -> None:
    from vlmdefense.catalog.yaml_source import load_yaml_mapping

    path = tmp_path / "entry.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ProblemsError) as raised:
        load_yaml_mapping(path)
    assert [str(p) for p in raised.value.problems] == [f"{display_path(path)}:{line}: -: {message}"]


@pytest.mark.xfail(
    strict=True,
    raises=yaml.reader.ReaderError,
    reason="known defect: the YAML reader refuses control characters while the loader is built, before the try "
    "that turns YAML errors into problems; the fix edits a module in every record's code closure, so it waits "
    "for the next full rerun of the records",
)
def test_a_character_yaml_cannot_read_is_reported_on_line_one(tmp_path: Path) -> None:
    from vlmdefense.catalog.yaml_source import load_yaml_mapping

    path = tmp_path / "entry.yaml"
    path.write_text("id: a\x07b\n", encoding="utf-8")  # a bell character: PyYAML's reader refuses it
    with pytest.raises(ProblemsError) as raised:
        load_yaml_mapping(path)
    (problem,) = raised.value.problems
    assert str(problem).startswith(f"{display_path(path)}:1: -: invalid YAML: unacceptable character #x0007")
