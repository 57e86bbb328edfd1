"""Training-time defenses without released code (R-Adapt, TIMA, Hierarchically Robust VLM): the defining
property of each, on the quick profile's scale."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from vlmdefense.defenses import create_defense
from vlmdefense.defenses.training_time.r_adapt import AdaptedTower, RAdapt, RAdaptConfig, gaussian_lowpass
from vlmdefense.workbench import harness


@pytest.fixture(scope="session")
def ctx() -> harness.Context:
    return harness.setup("r-adapt", "quick")


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(before: dict[str, torch.Tensor], model: torch.nn.Module) -> bool:
    after = model.state_dict()
    return all(torch.equal(before[k], after[k]) for k in before)


# ---- R-Adapt ------------------------------------------------------------------------------------------


def test_gaussian_filter_keeps_constants_and_removes_the_highest_frequency() -> None:
    constant = torch.full((1, 3, 16, 16), 0.7)
    assert torch.allclose(gaussian_lowpass(constant, 2.5), constant, atol=1e-6)
    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2).float().expand(1, 3, 16, 16)
    filtered = gaussian_lowpass(checker, 2.5)
    assert torch.allclose(filtered, torch.full_like(filtered, 0.5), atol=1e-3)  # Nyquist content is gone
    low = torch.cos(2 * torch.pi * torch.arange(16) / 16).expand(1, 3, 16, 16)  # one cycle per image
    assert torch.allclose(gaussian_lowpass(low, 2.5), low * torch.exp(torch.tensor(-1 / (2 * 2.5**2))), atol=1e-5)


def test_adapted_tower_without_filter_or_anchor_is_the_original_tower(ctx) -> None:
    images = ctx.sets.test.images[:6]
    tower = AdaptedTower(ctx.clip, cutoff=0.0, alpha=0.0, mix="convex")
    anchor = torch.randn(17, 96)
    assert torch.allclose(tower(images, anchor), ctx.clip.encode_images(images), atol=1e-5)
    assert not torch.allclose(
        AdaptedTower(ctx.clip, 2.5, 0.0, "convex")(images, anchor), ctx.clip.encode_images(images)
    )


def test_convex_anchor_makes_the_first_attention_block_input_insensitive(ctx) -> None:
    images = ctx.sets.test.images[:4]
    tower = AdaptedTower(ctx.clip, cutoff=0.0, alpha=1.0, mix="convex")
    anchor = torch.randn(17, 96)
    responses = tower.mixed(tower.first_attention(tower.tokens(images)), anchor)
    assert torch.allclose(responses, anchor.expand_as(responses))
    half = AdaptedTower(ctx.clip, cutoff=0.0, alpha=0.5, mix="convex")
    original = half.first_attention(half.tokens(images))
    assert torch.allclose(half.mixed(original, anchor), 0.5 * original + 0.5 * anchor)
    additive = AdaptedTower(ctx.clip, cutoff=0.0, alpha=2.0, mix="additive")
    assert torch.allclose(additive.mixed(original, anchor), original + 2.0 * anchor)


@pytest.fixture(scope="session")
def r_adapt_fitted(ctx) -> tuple[RAdapt, bool]:
    before = _snapshot(ctx.clip.model)
    defense = create_defense("r-adapt", **{**ctx.params, "train_limit": 32})
    harness.fit(ctx, defense)
    assert isinstance(defense, RAdapt)
    return defense, _unchanged(before, ctx.clip.model)


def test_r_adapt_learns_only_the_anchor(ctx, r_adapt_fitted) -> None:
    defense, unchanged = r_adapt_fitted
    assert unchanged, "R-Adapt changed a CLIP weight"
    assert defense.anchor is not None and defense.initial_anchor is not None
    assert defense.anchor.shape == (17, 96)
    assert not torch.equal(defense.anchor, defense.initial_anchor), "the anchor was not optimised"
    modules = [m for m in vars(defense).values() if isinstance(m, torch.nn.Module)]
    clip_ids = {id(p) for p in ctx.clip.model.parameters()}
    assert modules and all(id(p) in clip_ids for m in modules for p in m.parameters())
    images = ctx.sets.test.images[:8]
    first, second = defense.predict(images), defense.predict(images)
    assert first.shape == (8, 10) and torch.equal(first, second)
    x = images.clone().requires_grad_(True)
    defense.attack_surface()(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # white-box through the filter and the anchor


def test_r_adapt_training_free_anchor_is_the_white_image_response(ctx) -> None:
    defense = RAdapt(RAdaptConfig(variant="clip", mix="convex"))
    findings = defense.fit(ctx.fit_data())
    assert findings["loss_curve"] == [] and findings["train_images"] == 0
    tower = AdaptedTower(ctx.clip, 0.0, 0.0, "convex")
    white = torch.ones(1, 3, 16, 16)
    assert defense.anchor is not None
    assert torch.allclose(defense.anchor, tower.first_attention(tower.tokens(white))[0])
    # at alpha = 1 (convex) a white image goes through the first block unchanged by the anchor
    plain = AdaptedTower(ctx.clip, 0.0, 0.0, "convex")
    assert torch.allclose(defense.tower(white, defense.anchor), plain(white, None), atol=1e-5)
    with pytest.raises(ValueError):
        RAdapt(dataclasses.replace(RAdaptConfig(), variant="model"))


def test_r_adapt_step_lowers_its_adversarial_objective(ctx) -> None:
    """One anchor step of R-Adapt+ lowers the embedding loss at fixed adversarial images."""
    from vlmdefense.defenses.training_time.r_adapt import AnchorTask

    defense = RAdapt(RAdaptConfig())
    defense.bind(ctx.base)
    assert defense.anchor is not None
    anchor = torch.nn.Parameter(defense.anchor.clone())
    task = AnchorTask(defense, anchor, list(range(10)), "embedding")
    images, labels = ctx.seen_train.images[:16], ctx.seen_train.labels[:16]
    with torch.no_grad():
        state = task.prepare(images, labels)
    x_adv = (images + 8 / 255 * torch.randn_like(images).sign()).clamp(0, 1)
    loss, _ = task.training_loss(state, x_adv)
    loss.backward()
    assert anchor.grad is not None and anchor.grad.abs().sum() > 0
    with torch.no_grad():
        stepped = anchor - 1e-3 * anchor.grad / anchor.grad.norm()
        after = (defense.tower(x_adv, stepped, normalize=False) - state["original"]).pow(2).sum(-1).mean()
    assert after < loss


# ---- TIMA ---------------------------------------------------------------------------------------------


def test_hyperspherical_energy_is_lower_for_spread_embeddings() -> None:
    from vlmdefense.defenses.training_time.tima import hyperspherical_energy

    spread = torch.eye(4)
    clustered = F.normalize(torch.eye(4) + 3.0, dim=-1)
    for power in (0.0, 1.0, 2.0):
        assert hyperspherical_energy(spread, power) < hyperspherical_energy(clustered, power)


def test_adaptive_margins_grow_with_text_similarity() -> None:
    from vlmdefense.defenses.training_time.tima import adaptive_margins, margin_cross_entropy

    text = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    margins = adaptive_margins(text, 0.2)
    assert torch.equal(margins.diagonal(), torch.zeros(3))
    assert torch.isclose(margins[0, 1], torch.tensor(0.2)) and margins[0, 2] == 0  # closest / farthest pair
    assert torch.equal(margins, margins.T) and margins.min() >= 0 and margins.max() <= 0.2 + 1e-6
    cosines, labels = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    plain = F.cross_entropy(10 * cosines, labels)
    assert torch.isclose(margin_cross_entropy(cosines, labels, 0 * margins, 10.0), plain)
    assert margin_cross_entropy(cosines, labels, margins, 10.0) > plain


@pytest.fixture(scope="session")
def tima_fitted(ctx):
    before = _snapshot(ctx.clip.model)
    defense = create_defense("tima", **{**ctx.params, "train_limit": 32, "text_steps": 3, "text_lr": 1e-3})
    harness.fit(ctx, defense)
    return defense, dict(ctx.findings), _unchanged(before, ctx.clip.model)


def test_tima_text_stage_spreads_the_classes_and_starts_from_zero_distillation(ctx, tima_fitted) -> None:
    defense, findings, unchanged = tima_fitted
    assert unchanged, "TIMA changed the original model"
    energy = findings["class_text_energy"]
    assert energy["tuned"] < energy["original"], "the energy term did not spread the class embeddings"
    assert findings["text_steps"][0]["text_kd"] == pytest.approx(0.0, abs=1e-6)  # the copy starts as the original
    assert not torch.allclose(defense.classifier.text_weights, ctx.base.text_weights)
    text_moved = any(
        not torch.equal(v, ctx.clip.model.state_dict()[k])
        for k, v in defense.classifier.model.state_dict().items()
        if not k.startswith(("visual.", "logit_"))
    )
    assert text_moved and defense.predict(ctx.sets.test.images[:4]).shape == (4, 10)


def test_tima_image_distillation_is_zero_before_tuning(ctx, tima_fitted) -> None:
    from vlmdefense.defenses.training_time.tima import TIMA

    fitted, _, _ = tima_fitted
    defense = TIMA(fitted.config)
    defense.original, defense.train_classes, defense.margins = ctx.base, list(range(10)), fitted.margins
    defense.classifier = defense._tuned_copy(ctx.fit_data())  # margins set: the untuned copy, no text stage
    defense.classifier.text_weights = fitted.classifier.text_weights
    images, labels = ctx.seen_train.images[:8], ctx.seen_train.labels[:8]
    with torch.no_grad():
        batch = defense.reference({"images": images, "labels": labels})
        _, parts = defense.training_loss(batch, images)
    assert parts["image_kd"] == pytest.approx(0.0, abs=1e-6)
    assert parts["margin_ce_adv"] > F.cross_entropy(defense._logits(images), labels).item()


# ---- Hierarchically robust ------------------------------------------------------------------------------


def test_poincare_midpoints_and_distances() -> None:
    from vlmdefense.defenses.training_time.hier_robust import distance, expmap0, gyromidpoint, tangent_norm

    x = expmap0(torch.tensor([[0.6, 0.2, 0.0]]))
    assert torch.allclose(gyromidpoint(x.repeat(3, 1)), x[0], atol=1e-5)
    assert torch.allclose(gyromidpoint(torch.cat([x, -x])), torch.zeros(3), atol=1e-6)
    origin = torch.zeros(1, 3)
    assert torch.allclose(distance(origin, x), 2 * tangent_norm(x), atol=1e-5)
    y = expmap0(torch.tensor([[-0.3, 0.5, 0.1]]))
    assert torch.allclose(distance(x, y), distance(y, x), atol=1e-5) and distance(x, x).item() < 1e-3


def test_hierarchy_puts_parents_nearer_the_origin_and_ranks_leaves_like_the_cosine(ctx) -> None:
    from vlmdefense.defenses.training_time.hier_robust import DIGIT_TREES, build_hierarchy, level_logits, level_loss

    text = ctx.base.text_weights
    for tree in DIGIT_TREES.values():
        h = build_hierarchy(text, tree, 1.0)
        assert [len(n) for n in h.nodes] == [len(level) for level in tree]
        assert all(a < b for a, b in zip(h.radii, h.radii[1:], strict=False)), (
            "coarser levels must sit nearer the origin"
        )
        for level in range(len(tree) - 1):  # every parent is nearer the origin than each of its children
            for k, node in enumerate(tree[level]):
                children = [j for j, child in enumerate(tree[level + 1]) if set(child) <= set(node)]
                assert all(h.nodes[level][k].norm() < h.nodes[level + 1][j].norm() for j in children)
    h = build_hierarchy(text, DIGIT_TREES["parity"], 1.0)
    features = ctx.base.embed(ctx.sets.test.images[:32])
    leaf = level_logits(features, h, 2, 0.1)[:, :10]
    assert torch.equal(leaf.argmax(-1), ctx.base.logits_from_embeddings(features).argmax(-1))
    labels = ctx.sets.test.labels[:32]
    assert torch.isfinite(level_loss(features, labels, h, 1, 0.1))
    # the attack objective covers the coarse levels: a parent-level loss has its own gradient
    f = features.clone().requires_grad_(True)
    (g_parent,) = torch.autograd.grad(level_loss(f, labels, h, 0, 0.1), f)
    (g_leaf,) = torch.autograd.grad(level_loss(f, labels, h, 2, 0.1), f)
    assert g_parent.abs().sum() > 0 and not torch.allclose(g_parent, g_leaf)


def test_hier_robust_fit_trains_every_level_of_every_tree(ctx) -> None:
    before = _snapshot(ctx.clip.model)
    defense = create_defense("hier-robust", **{**ctx.params, "train_limit": 32})
    harness.fit(ctx, defense)
    assert _unchanged(before, ctx.clip.model)
    row = ctx.findings["first_epoch"]
    assert {"parity_level0", "parity_level1", "parity_level2", "shape_level0", "shape_level1", "align"} <= set(row)
    assert ctx.findings["hierarchy"]["parity"]["nodes_per_level"] == [2, 4, 10]
    with pytest.raises(ValueError):
        create_defense("hier-robust", trees=["wordnet"])
