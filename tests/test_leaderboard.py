"""The leaderboard page: checkpoint records ranked per suite profile and ε, flags shown, the paper's numbers for
the same weights beside ours with the difference; an invalid checkpoint record fails the build."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import REPO
from vlmdefense.runs.checkpoint_records import (
    CheckpointResult,
    DatasetScore,
    Weights,
    checkpoint_result_path,
)
from vlmdefense.runs.provenance import provenance
from vlmdefense.runs.records import Audit, AuditCheck, AuditStatus, RunStatus
from vlmdefense.site import build as site
from vlmdefense.site.data import SiteError
from vlmdefense.site.leaderboard import same_dataset
from vlmdefense.units import Epsilon
from vlmdefense.workbench.checkpoint_eval import CheckpointSpec, matching_entry, suite_averages

EPS = [Epsilon.parse("2/255"), Epsilon.parse("4/255")]


def record(root: Path, slug: str, model: str, worst: dict[str, tuple[float, float]], flag: bool = False) -> Path:
    """A checkpoint record with the given (2/255, 4/255) worst cases per dataset, written where it belongs."""
    checks = [AuditCheck(id="eps-zero", title="t", status=AuditStatus.FLAG if flag else AuditStatus.PASS, detail="d")]
    scores = [
        DatasetScore(
            dataset=name,
            images=100,
            split_size=1000,
            classes=10,
            clean=80.0,
            worst={"2/255": low, "4/255": lower},
            audit=Audit(checks=checks, images=100, tolerance="none"),
        )
        for name, (low, lower) in worst.items()
    ]
    entry, reported = matching_entry(root, CheckpointSpec(model))
    result = CheckpointResult(
        slug=slug,
        profile="zeroshot",
        status=RunStatus.OK,
        weights=Weights(model=model, catalog_entry=entry),
        datasets=scores,
        averages=suite_averages(scores, EPS),
        headline_eps=EPS[0],
        reported=reported,
        provenance=provenance(root, "cpu", 0, "2026-01-01T00:00:00+00:00", 1.0, None),
    )
    path = checkpoint_result_path(root, slug, "zeroshot")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(result.model_dump_json(indent=2))
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(REPO / "catalog", root / "catalog")
    shutil.copytree(REPO / "notebooks", root / "notebooks")
    (root / "reproductions").mkdir()
    shutil.copy(REPO / "reproductions" / "profiles.yaml", root / "reproductions" / "profiles.yaml")
    return root


def test_averages_weigh_each_dataset_the_same() -> None:
    scores = [
        DatasetScore(dataset="a", images=10, split_size=10, classes=2, clean=90.0, worst={"2/255": 40.0}),
        DatasetScore(dataset="b", images=1000, split_size=1000, classes=2, clean=70.0, worst={"2/255": 10.0}),
        DatasetScore(dataset="c", images=0, split_size=0, classes=2, clean=None, worst={"2/255": None}),
    ]
    (average,) = suite_averages(scores, EPS[:1])
    assert (average.clean, average.robust, average.datasets) == (80.0, 25.0, 2)


def test_dataset_names_match_the_papers_spelling() -> None:
    assert same_dataset("cifar10", "CIFAR-10") and same_dataset("cars", "Stanford Cars")
    assert same_dataset("pets", "Oxford Pets") and same_dataset("imagenet-r", "ImageNet-R")
    assert not same_dataset("cifar10", "CIFAR-100") and not same_dataset("cars", "FGVC Aircraft")


def test_leaderboard_ranks_flags_and_compares_with_the_paper(root: Path, tmp_path: Path) -> None:
    record(root, "weak", "ViT-B-32", {"cifar10": (10.0, 2.0), "stl10": (20.0, 4.0)}, flag=True)
    record(root, "fare2", "hf-hub:chs20/fare2-clip", {"cifar10": (50.0, 30.0), "stl10": (40.0, 20.0)})
    generated = site.generate(root, tmp_path / "docs")
    assert "leaderboard.md" in generated.files and "Leaderboard" in str(generated.nav)
    page = (tmp_path / "docs" / "leaderboard.md").read_text()
    first = page.index("## zeroshot at ε = 2/255")
    second = page.index("## zeroshot at ε = 4/255")
    ranked = page[first:second]
    assert ranked.index("chs20/fare2-clip") < ranked.index("ViT-B-32")  # 45.0 average before 15.0
    assert "| 1 | <code>hf-hub:chs20/fare2-clip</code>" in ranked and "45.0" in ranked and "15.0" in ranked
    assert "cifar10: eps-zero, stl10: eps-zero" in ranked  # the weak model's flags
    assert "[fare](methods/fare.md)" in ranked
    beside = page[page.index("## Beside the papers") :]
    # FARE^2's README average at 2/255 (clean 67.0, robust 43.1) beside our average (80.0, 45.0): +1.9
    assert "| fare2 | zeroshot | average of the zero-shot datasets" in beside
    assert "43.1" in beside and "45.0" in beside and "+1.9" in beside
    assert "FARE^4" not in beside  # the other checkpoint's rows are not these weights'


def test_an_empty_leaderboard_says_how_to_fill_it(root: Path, tmp_path: Path) -> None:
    site.generate(root, tmp_path / "docs")
    page = (tmp_path / "docs" / "leaderboard.md").read_text()
    assert "No checkpoint has been evaluated yet" in page and "vlmdefense evaluate --model" in page


def test_an_invalid_checkpoint_record_fails_the_build(root: Path, tmp_path: Path) -> None:
    path = record(root, "fare2", "hf-hub:chs20/fare2-clip", {"cifar10": (50.0, 30.0)})
    path.write_text(path.read_text().replace('"clean": 80.0', '"clean": 180.0', 1))
    with pytest.raises(SiteError, match=r"checkpoints/fare2/zeroshot/result.json"):
        site.generate(root, tmp_path / "docs")


def test_reported_as_must_name_a_reported_model(root: Path) -> None:
    from vlmdefense.catalog.validation import load_catalog

    path = root / "catalog" / "training-time" / "fare.yaml"
    path.write_text(path.read_text().replace("reported_as: CLIP ViT-L/14 FARE^2", "reported_as: FARE^3", 1))
    _, problems = load_catalog(root / "catalog")
    assert any(
        "fare.yaml" in str(p) and "reported_as 'FARE^3' is not the model of any reported row" in str(p)
        for p in problems
    )
