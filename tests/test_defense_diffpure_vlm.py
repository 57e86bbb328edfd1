"""DiffPure-VLM: the official DDPM purification sampler (sequences, t*, both samplers' coefficients against a
zero noise predictor, randomness), the noise-augmented fine-tuning (it buys accuracy under Gaussian noise that
fine-tuning without noise does not), and the pipeline's adaptive surfaces on the small CLIP with a small
untrained UNet as the prior (no prior is trained here)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffusion_helpers import random_unet_prior
from vlmdefense.defenses import create_defense
from vlmdefense.defenses.training_free.diffpure_vlm import (
    DiffPureVLM,
    DiffPureVLMConfig,
    ddpm_purify,
    denoising_sequence,
    gaussian_augment,
    gaussian_noised,
)
from vlmdefense.workbench import harness
from vlmdefense.workbench.data import seen_mask
from vlmdefense.workbench.diffusion_prior import DiffusionPrior, PriorRecipe, linear_betas

SIZE = 16


class Recording(nn.Module):
    """A noise predictor that predicts zero noise and records the timesteps it is called at."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []
        self.config = SimpleNamespace(sample_size=SIZE)

    def forward(self, x: torch.Tensor, steps: torch.Tensor) -> SimpleNamespace:
        self.calls.append(int(steps[0]))
        return SimpleNamespace(sample=torch.zeros_like(x))


def recording_prior() -> tuple[DiffusionPrior, Recording]:
    unet = Recording()
    return DiffusionPrior(unet, linear_betas(PriorRecipe()), "zero"), unet


@pytest.fixture(scope="module")
def ctx() -> harness.Context:
    return harness.setup("diffpure-vlm", "quick", {"n_test": 360})  # all test digits: 180 seen


def test_registered_config_and_fast_overrides() -> None:
    pure = create_defense("diffpure-vlm")
    assert isinstance(pure, DiffPureVLM) and pure.randomized and pure.kind == "inference"
    c = pure.config
    assert (c.t_star, c.steps, c.sampler, c.noise_prob, c.noise_std_min, c.noise_std_max) == (
        50,
        50,
        "ddpm",
        0.7,
        0.05,
        0.15,
    )
    fast = create_defense("diffpure-vlm", fast=True).config
    assert fast.steps < 50 and fast.epochs < c.epochs
    assert create_defense("diffpure-vlm", t_star=150, steps=15).config.t_star == 150


def test_denoising_sequences_are_the_official_ones() -> None:
    assert denoising_sequence(50, 50) == list(range(50))  # the released runs: every step below t*
    assert denoising_sequence(50, 5) == [9, 19, 29, 39, 49]
    assert denoising_sequence(150, 3) == [49, 99, 149]
    assert denoising_sequence(50, 3) == [15, 31, 47]  # the scripts' integer stride
    with pytest.raises(ValueError):
        denoising_sequence(50, 51)


def test_t_star_is_honoured() -> None:
    """With a zero noise predictor and η = 0 the chain telescopes to x + √((1 − ᾱ_t*)/ᾱ_t*) n: the residual's
    spread is set by t*, and the UNet is called at the official timesteps, from t* − 1 down."""
    x = torch.rand(64, 3, SIZE, SIZE) * 0.5 + 0.25
    abar = torch.cumprod(1 - linear_betas(PriorRecipe()), dim=0)
    spreads = []
    for t_star in (50, 150):
        prior, unet = recording_prior()
        torch.manual_seed(0)
        out = ddpm_purify(prior, x, t_star, 5, eta=0.0)
        assert unet.calls == list(reversed(denoising_sequence(t_star, 5)))
        expected = 0.5 * ((1 - abar[t_star - 1]) / abar[t_star - 1]).sqrt()  # in [0, 1] pixel units
        spread = float((out - x).std())
        assert spread == pytest.approx(float(expected), rel=0.03)
        spreads.append(spread)
    assert spreads[1] > 1.5 * spreads[0]
    assert torch.equal(ddpm_purify(recording_prior()[0], x, 0, 5), x)  # t* = 0: the identity


