"""The mutation score report of ``make mutation``: counts per module, explained survivors, stale verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mutation_score import report, score


def write_run(tree: Path, codes: dict[str, int | None]) -> None:
    meta = tree / "mutants" / "src" / "pkg" / "mod.py.meta"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"exit_code_by_key": codes}), encoding="utf-8")


def test_the_score_counts_timeouts_as_detected_and_survivors_and_untested_against() -> None:
    from collections import Counter

    assert score(Counter({"killed": 6, "timeout": 2, "survived": 1, "no tests": 1, "skipped": 5})) == 80.0
    assert score(Counter({"skipped": 3})) is None


def test_a_run_passes_only_when_every_survivor_is_explained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path, {"pkg.mod.f__mutmut_1": 1, "pkg.mod.f__mutmut_2": 0, "pkg.mod.f__mutmut_3": 36})
    verdicts = tmp_path / "verdicts.yaml"
    verdicts.write_text("pkg.mod.f__mutmut_9: gone\n", encoding="utf-8")
    assert report(tmp_path, True, verdicts) == 1
    out = capsys.readouterr().out
    assert "src/pkg/mod.py" in out and "66.7 %" in out
    assert "survived: pkg.mod.f__mutmut_2" in out and "stale verdict: pkg.mod.f__mutmut_9" in out
    verdicts.write_text("pkg.mod.f__mutmut_2: only the progress label changes\n", encoding="utf-8")
    assert report(tmp_path, True, verdicts) == 0
    assert "0 unexplained survivors, 0 mutants not checked, 0 stale verdicts" in capsys.readouterr().out


def test_unchecked_mutants_and_empty_reasons_fail(tmp_path: Path) -> None:
    write_run(tmp_path, {"pkg.mod.f__mutmut_1": None})
    verdicts = tmp_path / "verdicts.yaml"
    assert report(tmp_path, False, verdicts) == 1
    verdicts.write_text("pkg.mod.f__mutmut_1: ''\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="non-empty reason"):
        report(tmp_path, False, verdicts)
