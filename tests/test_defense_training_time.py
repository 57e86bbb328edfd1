"""Adversarial fine-tuning (TeCoA, PMG-AFT, FARE) on the quick profile's scale."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlmdefense.defenses import create_defense
from vlmdefense.defenses.registry import defense_class
from vlmdefense.defenses.training_time.fare import FARE
from vlmdefense.defenses.training_time.finetuning import AdversarialFineTuning
from vlmdefense.defenses.training_time.pmg_aft import PMGAFT, PMGAFTConfig
from vlmdefense.defenses.training_time.tecoa import TeCoA
from vlmdefense.workbench import harness
from vlmdefense.workbench.attacks import PGD
from vlmdefense.workbench.schedule import cosine_lr, dassl_lr, warmup_cosine_lr

METHODS = ("tecoa", "pmg-aft", "fare")


@pytest.fixture(scope="session")
def ctx() -> harness.Context:
    return harness.setup("tecoa", "quick")


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def fitted(ctx: harness.Context) -> dict[str, AdversarialFineTuning]:
    """Each method fitted once with the quick profile's fast budget (ctx.base must stay untouched)."""
    before = _snapshot(ctx.clip.model)
    out = {}
    for method in METHODS:
        defense = create_defense(method, **{**ctx.params, "train_limit": 32})
        harness.fit(ctx, defense)
        out[method] = defense
    after = ctx.clip.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "fit modified the original model"
    return out


def _batch(ctx: harness.Context, n: int = 8) -> dict[str, torch.Tensor]:
    train = ctx.seen_train
    return {"images": train.images[:n], "labels": train.labels[:n]}


def _start(defense: AdversarialFineTuning, ctx: harness.Context) -> AdversarialFineTuning:
    """The defense at initialisation (the fine-tuned copy equals the original model)."""
    defense.original = ctx.base
    defense.classifier = defense._tuned_copy(ctx.fit_data())
    defense.train_classes = list(range(len(ctx.prompts.classnames)))
    return defense


def test_from_params_fast_and_overrides() -> None:
    fast = TeCoA.from_params({"fast": True})
    assert (fast.config.epochs, fast.config.steps, fast.config.train_limit) == (1, 1, 128)
    custom = PMGAFT.from_params({"epochs": 3, "lr": "0.01", "train_eps": "4/255", "alpha": 0.5, "kl_reduction": "sum"})
    assert custom.config.epochs == 3 and custom.config.lr == pytest.approx(0.01)
    assert custom.config.train_eps == pytest.approx(4 / 255)
    assert (custom.alpha, custom.beta, custom.kl_reduction) == (0.5, 1.0, "sum")
    assert FARE.from_params({}).config.optimizer == "adamw" and TeCoA.from_params({}).config.optimizer == "sgd"
    assert all(issubclass(defense_class(method), AdversarialFineTuning) for method in METHODS)
    with pytest.raises(ValueError):
        PMGAFT(PMGAFTConfig(kl_reduction="mean"))


@pytest.mark.parametrize("method", METHODS)
def test_predict_shape_counters_determinism(ctx: harness.Context, fitted: dict, method: str) -> None:
    defense = fitted[method]
    images = ctx.sets.test.images[:12]
    defense.counter.forward = defense.counter.images = 0
    first = defense.predict(images)
    second = defense.predict(images)
    assert first.shape == (12, 10)
    assert torch.equal(first, second)
    assert (defense.counter.forward, defense.counter.images, defense.counter.backward) == (24, 24, 0)
    assert defense.kind == "static" and not defense.randomized


@pytest.mark.parametrize("method", METHODS)
def test_only_the_image_tower_moves(ctx: harness.Context, fitted: dict, method: str) -> None:
    defense = fitted[method]
    tuned = defense.classifier.model.state_dict()
    original = ctx.clip.model.state_dict()
    moved = {k for k in original if not torch.equal(tuned[k], original[k])}
    assert moved and all(k.startswith("visual.") for k in moved)
    assert torch.equal(defense.classifier.text_weights, ctx.base.text_weights)
    assert not any(p.requires_grad for p in defense.classifier.parameters())
    findings = ctx.findings
    assert findings["train_images"] == 32 and findings["loss_curve"]


@pytest.mark.parametrize("method", METHODS)
def test_attack_surface_is_differentiable(ctx: harness.Context, fitted: dict, method: str) -> None:
    defense = fitted[method]
    x = ctx.sets.test.images[:4].clone().requires_grad_(True)
    loss = F.cross_entropy(defense.attack_surface()(x), ctx.sets.test.labels[:4])
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.abs().sum() > 0


def test_inner_attack_raises_its_objective_within_budget(ctx: harness.Context) -> None:
    defense = _start(TeCoA(), ctx)
    batch = _batch(ctx)
    torch.manual_seed(0)
    eps = 8 / 255
    x_adv = PGD(eps=eps, steps=3, alpha=eps / 2).maximise(lambda x: defense.attack_objective(batch, x), batch["images"])
    assert (x_adv - batch["images"]).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert defense.attack_objective(batch, x_adv) > defense.attack_objective(batch, batch["images"])


