"""The small CLIP (training, checkpoint, card, loading through open_clip) and the datasets."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from vlmdefense.workbench.data import (
    digit_prompts,
    load_digits_split,
    load_image_folder,
    load_mnist_transfer,
    load_torchvision_dataset,
    seen_mask,
)
from vlmdefense.workbench.evaluation import ZeroShotClassifier, accuracy
from vlmdefense.workbench.models import (
    SMALL_CLIP,
    Recipe,
    load_clip,
    register_small_clip,
    small_clip_card,
    write_small_clip,
)


@pytest.fixture(scope="session")
def digits():
    return load_digits_split(16)


def test_digits_split_is_stratified_and_fixed(digits) -> None:
    train, test = digits
    assert (len(train), len(test)) == (1437, 360)
    assert train.images.shape[1:] == (3, 16, 16)
    assert float(test.images.min()) >= 0 and float(test.images.max()) <= 1
    counts = torch.bincount(test.labels, minlength=10)
    assert int(counts.min()) >= 35
    first = test.labels[:20]
    assert len(set(first.tolist())) == 10, "any prefix of the test set is class-balanced"
    again = load_digits_split(16)[1]
    assert torch.equal(again.images, test.images)
    other = load_digits_split(16, seed=1)[1]
    assert not torch.equal(other.images, test.images)


def test_seen_and_unseen_classes(digits) -> None:
    _, test = digits
    mask = seen_mask(test.labels, digit_prompts().seen_classes)
    assert set(test.labels[mask].tolist()) == {0, 1, 2, 3, 4}
    assert set(test.labels[~mask].tolist()) == {5, 6, 7, 8, 9}


def test_mnist_transfer_ships_offline() -> None:
    transfer = load_mnist_transfer(16)
    assert len(transfer) == 5000
    assert torch.bincount(transfer.labels).tolist() == [500] * 10
    assert transfer.images.shape[1:] == (3, 16, 16)


def test_prompts_are_versioned_data() -> None:
    prompts = digit_prompts()
    assert prompts.classnames[7] == "seven"
    assert "a handwritten 7." in prompts.prompts(7)
    assert len(prompts.templates) >= 4


def test_short_training_writes_checkpoint_and_card(tmp_path: Path) -> None:
    recipe = replace(Recipe(), epochs=1)
    path, card = write_small_clip(recipe, tmp_path, progress=False)
    assert path.is_file()
    stored = json.loads((tmp_path / "card.json").read_text())
    assert stored == card
    assert card["recipe"]["epochs"] == 1 and card["recipe_key"] == recipe.key() != Recipe().key()
    import hashlib

    assert card["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    for key in ("zero_shot_test_accuracy", "zero_shot_train_accuracy"):
        assert 0 <= card["metrics"][key] <= 100


def test_cached_small_clip_reaches_95_percent() -> None:
    card = small_clip_card()
    assert card["metrics"]["zero_shot_test_accuracy"] >= 95.0
    assert card["recipe"] == {**card["recipe"], "epochs": 40, "seed": 0}


def test_checkpoint_loads_through_open_clip_like_real_weights(digits) -> None:
    """The same call that loads ViT-B-32/openai in the paper profile."""
    from vlmdefense.workbench.models import ensure_small_clip

    register_small_clip()
    path = ensure_small_clip()
    model, _, preprocess = open_clip.create_model_and_transforms(SMALL_CLIP, pretrained=str(path))
    assert preprocess is not None
    clip = load_clip(SMALL_CLIP, path, device="cpu")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in clip.model.state_dict().items())
    _, test = digits
    with torch.no_grad():
        assert accuracy(ZeroShotClassifier(clip, digit_prompts())(test.images), test.labels) >= 95.0


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_clip(SMALL_CLIP, tmp_path / "nope.pt", device="cpu")


def test_image_folder_loading(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("cat", "dog_face"):
        (tmp_path / "pets" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(
                tmp_path / "pets" / name / f"{i}.png"
            )
    data = load_image_folder(tmp_path / "pets", 16)
    assert data.images.shape == (6, 3, 16, 16)
    assert data.classnames == ("cat", "dog face")
    assert sorted(data.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert len(load_torchvision_dataset("pets", tmp_path, 16, limit=4)) == 4


def test_torchvision_datasets_are_never_downloaded(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar10 not found"):
        load_torchvision_dataset("cifar10", tmp_path, 16)
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "nothing", 16)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_torchvision_dataset("imagenet-x", tmp_path, 16)


def test_the_suite_uses_its_own_cache_not_the_users() -> None:
    import os

    from vlmdefense.workbench.models import cache_dir

    assert cache_dir() == Path(os.environ["VLMDEFENSE_CACHE"])
    assert Path.home() / ".cache" not in cache_dir().parents
