"""Every number a notebook's Findings section states comes from the result record: the section is a code cell
that renders Markdown from ``result`` and ``baseline`` alone, and it renders from the committed records."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from conftest import REPO
from vlmdefense.catalog.validation import load_valid_catalog
from vlmdefense.runs.records import read_result, result_path
from vlmdefense.runs.staleness import available_methods
from vlmdefense.workbench import prose

HEADING = "## Findings"
# The notebooks whose smoke record is committed (a notebook without a record yet has no Findings to render).
METHODS = [m for m in available_methods(REPO) if m != "baseline" and result_path(REPO, m, "smoke").is_file()]


def findings_cells(notebook: Path) -> tuple[list[str], list[str]]:
    """(code cells that render the Findings, Markdown cells that state them by hand)."""
    nb = nbformat.read(str(notebook), as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code" and HEADING in c.source]
    markdown = [c.source for c in nb.cells if c.cell_type == "markdown" and c.source.lstrip().startswith(HEADING)]
    return code, markdown


def render(source: str, monkeypatch: pytest.MonkeyPatch, method: str) -> str:
    shown: list[str] = []
    monkeypatch.setattr(prose, "show", shown.append)
    namespace = {
        "result": read_result(result_path(REPO, method, "smoke")),
        "baseline": read_result(result_path(REPO, "baseline", "smoke")),
    }
    exec(compile(source, f"notebooks/{method}.ipynb (Findings)", "exec"), namespace)
    return "\n".join(shown)


@pytest.mark.parametrize("method", METHODS)
def test_findings_are_rendered_from_the_record(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    code, markdown = findings_cells(REPO / "notebooks" / f"{method}.ipynb")
    assert markdown == [], "Findings stated by hand in Markdown: render them from the record (workbench.prose)"
    assert len(code) == 1
    text = render(code[0], monkeypatch, method)
    assert text.lstrip().startswith(HEADING)
    assert "n/a" not in text, "a look-up found no number in the committed smoke record"


def test_the_template_shows_the_pattern() -> None:
    code, markdown = findings_cells(REPO / "notebooks" / "_template.ipynb")
    assert markdown == [] and len(code) == 1 and "Numbers(result)" in code[0]


def test_detection_records_hold_their_detection_section() -> None:
    """A detector's smoke record carries its detection metrics in the schema's ``detection`` field (transfer and
    joint adaptive rows at the headline ε); no other record does."""
    families = {e.id: e.family for e in load_valid_catalog(REPO / "catalog").entries}
    for method in METHODS:
        result = read_result(result_path(REPO, method, "smoke"))
        if families.get(method) != "detection":
            assert result.detection == {}, method
            continue
        section = result.detection.get("deployed")
        assert section is not None, f"{method}: no detection section in its smoke record"
        assert result.headline is not None
        h = result.headline.eps.display
        for adaptive in (False, True):
            row = section.row("", h, adaptive)
            assert row is not None and row.attacked_images == section.clean_images, (method, adaptive)
