"""DiffCAP: the stopping rule (the first noising step whose embedding's cosine with the previous step's
exceeds τ, recomputed here from the closed-form diffusion), what it guarantees (later stops for a higher τ
on the same draw; the first step for τ below every cosine, the cap above), the reverse process from each
image's own stopping time (equal to DiffPure's solver at that time), and the adaptive surfaces, on the small
CLIP with a small untrained UNet as the prior (no prior is trained here)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from diffusion_helpers import assert_surfaces_match_and_differ, random_unet_prior
from vlmdefense.defenses import create_defense
from vlmdefense.defenses.training_free.diffcap import (
    DiffCAP,
    DiffCAPConfig,
    SteeringAttack,
    consecutive_cosines,
    noising_levels,
    stopping_steps,
)
from vlmdefense.defenses.training_free.diffusion_purification import diffuse, purify, reverse_sde
from vlmdefense.workbench import harness
from vlmdefense.workbench.diffusion_prior import DiffusionPrior

N = 24


@pytest.fixture(scope="module")
def ctx() -> harness.Context:
    return harness.setup("diffcap", "quick")


@pytest.fixture(scope="module")
def prior() -> DiffusionPrior:
    return random_unet_prior()


def defense(ctx: harness.Context, prior: DiffusionPrior, **changes: object) -> DiffCAP:
    config = DiffCAPConfig(reverse_dt=0.05)
    for key, value in changes.items():
        setattr(config, key, value)
    cap = DiffCAP(config)
    cap.attach_prior(prior)
    harness.fit(ctx, cap)
    return cap


def test_registered_config_and_fast_overrides() -> None:
    cap = create_defense("diffcap")
    assert isinstance(cap, DiffCAP) and cap.randomized and cap.kind == "inference"
    assert (cap.config.dt, cap.config.adaptive) == (0.01, "full")
    assert create_defense("diffcap", fast=True).config.reverse_dt > cap.config.reverse_dt
    assert create_defense("diffcap", tau="0.99").config.tau == pytest.approx(0.99)


def test_noising_levels(prior: DiffusionPrior) -> None:
    assert noising_levels(prior, 0.01, 0.3) == list(range(10, 301, 10))
    assert noising_levels(prior, 0.0004, 0.002) == [1, 2]  # no level twice
    with pytest.raises(ValueError, match="no noising step"):
        noising_levels(prior, 0.1, 0.05)


def test_stopping_time_is_the_first_step_whose_cosine_exceeds_tau(ctx: harness.Context, prior: DiffusionPrior) -> None:
    """Recompute the noisy images in closed form (√ᾱ x + √(1 − ᾱ) ε, one ε per image), embed them, and find the
    first step whose cosine with the previous step's (the input's for the first) is above τ: the rule must stop
    exactly there (the cap when none is), and the stops must differ between images."""
    x, embed = ctx.sets.test.images[:N], ctx.base.embed
    levels = noising_levels(prior, 0.01, 0.2)
    torch.manual_seed(0)
    noise = torch.randn_like(x)
    abar = prior.alphas_cumprod
    with torch.no_grad():
        views = [embed(x)] + [
            embed((((abar[n - 1].sqrt() * (x * 2 - 1) + (1 - abar[n - 1]).sqrt() * noise) + 1) / 2).clamp(0, 1))
            for n in levels
        ]
    cosines = torch.stack([F.cosine_similarity(views[k + 1], views[k], dim=-1) for k in range(len(levels))], 1)
    assert torch.allclose(cosines, consecutive_cosines(prior, embed, x, noise, levels), atol=1e-6)
    tau = float(cosines[:, 0].median())  # about half the images pass at the first step
    stop, passes = stopping_steps(prior, embed, x, noise, levels, tau)
    for i in range(N):
        above = (cosines[i] > tau).nonzero().flatten().tolist()
        assert int(stop[i]) == (above[0] if above else len(levels) - 1)
        assert bool((cosines[i, : int(stop[i])] <= tau).all())
    assert len(set(stop.tolist())) > 2  # per-image stopping times differ
    assert passes == N + sum(int((stop >= k).sum()) for k in range(len(levels) - 1))  # early exit per image


def test_what_the_rule_guarantees(ctx: harness.Context, prior: DiffusionPrior) -> None:
    """On one draw, a higher τ never stops earlier; τ below every cosine stops at the first step, τ above
    every cosine (> 1) runs to the cap."""
    x, embed = ctx.sets.test.images[:N], ctx.base.embed
    levels = noising_levels(prior, 0.01, 0.3)
    torch.manual_seed(1)
    noise = torch.randn_like(x)
    stops = [stopping_steps(prior, embed, x, noise, levels, tau)[0] for tau in (-1.0, 0.99, 0.995, 0.998, 0.999, 1.5)]
    for lower, higher in itertools.pairwise(stops):
        assert bool((lower <= higher).all())
    assert bool((stops[0] == 0).all()) and bool((stops[-1] == len(levels) - 1).all())


@pytest.mark.parametrize(("tau", "t_stop"), [(-1.0, 0.01), (1.5, 0.3)])
def test_reverse_process_starts_at_the_stopping_time(
    ctx: harness.Context, prior: DiffusionPrior, tau: float, t_stop: float
) -> None:
    """When every image stops at the same step, DiffCAP is DiffPure's solver at that time (same draws)."""
    cap = defense(ctx, prior, tau=tau)
    x = ctx.sets.test.images[:N]
    torch.manual_seed(2)
    out = cap.purify_images(x, graph=False)
    torch.manual_seed(2)
    expected = purify(prior, x, t_stop, round(t_stop / 0.05) or 1)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(cap.last["t_stop"], torch.full((N,), t_stop))


