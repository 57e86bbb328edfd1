"""Zero-shot classifier and accuracy bookkeeping."""

from __future__ import annotations

import pytest
import torch

from vlmdefense.workbench.data import digit_prompts
from vlmdefense.workbench.evaluation import (
    PassCounter,
    ZeroShotClassifier,
    accuracy,
    split_accuracy,
    text_classifier_weights,
)
from vlmdefense.workbench.models import SMALL_CLIP, load_clip


def test_split_accuracy() -> None:
    labels = torch.tensor([0, 1, 5, 6, 7])
    correct = torch.tensor([True, False, True, True, False])
    acc = split_accuracy(correct, labels, (0, 1, 2, 3, 4), torch.tensor([True, False]))
    assert (acc.all, acc.seen, acc.transfer) == (pytest.approx(60.0), 50.0, 50.0)
    assert acc.unseen == 66.67  # percent, rounded to two decimals as the record stores it
    empty = split_accuracy(torch.tensor([True]), torch.tensor([0]), (0,))
    assert (empty.all, empty.seen, empty.unseen, empty.transfer) == (100.0, 100.0, None, None)


def test_accuracy() -> None:
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    assert accuracy(logits, torch.tensor([0, 0])) == 50.0


def test_prompt_ensemble_is_unit_norm_and_cached() -> None:
    clip = load_clip(SMALL_CLIP, device="cpu")
    weights = text_classifier_weights(clip, digit_prompts())
    assert weights.shape == (10, clip.model.text_projection.shape[1])
    assert torch.allclose(weights.norm(dim=-1), torch.ones(10), atol=1e-5)
    classifier = ZeroShotClassifier(clip, digit_prompts())
    assert torch.equal(classifier.text_weights, weights)
    assert not any(name.startswith("text") for name, _ in classifier.named_parameters())


def test_pass_counter() -> None:
    counter = PassCounter(forward=30, backward=20, images=10)
    assert counter.per_image() == (3.0, 2.0)
    assert PassCounter().per_image() == (0.0, 0.0)