def test_tecoa_loss_is_zero_shot_cross_entropy(ctx: harness.Context) -> None:
    defense = _start(TeCoA(), ctx)
    batch = _batch(ctx)
    with torch.no_grad():
        loss, parts = defense.training_loss(batch, batch["images"])
        expected = F.cross_entropy(ctx.base(batch["images"]), batch["labels"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts["ce_adv"] == pytest.approx(loss.item())


def test_pmg_aft_terms_at_initialisation(ctx: harness.Context) -> None:
    """At the start the fine-tuned model is the original: the generalisation KL vanishes on any input,
    the clean KL is positive on perturbed inputs, and both vanish on clean inputs."""
    defense = _start(PMGAFT(), ctx)
    batch = _batch(ctx)
    noisy = (batch["images"] + 0.1 * torch.randn_like(batch["images"])).clamp(0, 1)
    with torch.no_grad():
        _, parts = defense.training_loss(batch, noisy)
        _, clean_parts = defense.training_loss(batch, batch["images"])
    assert parts["kl_general"] == pytest.approx(0.0, abs=1e-5)
    assert parts["kl_clean"] > 1e-4
    assert clean_parts["kl_clean"] == pytest.approx(0.0, abs=1e-5)


def test_fare_objective_needs_no_labels_and_starts_at_zero(ctx: harness.Context) -> None:
    defense = _start(FARE(), ctx)
    images = _batch(ctx)["images"]
    with torch.no_grad():
        batch = defense.reference({"images": images})  # no labels anywhere
        at_clean = defense.attack_objective(batch, images)
        loss, _ = defense.training_loss(batch, (images + 4 / 255).clamp(0, 1))
    assert at_clean.item() == pytest.approx(0.0, abs=1e-6)
    assert loss.item() > 0
    assert not FARE.needs_labels


def test_fare_fine_tuning_reduces_the_adversarial_distance(ctx: harness.Context) -> None:
    """Twelve steps on 64 images: the PGD-maximised distance to the original clean embedding falls."""
    eps = 8 / 255
    images = ctx.seen_train.images[64:96]

    def adversarial_distance(defense: FARE) -> float:
        batch = defense.reference({"images": images})
        torch.manual_seed(1)
        x_adv = PGD(eps=eps, steps=2, alpha=eps).maximise(lambda x: defense.attack_objective(batch, x), images)
        with torch.no_grad():
            return defense.attack_objective(batch, x_adv).item()

    before = adversarial_distance(_start(FARE(), ctx))
    defense = FARE.from_params({"epochs": 3, "steps": 1, "train_limit": 64, "train_batch_size": 16})
    findings = defense.fit(ctx.fit_data())
    assert findings["train_images"] == 64 and len(findings["loss_curve"]) == 3
    assert adversarial_distance(defense) < 0.9 * before


def _old_warmup_cosine(step: int, total: int, peak: float, warmup_fraction: float) -> float:
    warmup = max(1, int(warmup_fraction * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def _old_dassl(epoch: int, epochs: int, lr: float, warmup_epochs: int, warmup_lr: float) -> float:
    if epoch < warmup_epochs:
        return warmup_lr
    span = max(1, epochs - warmup_epochs)
    return lr * 0.5 * (1 + math.cos(math.pi * (epoch - warmup_epochs) / span))


def _old_tapt(step: int, total: int, lr: float) -> float:
    return lr * 0.5 * (1 + math.cos(math.pi * step / max(1, total)))


def test_one_schedule_repeats_the_three_former_schedules_exactly() -> None:
    """The fine-tuning loop's warm-up cosine, APT's per-epoch Dassl schedule and TAPT's per-step cosine
    are :func:`cosine_lr` with parameters: equal as floats (==), not only approximately."""
    for total in (1, 2, 3, 7, 10, 33, 150, 1001):
        for t in range(total + 1):
            for peak in (1e-3, 0.01, 0.035, 0.1):
                for fraction in (0.0, 0.1, 0.25):
                    assert warmup_cosine_lr(t, total, peak, fraction) == _old_warmup_cosine(t, total, peak, fraction)
                for warmup in (0, 1, 3):
                    expected = _old_dassl(t, total, peak, warmup, 1e-5)
                    assert cosine_lr(t, total, peak, warmup=warmup, warmup_lr=1e-5, rounding="angle") == expected
                assert cosine_lr(t, total, peak, rounding="angle") == _old_tapt(t, total, peak)


def test_dassl_lr_recounts_the_warmup() -> None:
    """Dassl's constant warm-up then a cosine of period ``max_epoch`` from the end of the warm-up."""
    assert [dassl_lr(e, 4, 1.0, 2, 1e-3) for e in range(2)] == [1e-3, 1e-3]
    assert [dassl_lr(e, 4, 1.0, 2, 1e-3) for e in range(2, 6)] == pytest.approx(
        [1.0, 0.853553, 0.5, 0.146447], abs=1e-6
    )
    assert dassl_lr(3, 4, 1.0, 0, 0.0) == pytest.approx(0.146447, abs=1e-6)
