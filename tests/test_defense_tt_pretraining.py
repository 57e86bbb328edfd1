"""Adversarial pre-training from scratch (ΔCLIP, Robust-LLaVA) on the quick profile's scale."""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging

import open_clip
import pytest
import torch

from vlmdefense.defenses import create_defense
from vlmdefense.defenses.registry import defense_class
from vlmdefense.defenses.training_time.adversarial_pretraining import (
    AdversarialPretraining,
    PretrainConfig,
    adversarial_pretrain,
    attack_steps,
    caption_tokens,
    contrastive_loss,
    epoch_eps,
    fresh_clip,
    pretraining_set,
)
from vlmdefense.defenses.training_time.delta_clip import DeltaCLIP
from vlmdefense.defenses.training_time.robust_llava import RobustLLaVA
from vlmdefense.workbench import harness
from vlmdefense.workbench.attacks import PGD
from vlmdefense.workbench.data import ImageSet

METHODS = ("delta-clip", "robust-llava")


@pytest.fixture(scope="session")
def ctx() -> harness.Context:
    return harness.setup("delta-clip", "quick")


@pytest.fixture(scope="session")
def fitted(ctx: harness.Context) -> dict[str, AdversarialPretraining]:
    """Each method fitted once with the quick profile's fast budget; the base model must stay untouched."""
    before = {k: v.clone() for k, v in ctx.clip.model.state_dict().items()}
    out = {}
    for method in METHODS:
        defense = create_defense(method, **{**ctx.params, "train_limit": 64})
        harness.fit(ctx, defense)
        assert isinstance(defense, AdversarialPretraining)
        out[method] = defense
    after = ctx.clip.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "fit modified the original model"
    return out


def _small_set(ctx: harness.Context, n: int = 32) -> ImageSet:
    train, _ = pretraining_set(ctx.fit_data(), "pretraining")
    return train.head(n)


def test_registered_with_their_own_ids() -> None:
    assert defense_class("delta-clip") is DeltaCLIP
    assert defense_class("robust-llava") is RobustLLaVA


def test_fast_budget_and_overrides() -> None:
    defense = create_defense("robust-llava", fast=True, steps=2, train_eps="4/255")
    assert isinstance(defense, RobustLLaVA)
    assert (defense.config.epochs, defense.config.steps, defense.config.strong_epochs) == (1, 2, 0)
    assert defense.config.train_eps == pytest.approx(4 / 255)
    paper = create_defense("delta-clip")
    assert isinstance(paper, DeltaCLIP) and paper.config.epochs == 40 and paper.config.strong_epochs == 0


def test_weak_to_strong_schedule() -> None:
    config = PretrainConfig(epochs=10, steps=1, strong_epochs=3, strong_steps=4)
    assert [attack_steps(config, e) for e in range(10)] == [1] * 7 + [4] * 3
    assert {attack_steps(dataclasses.replace(config, strong_epochs=0), e) for e in range(10)} == {1}


def test_eps_warm_up_rises_linearly_then_holds() -> None:
    config = PretrainConfig(epochs=6, train_eps=8 / 255, eps_warmup_epochs=4)
    assert [epoch_eps(config, e) for e in range(6)] == pytest.approx([v * 8 / 255 for v in (0.25, 0.5, 0.75, 1, 1, 1)])
    assert {epoch_eps(dataclasses.replace(config, eps_warmup_epochs=0), e) for e in range(6)} == {8 / 255}
    assert PretrainConfig().eps_warmup_epochs == 20 and PretrainConfig().epochs == 40


