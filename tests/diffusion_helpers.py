"""Shared pieces of the diffusion tests: a tiny random-weight prior of the real network class."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from vlmdefense.workbench.diffusion_prior import DiffusionPrior, PriorRecipe, linear_betas


def random_unet_prior() -> DiffusionPrior:
    """A small ``UNet2DModel`` with seeded random weights on the prior's linear schedule (fast, untrained)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    recipe = PriorRecipe(channels=(8, 16), norm_groups=4)
    unet = UNet2DModel(**recipe.unet_config()).eval().requires_grad_(False)
    return DiffusionPrior(unet, linear_betas(recipe), "random")


def assert_surfaces_match_and_differ(defense: Any, x: torch.Tensor, y: torch.Tensor) -> None:
    """Each attack surface of a purifier computes the defended pipeline's forward (same noise draws) and gives a
    finite, non-zero input gradient; the full gradient through the sampler differs from BPDA's."""
    grads = {}
    for name, surface in defense.surfaces().items():
        x_ = x.clone().requires_grad_(True)
        torch.manual_seed(5)
        logits = surface(x_)
        torch.manual_seed(5)
        assert torch.allclose(logits, defense.predict(x), atol=1e-5)  # the forward is the defended pipeline's
        (grads[name],) = torch.autograd.grad(F.cross_entropy(logits, y), x_)
    assert all(bool(g.isfinite().all()) and float(g.abs().sum()) > 0 for g in grads.values())
    assert F.cosine_similarity(grads["full"].flatten(), grads["bpda"].flatten(), dim=0) < 0.99
