"""The zero-shot suite and checkpoint evaluation, on local files only: tiny datasets in three formats that
clip_benchmark reads (an ImageFolder tree as ImageNet-R ships, torchvision's EuroSAT and DTD layouts) and a small
CLIP with random weights saved to disk, through the same code path a GPU user runs (``vlmdefense evaluate``)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from conftest import REPO
from vlmdefense.cli import app
from vlmdefense.runs.checkpoint_records import checkpoint_result_path, read_checkpoint_result
from vlmdefense.workbench.checkpoint_eval import CheckpointSpec, evaluate_checkpoint, load_visual_weights
from vlmdefense.workbench.evaluation import split_accuracy
from vlmdefense.workbench.models import SMALL_CLIP, load_clip, register_small_clip
from vlmdefense.workbench.suite import SuiteSpec, load_suite_dataset, sample_indices

PROFILE = {
    "device": "cpu",
    "model": {"name": SMALL_CLIP, "pretrained": None},
    "suite": {"datasets": ["dtd", "eurosat"], "n_per_dataset": 6, "split": "test", "data_root": "data"},
    "eps": ["4/255", "8/255"],
    "headline_eps": "8/255",
    "attacks": [{"name": "apgd-ce", "steps": 2}, {"name": "apgd-t", "steps": 2}],
    "sweep_attack": {"name": "apgd-ce", "steps": 2},
    "batch_size": 16,
    "seed": 0,
    "audit": {"checks": ["eps-zero", "monotonic", "gradients"]},
}


def _write_images(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.jpg")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with the catalog, a suite profile and two tiny datasets under data/."""
    root = tmp_path_factory.mktemp("suite") / "repo"
    (root / "reproductions").mkdir(parents=True)
    shutil.copytree(REPO / "catalog", root / "catalog")
    (root / "reproductions" / "profiles.yaml").write_text(yaml.safe_dump({"tiny": PROFILE, "smoke": {"device": "cpu"}}))
    for i, wnid in enumerate(("n01443537", "n01484850", "n01494475")):  # the first ImageNet-R classes
        _write_images(root / "data" / "imagenet-r" / wnid, 4, seed=i)
    for i, name in enumerate(("AnnualCrop", "Forest", "River")):
        _write_images(root / "data" / "eurosat" / "eurosat" / "2750" / name, 3, seed=10 + i)
    textures = root / "data" / "dtd" / "dtd" / "dtd"  # torchvision reads <root>/dtd/dtd; the root is data/dtd
    for i, name in enumerate(("banded", "blotchy", "braided")):
        _write_images(textures / "images" / name, 3, seed=20 + i)
    (textures / "labels").mkdir()
    listed = [f"{name}/{k}.jpg" for name in ("banded", "blotchy", "braided") for k in range(3)]
    (textures / "labels" / "test1.txt").write_text("\n".join(listed[:8]) + "\n")  # one image left out of the split
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CLIP with random weights, as a local open_clip checkpoint file."""
    import open_clip

    register_small_clip()
    torch.manual_seed(0)
    model = open_clip.create_model(SMALL_CLIP, pretrained=None)
    path = tmp_path_factory.mktemp("weights") / "random-small-clip.pt"
    torch.save(model.state_dict(), path)
    return path


def test_sample_is_seeded_distinct_and_sorted() -> None:
    first = sample_indices(100, 10, seed=3)
    assert first == sample_indices(100, 10, seed=3)
    assert first != sample_indices(100, 10, seed=4)
    assert len(set(first)) == 10 and first == sorted(first) and max(first) < 100
    assert sample_indices(5, None, 0) == sample_indices(5, 8, 0) == [0, 1, 2, 3, 4]


def test_suite_datasets_load_with_clip_benchmark_names_and_templates(repo: Path) -> None:
    spec = SuiteSpec.from_params(PROFILE, repo)
    rendition = load_suite_dataset("imagenet-r", spec, image_size=16)
    assert rendition.size == 12 and len(rendition.images) == 6
    assert len(rendition.prompts.classnames) == 200  # clip_benchmark's ImageNet-R class names
    assert rendition.prompts.classnames[0] == "goldfish"
    assert all("{name}" in t for t in rendition.prompts.templates) and len(rendition.prompts.templates) > 1
    assert rendition.images.images.shape[1:] == (3, 16, 16)
    assert float(rendition.images.images.min()) >= 0.0 and float(rendition.images.images.max()) <= 1.0
    satellite = load_suite_dataset("eurosat", spec, image_size=16)
    assert satellite.size == 9 and len(satellite.prompts.classnames) == 10
    assert sorted(set(satellite.images.labels.tolist())) == [0, 1, 2]
    textures = load_suite_dataset("dtd", spec, image_size=16)
    assert textures.size == 8  # the split file lists 8 of the 9 images
    assert textures.prompts.classnames == ("banded", "blotchy", "braided")  # DTD names its classes by folder


def test_missing_dataset_names_its_folder(repo: Path) -> None:
    spec = SuiteSpec.from_params({**PROFILE, "suite": {"datasets": ["pets"]}}, repo)
    with pytest.raises(FileNotFoundError, match=r"'pets' not found: expected it under .*data/pets"):
        load_suite_dataset("pets", spec, image_size=16)
    with pytest.raises(ValueError, match="no zero-shot suite"):
        SuiteSpec.from_params({"eps": ["1/255"]}, repo)


def test_no_seen_classes_means_no_seen_or_unseen_split() -> None:
    correct = torch.tensor([True, False, True, True])
    labels = torch.tensor([0, 1, 2, 3])
    suite = split_accuracy(correct, labels, ())
    assert suite.all == 75.0 and suite.seen is None and suite.unseen is None
    only_seen = split_accuracy(correct, labels, (0, 1, 2, 3))
    assert only_seen.seen == 75.0 and only_seen.unseen is None  # absent, never NaN


def test_visual_weights_load_with_any_prefix(tmp_path: Path, weights: Path) -> None:
    clip = load_clip(SMALL_CLIP, weights, device="cpu")
    other = load_clip(SMALL_CLIP, weights, device="cpu")
    for p in other.model.visual.parameters():
        torch.nn.init.normal_(p)
    path = tmp_path / "visual.pt"
    torch.save({"state_dict": {f"module.visual.{k}": v for k, v in other.model.visual.state_dict().items()}}, path)
    load_visual_weights(clip, path)
    for (name, a), b in zip(
        clip.model.visual.state_dict().items(), other.model.visual.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    bad = tmp_path / "bad.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(RuntimeError):
        load_visual_weights(clip, bad)


@pytest.mark.slow
def test_evaluate_command_writes_a_checkpoint_record(
    repo: Path, weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(repo)
    outcome = CliRunner().invoke(
        app, ["evaluate", "--model", SMALL_CLIP, "--pretrained", str(weights), "--profile", "tiny", "--slug", "mine"]
    )
    assert outcome.exit_code == 0, outcome.output
    path = checkpoint_result_path(repo, "mine", "tiny")
    text = path.read_text()
    assert str(weights.parent) not in text and str(repo) not in text  # file names only, never machine paths
    result = read_checkpoint_result(path)
    assert result.weights.pretrained == weights.name
    assert result.weights.sha256 == {weights.name: hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert [d.dataset for d in result.datasets] == ["dtd", "eurosat"]
    for score in result.datasets:
        assert score.images == 6 and set(score.worst) == {"4/255", "8/255"}
        assert score.clean is not None
        for budget, worst in score.worst.items():
            at = [r.acc.all for r in score.robust if r.eps.display == budget]
            assert worst is not None and worst == min(at) <= score.clean  # the worst case over every attack
        assert any("APGD-T-2" in r.attack for r in score.robust if r.eps.display == "8/255")
        assert all(r.acc.seen is None and r.acc.unseen is None for r in score.robust)
        assert score.audit is not None and {c.id for c in score.audit.checks if c.status.value != "skip"} == {
            "eps-zero",
            "monotonic",
            "gradients",
        }
    for average in result.averages:
        values = [d.worst[average.eps.display] for d in result.datasets]
        assert average.robust == round(sum(v for v in values if v is not None) / len(values), 2)
    assert result.provenance.git_commit is None  # the temporary repository is not a git checkout


def test_evaluate_rejects_a_profile_without_a_suite(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(repo)
    outcome = CliRunner().invoke(app, ["evaluate", "--model", SMALL_CLIP, "--profile", "smoke"])
    assert outcome.exit_code == 2 and "has no zero-shot suite" in outcome.output


def test_catalog_checkpoint_is_recognised(repo: Path, weights: Path) -> None:
    from vlmdefense.workbench.checkpoint_eval import matching_entry

    entry, reported = matching_entry(repo, CheckpointSpec("hf-hub:chs20/fare2-clip"))
    assert entry == "fare" and reported
    assert matching_entry(repo, CheckpointSpec(SMALL_CLIP, str(weights))) == (None, [])


def test_record_is_json_with_the_profile_parameters(repo: Path, weights: Path) -> None:
    result = evaluate_checkpoint(
        CheckpointSpec(SMALL_CLIP, str(weights)),
        "tiny",
        "direct",
        repo,
        overrides={"suite": {"datasets": ["eurosat"]}, "eps": ["8/255"], "audit": False},
    )
    data = json.loads(result.model_dump_json())
    assert data["parameters"]["suite"]["datasets"] == ["eurosat"] and data["kind"] == "checkpoint"
    assert [d["dataset"] for d in data["datasets"]] == ["eurosat"] and data["datasets"][0]["audit"] is None


def test_notebooks_do_not_run_under_a_suite_and_status_leaves_suites_out() -> None:
    from vlmdefense.runs.profiles import load_profiles, notebook_profiles
    from vlmdefense.runs.runner import run_one

    outcome = run_one(REPO, "baseline", "zeroshot", progress=False)
    assert outcome.state == "failed" and "use vlmdefense evaluate" in outcome.message
    suites = set(load_profiles(REPO)) - set(notebook_profiles(REPO))
    assert suites == {"zeroshot", "zeroshot-tecoa", "zeroshot-quick"}