def test_the_loop_attacks_within_each_epochs_budget(ctx: harness.Context) -> None:
    """The recorded budget of each epoch is the warm-up's, and every adversarial batch stays inside it."""
    model = fresh_clip(ctx.clip.name, seed=1)
    train = _small_set(ctx)
    captions = caption_tokens(ctx.clip.tokenizer, ctx.prompts)
    config = PretrainConfig(
        epochs=2, steps=1, train_eps=8 / 255, eps_warmup_epochs=2, train_batch_size=len(train), seed=0
    )
    seen: list[float] = []
    original = PGD.maximise

    def spy(attack: PGD, objective: object, images: torch.Tensor) -> torch.Tensor:
        x_adv = original(attack, objective, images)  # type: ignore[arg-type]
        seen.append((x_adv - images).abs().max().item())
        return x_adv

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PGD, "maximise", spy)
        clip = dataclasses.replace(ctx.clip, model=model)
        history = adversarial_pretrain(model, clip, train, captions, config, False)
    assert [row["eps"] for row in history] == pytest.approx([4 / 255, 8 / 255], abs=1e-6)
    assert seen[0] <= 4 / 255 + 1e-6 < seen[1] <= 8 / 255 + 1e-6


def test_pretraining_data_is_the_small_clip_split_or_the_seen_classes(ctx: harness.Context) -> None:
    data = ctx.fit_data()
    full, _ = pretraining_set(data, "pretraining")
    seen, _ = pretraining_set(data, "seen")
    assert set(full.labels.tolist()) == set(range(10))
    assert set(seen.labels.tolist()) <= set(ctx.prompts.seen_classes)
    assert len(full) == len(ctx.train) if ctx.train is not None else False
    with pytest.raises(ValueError, match="pretrain_data"):
        pretraining_set(data, "imagenet")


def test_starts_from_a_random_initialisation_not_the_pretrained_clip(ctx: harness.Context) -> None:
    """With a zero learning rate, pre-training returns the seeded random initialisation: no tensor of the
    pretrained small CLIP is copied into it, and its zero-shot accuracy is near chance."""
    model = fresh_clip(ctx.clip.name, seed=0)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    base = ctx.clip.model.state_dict()
    matrices = [k for k, v in init.items() if v.ndim >= 2 and "positional" not in k]
    assert matrices and not any(torch.equal(init[k], base[k]) for k in matrices)
    clip = dataclasses.replace(ctx.clip, model=model)
    config = PretrainConfig(epochs=1, lr=0.0, steps=1, train_eps=8 / 255, seed=0)
    adversarial_pretrain(model, clip, _small_set(ctx), caption_tokens(ctx.clip.tokenizer, ctx.prompts), config, False)
    assert all(torch.equal(init[k], v) for k, v in model.state_dict().items())
    again = fresh_clip(ctx.clip.name, seed=0).state_dict()
    assert all(torch.equal(init[k], again[k]) for k in init), "the initialisation is not seeded"


def test_fit_records_a_near_chance_start(fitted: dict[str, AdversarialPretraining], ctx: harness.Context) -> None:
    for defense in fitted.values():
        assert defense.pretrained is not None
        assert defense.pretrained is not ctx.clip.model
        assert defense.history and defense.history[0]["attack_steps"] == 1
    assert ctx.findings["initial_zero_shot_test_accuracy"] < 40.0


