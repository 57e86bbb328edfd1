"""CLIPure-Diff: the small embedding prior (a tiny recipe trained into the test run's cache: card, cache key,
the one loader) and the purification's defining properties, on an untrained small CLIP (no CLIP is trained)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from vlmdefense.defenses import create_defense
from vlmdefense.defenses.training_free.clipure import CLIPure, CLIPureConfig
from vlmdefense.workbench.clip import LoadedClip
from vlmdefense.workbench.data import digit_prompts, load_digits_split
from vlmdefense.workbench.embedding_prior import (
    EmbeddingPrior,
    EmbeddingPriorRecipe,
    clip_identity,
    cosine_alphas_cumprod,
    embedding_prior_paths,
    ensure_embedding_prior,
    load_embedding_prior,
)
from vlmdefense.workbench.evaluation import ZeroShotClassifier
from vlmdefense.workbench.models import OPENAI_MEAN, OPENAI_STD, SMALL_CLIP, register_small_clip

TINY = EmbeddingPriorRecipe(width=32, blocks=1, time_dim=16, steps=60, batch_size=64, shifted_copies=0)
N = 16


@pytest.fixture(scope="module")
def clip() -> LoadedClip:
    register_small_clip()
    torch.manual_seed(0)
    model = open_clip.create_model(SMALL_CLIP, pretrained=None, device="cpu").eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(SMALL_CLIP)
    return LoadedClip(SMALL_CLIP, "untrained", model, tokenizer, OPENAI_MEAN, OPENAI_STD, 16, "cpu")


@pytest.fixture(scope="module")
def prior(clip: LoadedClip) -> EmbeddingPrior:
    return load_embedding_prior(None, clip=clip, recipe=TINY)


@pytest.fixture(scope="module")
def base(clip: LoadedClip) -> ZeroShotClassifier:
    return ZeroShotClassifier(clip, digit_prompts())


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    test = load_digits_split(16)[1]
    return test.images[:N], test.labels[:N]


def clipure(base: ZeroShotClassifier, prior: EmbeddingPrior | None = None, **changes: object) -> CLIPure:
    defense = CLIPure(dataclasses.replace(CLIPureConfig(), **changes))  # type: ignore[arg-type]
    defense.bind(base)
    if prior is not None:
        defense.attach_prior(prior)
    return defense


def test_card_records_recipe_seed_loss_curve_and_hash(clip: LoadedClip, prior: EmbeddingPrior) -> None:
    weights, card_path = embedding_prior_paths(TINY, clip_identity(clip))
    card = json.loads(card_path.read_text())
    assert prior.card == card and prior.source == str(weights.parent)
    assert (
        card["recipe"]["steps"] == 60
        and card["seed"] == TINY.seed
        and card["recipe_key"] == TINY.key(clip_identity(clip))
    )
    assert card["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert card["clip"] == {"name": SMALL_CLIP, "identity": f"{SMALL_CLIP}/untrained"}
    curve = card["loss_curve"]
    assert len(curve["mean_loss"]) * curve["every_steps"] >= 60 and curve["mean_loss"][-1] < curve["mean_loss"][0]
    assert 0 < card["metrics"]["test_denoising_mse"] < card["metrics"]["test_denoising_mse_late"]
    assert card["embedding_dim"] == 64 and prior.scale == pytest.approx(8.0) and prior.timesteps == 1000
    assert not list(weights.parent.glob(".*.tmp"))  # atomic writes leave no temporaries
    assert not any(p.requires_grad for p in prior.net.parameters())


def test_cache_key_names_recipe_and_clip(clip: LoadedClip, prior: EmbeddingPrior) -> None:
    key = TINY.key(clip_identity(clip))
    assert key != TINY.key("another clip") and key != dataclasses.replace(TINY, seed=1).key(clip_identity(clip))
    assert Path(prior.source).name.endswith(key)
    weights = embedding_prior_paths(TINY, clip_identity(clip))[0]
    stamp, first = weights.stat().st_mtime_ns, torch.load(weights, weights_only=True)
    assert load_embedding_prior(None, clip=clip, recipe=TINY).card["sha256"] == prior.card["sha256"]
    assert weights.stat().st_mtime_ns == stamp  # loaded from the cache, not trained again
    weights.write_bytes(b"corrupt")  # no longer matches its card: trained again, to the same weights
    ensure_embedding_prior(clip, TINY, progress=False)
    again = torch.load(weights, weights_only=True)
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_cosine_schedule_ends_near_pure_noise() -> None:
    abar = cosine_alphas_cumprod(1000)
    assert abar[0] > 0.9999 and (abar[1:] < abar[:-1]).all() and abar[899] < 0.03 and abar[-1] < 1e-6


def test_loader_takes_a_local_folder_and_refuses_other_checkpoints(prior: EmbeddingPrior, tmp_path: Path) -> None:
    copy = tmp_path / "prior"
    shutil.copytree(prior.source, copy)
    loaded = load_embedding_prior(copy)
    assert loaded.source == str(copy) and loaded.card["sha256"] == prior.card["sha256"]
    x = torch.randn(3, 64)
    steps, noise = torch.tensor([0, 500, 999]), torch.randn(3, 64)
    assert torch.equal(loaded.loss(x, steps, noise), prior.loss(x, steps, noise))
    with pytest.raises(FileNotFoundError):
        load_embedding_prior(tmp_path / "missing")
    dalle2 = tmp_path / "prior_aes_finetune.pth"
    torch.save({"ema_model": {}}, dalle2)
    with pytest.raises(ValueError, match="DALL-E 2"):
        load_embedding_prior(dalle2)
    with pytest.raises(ValueError, match="CLIP"):
        load_embedding_prior(None)


def test_diff_needs_a_prior_on_another_clip(clip: LoadedClip) -> None:
    other = ZeroShotClassifier(dataclasses.replace(clip, name="ViT-B-32"), digit_prompts())
    with pytest.raises(ValueError, match="DALL-E 2"):
        clipure(other, variant="diff").load_prior()
    with pytest.raises(ValueError, match="variant"):
        CLIPure(CLIPureConfig(variant="dalle"))


def test_a_small_diff_step_descends_the_prior_loss_of_its_draw(
    base: ZeroShotClassifier, prior: EmbeddingPrior, images: tuple[torch.Tensor, torch.Tensor]
) -> None:
    diff = clipure(base, prior, variant="diff")
    with torch.no_grad():
        e = base.embed(images[0])
    torch.manual_seed(7)
    moved = diff.purify(e, steps=1, step_size=0.02)
    torch.manual_seed(7)  # the draws of that step: its timestep, then its noise
    step = torch.randint(900, 1000, ()).expand(N)
    noise = torch.randn_like(e)
    with torch.no_grad():
        before, after = diff.prior_loss(e, step, noise), diff.prior_loss(moved, step, noise)
    assert (after < before).all()
    ascent = clipure(base, prior, variant="diff", step_size=-0.02)
    torch.manual_seed(7)
    with torch.no_grad():
        assert (diff.prior_loss(ascent.purify(e, steps=1), step, noise) > before).all()


def test_small_diff_steps_lower_the_expected_late_loss(
    base: ZeroShotClassifier, prior: EmbeddingPrior, images: tuple[torch.Tensor, torch.Tensor]
) -> None:
    diff = clipure(base, prior, variant="diff", step_size=0.05)
    with torch.no_grad():
        e = base.embed(images[0])
    torch.manual_seed(0)
    purified = diff.purify(e)

    def expected(x: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(1)
        draws = [
            (torch.randint(900, 1000, (N,), generator=generator), torch.randn(e.shape, generator=generator))
            for _ in range(64)
        ]
        with torch.no_grad():
            return torch.stack([diff.prior_loss(x, t, z) for t, z in draws]).mean(0)

    assert expected(purified).mean() < expected(e).mean()


@pytest.mark.parametrize("variant", ["cos", "diff"])
def test_purification_keeps_the_norm(base: ZeroShotClassifier, prior: EmbeddingPrior, variant: str) -> None:
    e = 2.5 * F.normalize(torch.randn(N, 64), dim=-1)
    for scope in ("sample", "batch"):
        defense = clipure(base, prior, variant=variant, norm_scope=scope)
        for step in (30.0, 0.5):  # the official step can bring Cos back to its start (a period-2 orbit)
            out = defense.purify(e, step_size=step)
            assert torch.allclose(out.norm(dim=-1), e.norm(dim=-1), atol=1e-5) and not out.requires_grad
        assert (F.cosine_similarity(out, e) < 0.999).all()  # it moved


def test_diff_is_random_and_repeats_under_a_seed(
    base: ZeroShotClassifier, prior: EmbeddingPrior, images: tuple[torch.Tensor, torch.Tensor]
) -> None:
    diff = clipure(base, prior, variant="diff")
    assert diff.randomized and not CLIPure.randomized and not clipure(base).randomized
    x = images[0]
    torch.manual_seed(3)
    first = diff.predict(x)
    second = diff.predict(x)
    torch.manual_seed(3)
    assert not torch.equal(first, second) and torch.equal(diff.predict(x), first)
    assert diff.adaptive_surface_name() == "full" and clipure(base).adaptive_surface_name() == "bpda"


def test_cos_variant_is_the_earlier_update(base: ZeroShotClassifier, images: tuple[torch.Tensor, torch.Tensor]) -> None:
    cos = create_defense("clipure")
    assert (
        isinstance(cos, CLIPure)
        and cos.config.variant == "cos"
        and (cos.config.steps, cos.config.step_size) == (10, 30.0)
    )
    cos.bind(base)
    with torch.no_grad():
        e = base.embed(images[0])
    t = F.normalize(cos.blank_embedding, dim=-1)  # type: ignore[arg-type]
    expected = e.clone()
    for _ in range(10):  # the update as CLIPure-Cos had it before the variant parameter
        r = expected.norm(dim=-1, keepdim=True)
        u = expected / r
        ascent = t - (u * t).sum(dim=-1, keepdim=True) * u
        expected = r * F.normalize(u + 30.0 * ascent / ascent.norm(dim=-1, keepdim=True), dim=-1)
    assert torch.equal(cos.purify(e), expected)
    assert cos.prior is None  # Cos needs no prior


@pytest.mark.parametrize("variant", ["cos", "diff"])
def test_full_surface_differentiates_the_steps(
    base: ZeroShotClassifier, prior: EmbeddingPrior, images: tuple[torch.Tensor, torch.Tensor], variant: str
) -> None:
    defense = clipure(base, prior, variant=variant)
    x, y = images
    grads = {}
    surfaces = {**defense.surfaces(), "official": defense.official_graph_surface()}
    for name, surface in surfaces.items():
        x_ = x.clone().requires_grad_(True)
        torch.manual_seed(5)
        logits = surface(x_)
        torch.manual_seed(5)
        with torch.no_grad():
            assert torch.allclose(logits, defense.predict(x), atol=1e-4)  # each surface's forward is the prediction
        (grads[name],) = torch.autograd.grad(F.cross_entropy(logits, y), x_)
    norms = {k: float(g.flatten(1).norm(dim=1).mean()) for k, g in grads.items()}
    assert all(torch.isfinite(g).all() for g in grads.values()) and norms["full"] > 0
    assert not torch.allclose(grads["full"], grads["bpda"], rtol=1e-2, atol=1e-6)
    assert norms["official"] < 1e-3 * norms["full"]  # directions held constant: each re-projection scales by ~1/30
