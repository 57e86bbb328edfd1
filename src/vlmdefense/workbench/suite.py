"""The zero-shot robustness suite: the datasets, class names and prompt templates of clip_benchmark, read from a
local ``data_root`` (never downloaded), a seeded sample of each test split as tensors in [0, 1].

A profile names its suite in a ``suite`` section::

    suite:
      datasets: [cifar10, cifar100, stl10, ...]   # clip_benchmark's names
      n_per_dataset: 1000                          # a seeded random sample of each test split (null: all)
      split: test
      data_root: data                              # relative to the repository root; <data_root>/<dataset>/

The field's protocol (TeCoA, FARE and the papers that follow them) evaluates a CLIP model zero-shot on every
dataset with its own class names and templates, and reports each dataset's clean and robust accuracy and their
average. Nothing here downloads: a dataset missing under ``data_root`` is an error that names its folder.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmdefense.workbench.data import ImageSet, PromptSpec


@dataclass(frozen=True)
class SuiteSpec:
    """The datasets of a zero-shot suite and how many test images of each are evaluated."""

    datasets: tuple[str, ...]
    n_per_dataset: int | None
    split: str
    data_root: Path

    @classmethod
    def from_params(cls, params: dict[str, Any], root: Path, data_root: Path | None = None) -> SuiteSpec:
        """The suite of a profile's merged parameters (``data_root`` overrides the profile's folder).

        Raises:
            ValueError: the profile has no ``suite`` section, or it lists no dataset.
        """
        raw = params.get("suite")
        if not isinstance(raw, dict) or not raw.get("datasets"):
            raise ValueError("this profile has no zero-shot suite: add suite: {datasets: [...]} to it")
        n = raw.get("n_per_dataset")
        folder = (
            data_root if data_root is not None else root / str(raw.get("data_root", params.get("data_root", "data")))
        )
        return cls(
            datasets=tuple(str(d) for d in raw["datasets"]),
            n_per_dataset=None if n is None else int(n),
            split=str(raw.get("split", "test")),
            data_root=folder,
        )


@dataclass(frozen=True)
class SuiteDataset:
    """One dataset of the suite: its sampled test images and its zero-shot prompts."""

    name: str
    images: ImageSet
    prompts: PromptSpec
    size: int  # images in the whole split, before sampling


def _as_format_template(template: str) -> str:
    """clip_benchmark writes ``{c}`` for the class name; the workbench's templates write ``{name}``."""
    return template.replace("{c}", "{name}")


def _transform(image_size: int) -> Any:
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
        ]
    )


def sample_indices(size: int, n: int | None, seed: int) -> list[int]:
    """A seeded random sample of ``n`` indices out of ``size`` (all of them, in order, when ``n`` is None or
    not smaller): test splits are often sorted by class, so a prefix would hold a few classes only."""
    if n is None or n >= size:
        return list(range(size))
    generator = torch.Generator().manual_seed(seed)
    return sorted(int(i) for i in torch.randperm(size, generator=generator)[:n])


def load_suite_dataset(name: str, spec: SuiteSpec, image_size: int, seed: int = 0) -> SuiteDataset:
    """Dataset ``name`` of the suite through clip_benchmark's builder, from ``<data_root>/<name>``.

    Raises:
        FileNotFoundError: the dataset is not on disk (nothing is downloaded).
    """
    from clip_benchmark.datasets.builder import build_dataset

    folder = spec.data_root / name
    if not folder.is_dir():
        raise FileNotFoundError(
            f"dataset {name!r} not found: expected it under {folder} (the suite reads data_root and never downloads)"
        )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="split argument ignored")  # EuroSAT, SUN397: one split only
            dataset = build_dataset(
                dataset_name=name,
                root=str(folder),
                transform=_transform(image_size),
                split=spec.split,
                download=False,
                task="zeroshot_classification",
            )
    except (RuntimeError, OSError, AssertionError) as exc:
        raise FileNotFoundError(f"dataset {name!r} could not be read from {folder}: {exc}") from exc
    indices = sample_indices(len(dataset), spec.n_per_dataset, seed)
    pairs = [dataset[i] for i in indices]
    images = torch.stack([image.expand(3, -1, -1) for image, _ in pairs]) if pairs else torch.zeros(0, 3, 1, 1)
    labels = torch.tensor([int(label) for _, label in pairs], dtype=torch.long)
    classnames = tuple(str(c) for c in dataset.classes)
    templates = tuple(_as_format_template(str(t)) for t in dataset.templates)
    return SuiteDataset(
        name=name,
        images=ImageSet(name, images, labels, classnames),
        prompts=PromptSpec(classnames, templates, seen_classes=()),
        size=len(dataset),
    )