def test_images_are_purified_from_their_own_stopping_times(ctx: harness.Context, prior: DiffusionPrior) -> None:
    """Each image is diffused to its own stopping level with its forward draw and solved back from that time in
    ⌈t/reverse_dt⌉ steps (groups by level, lowest first, each drawing its Brownian increments in turn)."""
    cap = defense(ctx, prior)
    x = ctx.sets.test.images[:N]
    torch.manual_seed(3)
    noise = torch.randn_like(x)
    cap.config.tau = float(consecutive_cosines(prior, ctx.base.embed, x, noise, cap.levels())[:, 0].median())
    torch.manual_seed(3)
    out = cap.purify_images(x, graph=False)
    t_stop = cap.last["t_stop"]
    assert len(set(t_stop.tolist())) > 1
    torch.manual_seed(3)
    noise = torch.randn_like(x)
    expected = torch.zeros_like(x)
    for t in sorted(set(t_stop.tolist())):
        index = (t_stop == t).nonzero().flatten()
        level = round(t * 1000)
        t = level / 1000
        steps = math.ceil(round(t / 0.05, 6))
        draws = [torch.randn_like(x[index]) for _ in range(steps)]
        start = diffuse(prior, x[index] * 2 - 1, level, noise[index])
        expected[index] = (reverse_sde(prior, start, t, draws) + 1) / 2
    assert torch.allclose(out, expected, atol=1e-5)


def test_full_gradient_is_nonzero_and_differs_from_bpda(ctx: harness.Context, prior: DiffusionPrior) -> None:
    cap = defense(ctx, prior, tau=0.99)
    x, y = ctx.sets.test.images[:N], ctx.sets.test.labels[:N]
    assert_surfaces_match_and_differ(cap, x, y)


def test_steering_attack_raises_the_first_step_cosine(ctx: harness.Context, prior: DiffusionPrior) -> None:
    """With a steering weight that dwarfs the cross-entropy, the attack must raise the cosine that decides
    whether the rule stops at the first step, within the ε-ball."""
    cap = defense(ctx, prior, tau=0.9999)
    x, y = ctx.sets.test.images[:N], ctx.sets.test.labels[:N]
    attack = SteeringAttack(cap, eps=8 / 255, steps=5, weight=1e4, margin=1.0)
    torch.manual_seed(6)
    adversarial = attack(ctx.base, x, y)
    torch.manual_seed(7)
    noise = torch.randn_like(x)
    with torch.no_grad():
        before, after = cap.first_step_cosine(x, noise), cap.first_step_cosine(adversarial, noise)
    assert float(after.mean()) > float(before.mean())
    assert float((adversarial - x).abs().max()) <= 8 / 255 + 1e-6