def test_training_images_are_adversarial(ctx: harness.Context) -> None:
    """The loop's adversarial images raise the contrastive loss of the model being trained above the clean
    loss of the same batches; the attack objective, maximised by PGD on a model that has learnt something
    (a copy of the small CLIP), raises it well above the clean loss and above random noise of the budget."""
    model = fresh_clip(ctx.clip.name, seed=1)
    train = _small_set(ctx)
    captions = caption_tokens(ctx.clip.tokenizer, ctx.prompts)
    config = PretrainConfig(epochs=2, steps=2, train_eps=8 / 255, train_batch_size=16, seed=0)
    history = adversarial_pretrain(model, dataclasses.replace(ctx.clip, model=model), train, captions, config, False)
    assert all(row["loss_adv"] > row["loss_clean"] for row in history)
    trained = copy.deepcopy(ctx.clip.model)
    clip = dataclasses.replace(ctx.clip, model=trained)
    texts = captions[train.labels, 0]
    with torch.no_grad():
        text_features = torch.nn.functional.normalize(trained.encode_text(texts), dim=-1)
        clean = contrastive_loss(trained, clip, train.images, text_features).item()
        noise = (train.images + (torch.rand_like(train.images) * 2 - 1) * 8 / 255).clamp(0, 1)
        noisy = contrastive_loss(trained, clip, noise, text_features).item()
    objective = functools.partial(contrastive_loss, trained, clip, text_features=text_features)
    x_adv = PGD(eps=8 / 255, steps=2, alpha=8 / 255).maximise(objective, train.images)
    assert (x_adv - train.images).abs().max() <= 8 / 255 + 1e-6
    with torch.no_grad():
        adversarial = contrastive_loss(trained, clip, x_adv, text_features).item()
    assert adversarial > clean + 0.5 and adversarial > noisy + 0.5


def test_delta_clip_uses_its_own_text_tower(fitted: dict[str, AdversarialPretraining], ctx: harness.Context) -> None:
    defense = fitted["delta-clip"]
    assert defense.classifier is not None and defense.pretrained is not None
    assert defense.classifier.model is defense.pretrained
    assert not torch.allclose(defense.classifier.text_weights, ctx.base.text_weights)
    logits = defense.predict(ctx.sets.test.images[:4])
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()


def test_robust_llava_freezes_the_tower_and_reads_the_original_text(
    fitted: dict[str, AdversarialPretraining], ctx: harness.Context
) -> None:
    """The alignment trains only the linear map: the pre-trained image tower is bit-identical inside the
    classifier, and the class embeddings and temperature are the original CLIP's."""
    defense = fitted["robust-llava"]
    assert isinstance(defense, RobustLLaVA) and defense.classifier is not None and defense.pretrained is not None
    tower = defense.classifier.model.visual.tower
    assert tower is defense.pretrained.visual
    assert torch.equal(defense.classifier.text_weights, ctx.base.text_weights)
    assert defense.classifier.logit_scale == pytest.approx(ctx.base.logit_scale)
    align = ctx.findings.get("align_cosine_loss")
    assert align is not None and align["after"] < align["before"]


def test_robust_llava_alignment_leaves_the_tower_alone(ctx: harness.Context) -> None:
    defense = create_defense("robust-llava", **{**ctx.params, "train_limit": 16, "align_epochs": 5})
    assert isinstance(defense, RobustLLaVA)
    data = ctx.fit_data()
    model = fresh_clip(ctx.clip.name, seed=3)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    before = {k: v.clone() for k, v in model.visual.state_dict().items()}
    classifier, found = defense.build(data, model)
    assert all(torch.equal(before[k], v) for k, v in model.visual.state_dict().items())
    assert found["align_cosine_loss"]["after"] < found["align_cosine_loss"]["before"]
    assert classifier(ctx.sets.test.images[:2]).shape == (2, 10)


def test_gradients_reach_the_input(fitted: dict[str, AdversarialPretraining], ctx: harness.Context) -> None:
    for defense in fitted.values():
        x = ctx.sets.test.images[:4].clone().requires_grad_(True)
        defense.predict(x).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_a_fresh_clip_is_created_without_the_random_init_warning(caplog: pytest.LogCaptureFixture) -> None:
    """open_clip's notice that a model has no pretrained weights is the intent here and is not logged."""
    with caplog.at_level(logging.WARNING):
        model = fresh_clip("vlmd-small-clip", seed=3)
    assert model.training and not [r for r in caplog.records if "pretrained" in r.getMessage()]
    with caplog.at_level(logging.WARNING):
        open_clip.create_model("vlmd-small-clip", pretrained=None)
    assert any("No pretrained weights" in r.getMessage() for r in caplog.records)  # what is filtered
    assert not logging.getLogger().filters
