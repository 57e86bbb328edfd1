"""The small diffusion prior: a tiny recipe trained into the test run's cache, its card, its cache key, the
one loader (cached prior or a local diffusers directory, never a download)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from vlmdefense.workbench.diffusion_prior import (
    PriorRecipe,
    ensure_prior,
    load_diffusion_prior,
    prior_card,
    prior_paths,
)

TINY = PriorRecipe(channels=(8, 16), norm_groups=4, steps=6, batch_size=32)


@pytest.fixture(scope="module")
def card() -> dict:
    return prior_card(TINY)


def test_recipe_key_names_the_cache_folder() -> None:
    assert TINY.key() != replace(TINY, seed=1).key() != replace(TINY, steps=7).key()
    assert TINY.key() == PriorRecipe(channels=(8, 16), norm_groups=4, steps=6, batch_size=32).key()
    weights, card_path, grid = prior_paths(TINY)
    assert weights.parent.name.endswith(TINY.key()) and card_path.parent == grid.parent == weights.parent


def test_card_records_recipe_seed_loss_curve_grid_and_hash(card: dict) -> None:
    import hashlib

    weights, _, grid = prior_paths(TINY)
    assert card["recipe"]["steps"] == 6 and card["seed"] == TINY.seed and card["recipe_key"] == TINY.key()
    assert card["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert sum(1 for _ in card["loss_curve"]["mean_loss"]) * card["loss_curve"]["every_steps"] >= 6
    assert all(v > 0 for v in card["loss_curve"]["mean_loss"]) and card["metrics"]["test_denoising_mse"] > 0
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(weights.parent.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_loader_returns_the_cached_prior_without_training_again(card: dict) -> None:
    weights = prior_paths(TINY)[0]
    stamp = weights.stat().st_mtime_ns
    prior = load_diffusion_prior(None, recipe=TINY)
    assert weights.stat().st_mtime_ns == stamp and prior.card["sha256"] == card["sha256"]
    assert prior.timesteps == 1000 and prior.beta_range == pytest.approx((0.1, 20.0))
    assert prior.image_size == 16 and not any(p.requires_grad for p in prior.unet.parameters())
    x = torch.zeros(2, 3, 16, 16)
    assert prior.noise(x, torch.tensor([0, 999])).shape == x.shape


def test_training_is_seeded(card: dict) -> None:
    weights = prior_paths(TINY)[0]
    first = torch.load(weights, weights_only=True)
    weights.write_bytes(b"corrupt")  # no longer matches its card: trained again, to the same weights
    ensure_prior(TINY, progress=False)
    again = torch.load(weights, weights_only=True)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert json.loads(prior_paths(TINY)[1].read_text())["sha256"] == card["sha256"]


def test_local_checkpoint_directory_and_missing_path(tmp_path: Path) -> None:
    from diffusers import UNet2DModel

    unet = UNet2DModel(**PriorRecipe(channels=(8, 16), norm_groups=4).unet_config())
    unet.save_pretrained(tmp_path / "unet")
    (tmp_path / "scheduler").mkdir()
    scheduler = {"num_train_timesteps": 500, "beta_start": 0.0002, "beta_end": 0.04, "beta_schedule": "linear"}
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    prior = load_diffusion_prior(tmp_path)
    assert prior.timesteps == 500 and prior.beta_range == pytest.approx((0.1, 20.0))
    assert prior.source.endswith("unet")
    with pytest.raises(FileNotFoundError):
        load_diffusion_prior(tmp_path / "absent")
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"beta_schedule": "squaredcos_cap_v2"}))
    with pytest.raises(ValueError, match="linear"):
        load_diffusion_prior(tmp_path)
