"""Shared pieces of the diffusion tests: a tiny random-weight prior of the real network class."""

from __future__ import annotations

import torch

from vlmdefense.workbench.diffusion_prior import DiffusionPrior, PriorRecipe, linear_betas


def random_unet_prior() -> DiffusionPrior:
    """A small ``UNet2DModel`` with seeded random weights on the prior's linear schedule (fast, untrained)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    recipe = PriorRecipe(channels=(8, 16), norm_groups=4)
    unet = UNet2DModel(**recipe.unet_config()).eval().requires_grad_(False)
    return DiffusionPrior(unet, linear_betas(recipe), "random")
