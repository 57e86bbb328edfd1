"""The notebook-facing harness: the paper profile's code path on local files, and result checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO
from vlmdefense.defenses import create_defense
from vlmdefense.defenses.base import Defense
from vlmdefense.defenses.fit_data import FitData
from vlmdefense.paths import ROOT_ENV, find_root
from vlmdefense.runs.records import check_result_file
from vlmdefense.workbench import harness
from vlmdefense.workbench.models import ensure_small_clip


def local_paper_like_repo(tmp_path: Path) -> Path:
    """A repository whose profile reads a local checkpoint and a local image folder, as `paper` does."""
    root = tmp_path / "repo"
    (root / "reproductions").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("circle", "square"):
        folder = root / "data" / "shapes" / name
        folder.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    profile = {
        "local": {
            "device": "cpu",
            "model": {"name": "vlmd-small-clip", "pretrained": str(ensure_small_clip())},
            "dataset": "shapes",
            "transfer": None,
            "train_dataset": "shapes",
            "n_train": 8,
            "data_root": "data",
            "n_test": 8,
            "eps": ["1/255", "4/255"],
            "headline_eps": "4/255",
            "attacks": [{"name": "pgd", "steps": 2}, {"name": "apgd", "steps": 2}],
            "sweep_attack": {"name": "pgd", "steps": 2},
            "templates": ["a photo of a {name}.", "a drawing of a {name}."],
            "seen_classes": [0],
            "batch_size": 8,
            "seed": 0,
        }
    }
    (root / "reproductions" / "profiles.yaml").write_text(yaml.safe_dump(profile))
    return root


def test_local_checkpoint_and_image_folder_through_the_paper_code_path(tmp_path: Path) -> None:
    root = local_paper_like_repo(tmp_path)
    ctx = harness.setup("baseline", "local", root=root)
    assert ctx.clip.pretrained == str(ensure_small_clip())
    assert len(ctx.sets.test) == 8 and ctx.sets.transfer is None
    assert ctx.prompts.classnames == ("circle", "square")
    assert ctx.train is not None and len(ctx.seen_train) == 4 and set(ctx.seen_train.labels.tolist()) == {0}
    result = harness.evaluate(ctx, harness.fit(ctx, create_defense("baseline", **ctx.params)))
    assert result.clean is not None and result.clean.transfer is None
    assert [r.attack for r in result.robust] == ["PGD-2", "PGD-2", "worst(PGD-2, APGD-CE-2)"]
    target = root / "reproductions" / "baseline" / "local" / "result.json"
    harness.save_result(result, target)
    assert check_result_file(target, {"baseline"}, {"local"}) == []

    data = ctx.fit_data()  # what a defense fits on: no harness, only the seen classes' training images
    assert data.base is ctx.base and data.params is ctx.params and data.headline == ctx.headline
    assert data.train is not None and torch.equal(data.train.labels, ctx.seen_train.labels)

    class Recording(Defense):
        def fit(self, data: FitData) -> dict[str, Any]:
            return {"seen_train_images": len(data.seen_train)}

    harness.fit(ctx, Recording())
    assert ctx.findings["seen_train_images"] == 4, "fit stores the returned findings in ctx.findings"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_paper_profile_refuses_to_run_without_a_gpu() -> None:
    with pytest.raises(RuntimeError, match="needs a GPU"):
        harness.setup("baseline", "paper", root=REPO)


def test_a_test_split_of_seen_classes_only_records_unseen_as_absent(tmp_path: Path) -> None:
    """The first four interleaved test digits are all seen classes: unseen and transfer are absent, the record
    validates and is written (an empty split never becomes NaN)."""
    ctx = harness.setup("baseline", "quick", {"n_test": 4, "n_transfer": 0, "audit": False}, root=REPO)
    assert set(ctx.sets.test.labels.tolist()) <= set(ctx.prompts.seen_classes)
    result = harness.evaluate(ctx, harness.fit(ctx, create_defense("baseline", **ctx.params)))
    assert result.clean is not None and result.clean.unseen is None and result.clean.seen == result.clean.all
    assert all(row.acc.unseen is None and row.acc.transfer is None for row in result.robust)
    path = harness.save_result(result, tmp_path / "baseline" / "quick" / "result.json")
    assert path is not None and check_result_file(path) == []


def test_unknown_profile(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown profile 'nope'"):
        harness.setup("baseline", "nope", root=REPO)


def test_find_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ROOT_ENV, raising=False)
    assert find_root(REPO / "src" / "vlmdefense") == REPO
    with pytest.raises(FileNotFoundError):
        find_root(tmp_path)
    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    assert find_root() == tmp_path.resolve()


def test_save_result_with_empty_path_writes_nothing(tmp_path: Path) -> None:
    assert harness.save_result(None, "") is None  # type: ignore[arg-type]


def write(path: Path, payload: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) if not isinstance(payload, str) else payload)
    return path


def baseline_record() -> dict:
    return json.loads((REPO / "reproductions" / "baseline" / "smoke" / "result.json").read_text())


def test_result_checks(tmp_path: Path) -> None:
    good = write(tmp_path / "baseline" / "smoke" / "result.json", baseline_record())
    assert check_result_file(good, {"baseline"}, {"smoke"}) == []
    bad_json = write(tmp_path / "baseline" / "smoke" / "x" / "result.json", '{\n  "method": "baseline",\n  oops\n}')
    (problem,) = check_result_file(bad_json)
    assert problem.line == 3 and "invalid JSON" in problem.message
    record = baseline_record()
    del record["provenance"]
    record["clean"]["all"] = 120
    problems = check_result_file(write(tmp_path / "baseline" / "smoke" / "result.json", record))
    assert [p.field for p in problems] == ["clean.all"]
    record = baseline_record()
    del record["provenance"]
    problems = check_result_file(write(tmp_path / "baseline" / "smoke" / "result.json", record))
    assert [p.field for p in problems] == ["provenance"]
    problems = check_result_file(
        write(tmp_path / "other" / "paper" / "result.json", baseline_record()), {"tecoa"}, {"smoke"}
    )
    assert {p.field for p in problems} == {"method"}
    assert any("unknown method 'baseline'" in p.message for p in problems)
    assert any("belongs in reproductions/baseline/smoke" in p.message for p in problems)