def test_ddpm_update_has_the_posterior_variance() -> None:
    """η = 1 with a zero noise predictor: x_next = √(ᾱ_next/ᾱ_t) x + c₁ z, so the variance follows
    v ← (ᾱ_next/ᾱ_t) v + c₁² from 1 − ᾱ_t* (scaled back at each step) and the mean stays the input."""
    x = torch.full((256, 3, SIZE, SIZE), 0.8)
    prior, _ = recording_prior()
    abar = prior.alphas_cumprod.double()
    sequence = denoising_sequence(100, 4)
    variance = 1 - abar[99]
    for t, t_next in zip(reversed(sequence), reversed([-1, *sequence[:-1]]), strict=True):
        at, an = abar[t], (abar[t_next] if t_next >= 0 else torch.tensor(1.0, dtype=torch.float64))
        c1 = ((1 - at / an) * (1 - an) / (1 - at)).sqrt()
        variance = an / at * variance + c1**2
    torch.manual_seed(0)
    out = ddpm_purify(prior, x, 100, 4, eta=1.0) * 2 - 1  # back to [-1, 1]
    assert float(out.mean()) == pytest.approx(0.6, abs=0.01)
    assert float(out.var()) == pytest.approx(float(variance), rel=0.03)


def test_purifier_output_is_random_but_seeded(ctx: harness.Context) -> None:
    prior = random_unet_prior()
    x = ctx.sets.test.images[:6]
    first, second = ddpm_purify(prior, x, 50, 3), ddpm_purify(prior, x, 50, 3)
    assert not torch.allclose(first, second)
    torch.manual_seed(3)
    again = ddpm_purify(prior, x, 50, 3)
    torch.manual_seed(3)
    assert torch.equal(again, ddpm_purify(prior, x, 50, 3))


def test_augmentation_follows_the_official_recipe() -> None:
    torch.manual_seed(0)
    x = torch.full((2000, 3, 4, 4), 0.5)
    out, fraction = gaussian_augment(x, 0.7, 0.05, 0.15)
    changed = (out != x).flatten(1).any(dim=1)
    assert fraction == pytest.approx(0.7, abs=0.04) and float(changed.float().mean()) == pytest.approx(fraction)
    sds = (out - x)[changed].flatten(1).std(dim=1)
    assert float(sds.min()) > 0.03 and float(sds.max()) < 0.2 and float(sds.mean()) == pytest.approx(0.1, abs=0.01)
    assert float(out.min()) >= 0 and float(out.max()) <= 1


def _seen_noisy_accuracy(ctx: harness.Context, **changes: object) -> tuple[float, float]:
    """(plain, fine-tuned) accuracy on the seen test digits under Gaussian noise σ = 0.15."""
    config = DiffPureVLMConfig(**{"t_star": 0, "epochs": 6, **changes})  # type: ignore[arg-type]
    pure = DiffPureVLM(config)
    pure.attach_prior(random_unet_prior())
    harness.fit(ctx, pure)
    assert pure.tuned_classifier() is not ctx.base and pure.tuner is not None
    test = ctx.sets.test
    mask = seen_mask(test.labels, ctx.prompts.seen_classes)
    x, y = gaussian_noised(test.images[mask], 0.15, seed=1), test.labels[mask]
    with torch.no_grad():
        plain = float((ctx.base(x).argmax(-1) == y).float().mean())
        tuned = float((pure.tuned_classifier()(x).argmax(-1) == y).float().mean())
    return plain, tuned


def test_noise_augmented_model_beats_the_plain_one_under_gaussian_noise(ctx: harness.Context) -> None:
    plain, tuned = _seen_noisy_accuracy(ctx)
    _, without_noise = _seen_noisy_accuracy(ctx, noise_prob=0.0)
    assert tuned >= plain + 0.1
    assert tuned >= without_noise + 0.05  # the noise, not the fine-tuning itself, buys it


def test_pipeline_binds_the_chosen_classifier_and_its_surfaces_differ(ctx: harness.Context) -> None:
    off = DiffPureVLM(DiffPureVLMConfig(t_star=50, steps=3, noise_finetune=False))
    off.attach_prior(random_unet_prior())
    harness.fit(ctx, off)
    assert off.tuned_classifier() is ctx.base and off.unet_calls() == 3
    surfaces = off.surfaces()
    assert set(surfaces) == {"full", "bpda", "classifier"} and surfaces["classifier"] is ctx.base
    x, y = ctx.sets.test.images[:8], ctx.sets.test.labels[:8]
    grads = {}
    for name in ("full", "bpda"):
        x_ = x.clone().requires_grad_(True)
        torch.manual_seed(5)
        (grads[name],) = torch.autograd.grad(F.cross_entropy(surfaces[name](x_), y), x_)
    assert grads["full"].abs().sum() > 0 and torch.isfinite(grads["full"]).all()
    assert not torch.allclose(grads["full"], grads["bpda"])
    with pytest.raises(ValueError):
        DiffPureVLM(DiffPureVLMConfig(sampler="euler")).fit(ctx.fit_data())
