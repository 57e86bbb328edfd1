"""Diffusion purification (DiffPure): the reverse-SDE solver against a prior whose score is known in closed
form, and the adaptive surfaces (full gradient through the sampling steps, BPDA) on the small CLIP with a
small untrained UNet as the prior (no prior is trained here)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffusion_helpers import assert_surfaces_match_and_differ, random_unet_prior
from vlmdefense.defenses import create_defense
from vlmdefense.defenses.training_free.diffpure import DiffPure, DiffPureConfig
from vlmdefense.defenses.training_free.diffusion_purification import purify
from vlmdefense.workbench import harness
from vlmdefense.workbench.diffusion_prior import DiffusionPrior, PriorRecipe, linear_betas

N = 6
SIZE = 16


class GaussianData(nn.Module):
    """The exact noise predictor of a DDPM whose data are distributed as N(μ, s²I) in [-1, 1]:
    ε(x, n) = √(1 − ᾱ_n)(x − √ᾱ_n μ) / (ᾱ_n s² + 1 − ᾱ_n)."""

    def __init__(self, mean: torch.Tensor, sd: float) -> None:
        super().__init__()
        self.mean, self.sd = mean, sd
        self.abar = torch.cumprod(1 - linear_betas(PriorRecipe()), dim=0)
        self.config = SimpleNamespace(sample_size=mean.shape[-1])

    def forward(self, x: torch.Tensor, steps: torch.Tensor) -> SimpleNamespace:
        abar = self.abar[steps].view(-1, 1, 1, 1)
        eps = (1 - abar).sqrt() * (x - abar.sqrt() * self.mean) / (abar * self.sd**2 + 1 - abar)
        return SimpleNamespace(sample=eps)


def gaussian_prior(mean: torch.Tensor, sd: float) -> DiffusionPrior:
    return DiffusionPrior(GaussianData(mean, sd), linear_betas(PriorRecipe()), "closed form")


@pytest.fixture(scope="module")
def ctx() -> harness.Context:
    return harness.setup("diffpure", "quick")


def defense(ctx: harness.Context, **changes: object) -> DiffPure:
    config = DiffPureConfig(t_star=0.1, steps=3)
    for key, value in changes.items():
        setattr(config, key, value)
    pure = DiffPure(config)
    pure.attach_prior(random_unet_prior())
    harness.fit(ctx, pure)
    return pure


def test_registered_config_and_fast_overrides() -> None:
    pure = create_defense("diffpure")
    assert isinstance(pure, DiffPure) and pure.randomized and pure.kind == "inference"
    assert (pure.config.t_star, pure.config.steps, pure.config.adaptive) == (0.1, 100, "full")
    assert create_defense("diffpure", fast=True).config.steps < 100
    assert create_defense("diffpure", t_star="0.15", steps=7).config.t_star == pytest.approx(0.15)


def test_purification_at_t_zero_is_the_identity() -> None:
    x = torch.rand(N, 3, SIZE, SIZE)
    assert torch.equal(purify(random_unet_prior(), x, 0.0, 5), x)


def test_reverse_sde_regenerates_a_point_mass() -> None:
    """With data concentrated on one image, the reverse SDE from t* must end at that image whatever the input
    (a sign or scale error in the drift, the score or the noise would not)."""
    center = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    torch.manual_seed(0)
    x = torch.rand(N, 3, SIZE, SIZE)
    out = purify(gaussian_prior(center, 0.0), x, 0.3, 300)
    assert (out - (center + 1) / 2).abs().max() < 0.03
    assert (x - (center + 1) / 2).abs().mean() > 0.2  # the input was far from it


def test_reverse_sde_keeps_the_data_distribution() -> None:
    """Inputs drawn from N(μ, s²) come back distributed as N(μ, s²) (the reverse SDE inverts the forward one)."""
    mean, sd = torch.full((1, 3, 4, 4), 0.2), 0.3
    torch.manual_seed(1)
    x = mean + sd * torch.randn(4000, 3, 4, 4)
    out = purify(gaussian_prior(mean, sd), (x + 1) / 2, 0.5, 200) * 2 - 1
    assert float((out.mean() - 0.2).abs()) < 0.01
    assert float(out.std()) == pytest.approx(sd, rel=0.05)


def test_fixed_seed_repeats_and_draws_differ(ctx: harness.Context) -> None:
    pure = defense(ctx)
    x = ctx.sets.test.images[:N]
    torch.manual_seed(3)
    first = pure.purify_images(x, graph=False)
    torch.manual_seed(3)
    again = pure.purify_images(x, graph=False)
    other = pure.purify_images(x, graph=False)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    torch.manual_seed(3)
    logits = pure.predict(x)
    assert logits.shape == (N, 10) and pure.counter.forward == N


def test_full_gradient_is_nonzero_and_differs_from_bpda(ctx: harness.Context) -> None:
    pure = defense(ctx)
    x, y = ctx.sets.test.images[:N], ctx.sets.test.labels[:N]
    assert_surfaces_match_and_differ(pure, x, y)
    assert pure.attack_surface is not None and DiffPure.attack_surface is not DiffPure.predict


def test_gradient_checkpointing_gives_the_same_gradient(ctx: harness.Context) -> None:
    x, y = ctx.sets.test.images[:N], ctx.sets.test.labels[:N]
    grads = []
    for checkpointed in (False, True):
        surface = defense(ctx, grad_checkpoint=checkpointed).attack_surface()
        x_ = x.clone().requires_grad_(True)
        torch.manual_seed(7)
        (grad,) = torch.autograd.grad(F.cross_entropy(surface(x_), y), x_)
        grads.append(grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_unknown_surface_is_rejected(ctx: harness.Context) -> None:
    with pytest.raises(ValueError, match="adaptive"):
        defense(ctx, adaptive="adjoint").attack_surface()
