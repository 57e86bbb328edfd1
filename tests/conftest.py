"""Shared fixtures: a small valid catalog written to a temporary folder, and one temporary cache for the
whole test run (the tests never read or write the user's ``~/.cache/vlmdefense``)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE_ENV = "VLMDEFENSE_CACHE"
_CACHE = tempfile.TemporaryDirectory(prefix="vlmdefense-test-cache-")


def pytest_configure(config: pytest.Config) -> None:
    """Point the library (and every notebook kernel the tests start) at the run's own cache."""
    os.environ[CACHE_ENV] = _CACHE.name


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the run's cache."""
    _CACHE.cleanup()


VALID_ENTRY = """\
id: {id}
name: Example
title: An Example Defense for Tests
authors:
  - Ada Lovelace
  - Alan Turing
year: 2024
venue: ICLR 2024
links:
  arxiv: 2401.00001
  code: https://github.com/example/example
paradigm: training-time
family: adversarial-fine-tuning
summary: A synthetic entry used by the test suite.
mechanism: Fine-tunes nothing; it only exists to be validated.
assumptions:
  modifies_weights: true
  needs_labels: true
  training_data: ImageNet-1k train
  test_time_gradients: false
  needs_clean_reference: false
  randomized: false
  inference_time_optimization: false
  non_differentiable: false
cost:
  training: 2 epochs
  inference: none
  level: low
threat_model:
  norms: [linf]
  eps: [1/255, 4/255]
  attacks: [PGD-100]
targets:
  models: [CLIP ViT-B/32]
  tasks: [zero-shot classification]
reported:
  - setting: average over datasets
    model: CLIP ViT-B/32
    dataset: average of 16 datasets
    attack: PGD-100
    eps: 1/255
    clean: 50.5
    robust: 30.25
    source: Table 1
sources:
  - https://arxiv.org/abs/2401.00001
related: {related}
"""


def write_entry(
    root: Path,
    method_id: str = "example",
    related: str = "[]",
    text: str | None = None,
    paradigm: str = "training-time",
) -> Path:
    """Write a valid entry (or ``text``) as ``root/<paradigm>/<method_id>.yaml``."""
    path = root / paradigm / f"{method_id}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text is not None else VALID_ENTRY.format(id=method_id, related=related), encoding="utf-8")
    return path


@pytest.fixture
def catalog_dir(tmp_path: Path) -> Path:
    """A catalog folder holding the real taxonomy and one valid entry ``example``."""
    root = tmp_path / "catalog"
    root.mkdir()
    shutil.copy(REPO / "catalog" / "taxonomy.yaml", root / "taxonomy.yaml")
    write_entry(root)
    return root
