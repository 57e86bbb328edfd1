"""Plays the contributor: new → fill the YAML and the notebook → validate → run → site build → check.

Runs in a temporary copy of the repository and fails if any step of the flow breaks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pytest
from typer.testing import CliRunner

from conftest import REPO
from vlmdefense.cli import app

FAST = [
    "-p",
    "n_test=40",
    "-p",
    "n_transfer=20",
    "-p",
    "eps=[8/255]",
    "-p",
    "fast=true",
    "-p",
    "attacks=[{name: pgd, steps: 2}]",
    "-p",
    "sweep_attack={name: pgd, steps: 2}",
    "-p",
    "batch_size=64",
]

ENTRY = """\
id: blur-purifier
name: BlurPurifier
title: A Box Blur in Front of CLIP, for Testing the Contributor Flow
authors: [Grace Hopper]
year: 2025
venue: arXiv
links:
  arxiv: "2501.00010"
paradigm: training-free
family: input-purification
summary: Averages each pixel with its neighbours before the image reaches the encoder.
mechanism: A 3x3 box filter, then the unchanged zero-shot classifier.
assumptions:
  modifies_weights: false
  needs_labels: false
  training_data: none
  test_time_gradients: false
  needs_clean_reference: false
  randomized: false
  inference_time_optimization: false
  non_differentiable: false
cost:
  training: none
  inference: one 3x3 convolution per image
  extra_forward_passes: 0
  extra_backward_passes: 0
  level: none
threat_model:
  norms: [linf]
  eps: [8/255]
  attacks: [PGD-2]
targets:
  models: [CLIP]
  tasks: [zero-shot classification]
not_reported_reason: a synthetic method; no paper reports numbers for it
sources:
  - https://arxiv.org/abs/2501.00010
reproduction:
  notebook: notebooks/blur-purifier.ipynb
  status: reproduced
  deviations: [a test entry]
"""

DEFENSE_CELL = """\
import torch.nn.functional as F

from vlmdefense.defenses.base import Defense


class BlurPurifier(Defense):
    id = "blur-purifier"
    kind = "inference"

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def purify(self, images):
        return F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)

    def predict(self, images):
        self.counter.images += len(images)
        self.counter.forward += len(images)
        return self.classifier(self.purify(images))


defense = harness.fit(ctx, BlurPurifier(ctx.base))
"""


def copy_repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("catalog", "docs"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "mkdocs.yml", root / "mkdocs.yml")
    shutil.copytree(REPO / "notebooks", root / "notebooks")
    (root / "reproductions").mkdir()
    shutil.copy(REPO / "reproductions" / "profiles.yaml", root / "reproductions" / "profiles.yaml")
    shutil.copytree(REPO / "reproductions" / "baseline" / "smoke", root / "reproductions" / "baseline" / "smoke")
    return root


@pytest.mark.slow
def test_a_contributor_goes_from_new_to_a_page_on_the_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = copy_repo(tmp_path)
    monkeypatch.chdir(root)
    cli = CliRunner()

    def ok(*args: str) -> str:
        result = cli.invoke(app, list(args))
        assert result.exit_code == 0, f"vlmdefense {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    ok("new", "blur-purifier", "--paradigm", "training-free", "--family", "input-purification")
    yaml_path = root / "catalog" / "training-free" / "blur-purifier.yaml"
    notebook_path = root / "notebooks" / "blur-purifier.ipynb"
    assert yaml_path.is_file() and notebook_path.is_file()

    unfilled = cli.invoke(app, ["validate"])
    assert unfilled.exit_code == 1 and "placeholder 'TODO'" in unfilled.stdout

    yaml_path.write_text(ENTRY, encoding="utf-8")
    notebook = nbformat.read(str(notebook_path), as_version=4)
    defense_cells = [c for c in notebook.cells if "harness.fit(" in c.source]
    assert len(defense_cells) == 1, "the template has one cell that fits the defense"
    defense_cells[0].source = DEFENSE_CELL
    nbformat.write(notebook, str(notebook_path))
    assert "catalog ok" in ok("validate")

    assert "1 ran" in ok("run", "blur-purifier", "--profile", "smoke", "--canonical", *FAST)
    record = json.loads((root / "reproductions" / "blur-purifier" / "smoke" / "result.json").read_text())
    assert record["status"] == "ok" and record["method"] == "blur-purifier"
    assert {r["adaptive"] for r in record["robust"]} == {False, True}

    site = tmp_path / "site"
    ok("site", "build", "--out", str(site))
    page = (site / "methods" / "blur-purifier" / "index.html").read_text(encoding="utf-8")
    assert "BlurPurifier" in page
    assert f"{record['headline']['clean']:.1f}" in page, "the page lists the new numbers"
    assert f"{record['headline']['robust_adaptive']:.1f}" in page

    report = ok("check", "blur-purifier", *FAST)
    assert "✓ validate" in report and "✓ notebook" in report and "✓ site" in report
    assert "reported: no numbers from the paper" in report

    yaml_path.write_text(ENTRY.replace("family: input-purification", "family: counterattack-x"), encoding="utf-8")
    broken = cli.invoke(app, ["check", "blur-purifier", *FAST])
    assert broken.exit_code == 1 and "✗ validate" in broken.stdout and "family" in broken.stdout
