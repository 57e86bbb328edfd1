"""The detection section of a method page: rendered from a record's detection sections, escaped, placed before
the Limitations, and absent for records without one."""

from __future__ import annotations

from conftest import REPO
from detection_helpers import detection_section as section
from vlmdefense.runs.detection import DetectionSection
from vlmdefense.runs.records import Result, read_result, result_path
from vlmdefense.site.detection import detection_markdown, with_detection


def record(detection: dict[str, DetectionSection]) -> Result:
    base = read_result(result_path(REPO, "baseline", "smoke"))
    return base.model_copy(update={"detection": detection})


def test_section_shows_the_numbers_and_escapes_text() -> None:
    result = record({"deployed": section("<b>joint</b>")})
    text = detection_markdown([("smoke", result)])
    assert text.startswith("## Detection") and "### Detection (smoke)" in text
    assert "0.460" in text and "0.59" in text and "78.3 %" in text and "| 20.7 | 80.0 | 20.0 |" in text
    assert "<b>" not in text


def test_section_goes_before_the_limitations_and_only_when_present() -> None:
    page = "# X\n\n## Reproduced here\n\nrows\n\n## Limitations\n\n- one\n"
    result = record({"deployed": section(), "stochastic": section()})
    out = with_detection(page, [("smoke", result)])
    assert out.index("## Detection") < out.index("## Limitations") and out.index("## Reproduced here") < out.index(
        "## Detection"
    )
    assert "stochastic variant" in out
    assert with_detection(page, [("smoke", record({}))]) == page
