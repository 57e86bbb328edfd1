"""Feature-purification defenses that steer CLIP's image embedding from transformed copies of the input
(AGC, AOM, ATAC) and their shared geometry, on the quick profile's scale."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlmdefense.defenses.training_free.agc import AGC
from vlmdefense.defenses.training_free.aom import AOM, AOMConfig
from vlmdefense.defenses.training_free.atac import ATAC, ATACConfig, shifted
from vlmdefense.defenses.training_free.feature_steering import (
    EmbeddingSteering,
    geodesic_angle,
    geodesic_step,
    mean_pairwise_cosine,
    perspective_corners,
    random_perspective,
    unit,
    warp_perspective,
)
from vlmdefense.workbench import harness

N = 12


@pytest.fixture(scope="session")
def ctx() -> harness.Context:
    return harness.setup("agc", "quick")


@pytest.fixture(scope="session")
def batch(ctx: harness.Context) -> tuple[torch.Tensor, torch.Tensor]:
    return ctx.sets.test.images[:N], ctx.sets.test.labels[:N]


def bound(ctx: harness.Context, cls: type[EmbeddingSteering], **params: object) -> EmbeddingSteering:
    defense = cls.from_params({**ctx.params, **params})
    harness.fit(ctx, defense)
    return defense


# ---- shared geometry -----------------------------------------------------------------------------------


def test_warp_matches_torchvision_perspective() -> None:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16)
    corners = perspective_corners(4, 16, 16, 0.5, x.device)
    ours = warp_perspective(x, corners)
    start = [[0, 0], [15, 0], [15, 15], [0, 15]]
    for i in range(4):
        ref = TF.perspective(x[i], start, corners[i].long().tolist(), interpolation=InterpolationMode.BILINEAR)
        assert torch.allclose(ours[i], ref, atol=1e-4)
    identity = torch.tensor([[0.0, 0.0], [15.0, 0.0], [15.0, 15.0], [0.0, 15.0]]).expand(4, 4, 2)
    assert torch.allclose(warp_perspective(x, identity), x, atol=1e-5)  # corners in place: no warp


def test_perspective_corners_stay_within_the_distortion() -> None:
    torch.manual_seed(0)
    c = perspective_corners(500, 16, 16, 0.25, torch.device("cpu"))  # offsets of at most 2 px, inward
    assert c[:, [0, 3], 0].min() >= 0 and c[:, [0, 3], 0].max() <= 2
    assert c[:, [1, 2], 0].min() >= 13 and c[:, [1, 2], 0].max() <= 15
    assert c[:, [0, 1], 1].max() <= 2 and c[:, [2, 3], 1].min() >= 13
    views = random_perspective(torch.rand(3, 3, 16, 16), 5, 0.25)
    assert views.shape == (5, 3, 3, 16, 16)
    assert not torch.allclose(views[0], views[1])  # a fresh draw per view


def test_geodesic_step_turns_by_factor_times_angle_in_the_plane() -> None:
    torch.manual_seed(0)
    u, a = unit(torch.randn(6, 8)), unit(torch.randn(6, 8))
    angle = geodesic_angle(u, a)
    for factor in (0.0, 0.45, 1.0, 2.25):
        moved = geodesic_step(u, a, factor)
        assert torch.allclose(moved.norm(dim=-1), torch.ones(6), atol=1e-5)
        turned = factor * angle
        turned = torch.where(turned > math.pi, 2 * math.pi - turned, turned)  # past the antipode
        assert torch.allclose(geodesic_angle(u, moved), turned, atol=1e-4)
        if factor <= 1:  # between u and a: the angles add up
            assert torch.allclose(geodesic_angle(moved, a), (1 - factor) * angle, atol=1e-4)
        # the moved vector lies in the plane spanned by u and a
        basis = torch.linalg.qr(torch.stack([u, a], dim=-1)).Q
        residual = moved - (basis @ (basis.transpose(-1, -2) @ moved.unsqueeze(-1))).squeeze(-1)
        assert residual.norm(dim=-1).max() < 1e-5
    assert torch.allclose(geodesic_step(u, u, 2.0), u)  # nothing to turn towards
    grad = torch.autograd.grad(geodesic_step(u.requires_grad_(True), u.detach(), 1.5).sum(), u)[0]
    assert torch.isfinite(grad).all()


def test_mean_pairwise_cosine() -> None:
    same = torch.ones(3, 2, 4)
    assert torch.allclose(mean_pairwise_cosine(same), torch.ones(2))
    opposite = torch.stack([torch.tensor([[1.0, 0.0]]), torch.tensor([[-2.0, 0.0]])])
    assert torch.allclose(mean_pairwise_cosine(opposite), torch.tensor([-1.0]))
    with pytest.raises(ValueError):
        mean_pairwise_cosine(torch.ones(1, 2, 4))


# ---- AGC -------------------------------------------------------------------------------------------------


def test_agc_defaults_fast_and_randomized() -> None:
    cfg = AGC.from_params({}).config
    assert (cfg.n_views, cfg.beta_clean, cfg.beta_adv, cfg.gamma_attack, cfg.gamma_trust) == (32, 0.45, 2.25, 0.9, 1.0)
    assert AGC.from_params({"fast": True}).n_views < 32 and AGC.randomized and AGC.kind == "inference"


def test_agc_beta_follows_the_attack_and_trust_scores() -> None:
    agc = AGC()
    torch.manual_seed(0)
    u = unit(torch.randn(4, 16))
    views_on_input = u.unsqueeze(0).expand(5, 4, 16)
    assert torch.allclose(agc.beta(u, views_on_input), torch.full((4,), 0.45), atol=1e-5)  # clean-looking: beta_clean
    # views that agree with each other and are far from the input (attack score 1, trust 1): beta_adv
    other = unit(torch.randn(4, 16) - 10 * u)
    far = unit(other - (other * u).sum(-1, keepdim=True) * u).unsqueeze(0).expand(5, 4, 16)
    assert torch.allclose(agc.beta(u, far), torch.full((4,), 2.25), atol=1e-4)
    # views scattered around the input: lower trust, smaller beta than agreeing views at the same distance
    scattered = unit(u.unsqueeze(0) + 2.0 * torch.randn(5, 4, 16))
    assert (agc.beta(u, scattered) < agc.beta(u, far)).all()
    attack, trust = agc.scores(u, scattered)
    expected = 0.45 + 1.8 * (attack.pow(0.9) * trust).clamp(0, 1)
    assert torch.allclose(agc.beta(u, scattered), expected, atol=1e-5)


def test_agc_steer_turns_towards_the_anchor_by_beta() -> None:
    agc = AGC()
    torch.manual_seed(1)
    u = unit(torch.randn(3, 16))
    views = unit(u.unsqueeze(0) + 0.8 * torch.randn(6, 3, 16))
    anchor = unit(views.mean(dim=0))
    corrected = agc.steer(u, views)
    beta = agc.beta(u, views)
    assert torch.allclose(geodesic_angle(u, corrected), beta * geodesic_angle(u, anchor), atol=1e-4)
    assert torch.allclose(agc.steer(u, u.unsqueeze(0).expand(6, 3, 16)), u, atol=1e-6)  # views on the input: unchanged


def test_agc_pipeline_counts_randomness_and_gradients(
    ctx: harness.Context, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = batch
    agc = bound(ctx, AGC, n_views=3)
    before = {k: v.clone() for k, v in ctx.base.state_dict().items()}
    agc.counter.images = agc.counter.forward = agc.counter.backward = 0
    torch.manual_seed(0)
    first = agc.predict(x)
    assert first.shape == (N, 10) and torch.isfinite(first).all()
    assert agc.counter.per_image() == (4, 0)
    assert not torch.allclose(first, agc.predict(x))  # fresh warps at every call
    torch.manual_seed(0)
    assert torch.allclose(first, agc.predict(x))  # ... drawn from the global generator
    torch.manual_seed(0)
    embedding, views = agc.readings(x)
    torch.manual_seed(0)
    expected = ctx.base.logits_from_embeddings(agc.steer(embedding, views))
    assert torch.allclose(agc.predict(x), expected, atol=1e-5)
    x_ = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(agc.attack_surface()(x_), y), x_)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(torch.equal(before[k], v) for k, v in ctx.base.state_dict().items())  # CLIP untouched


# ---- AOM -------------------------------------------------------------------------------------------------


def test_aom_anchor_and_one_step_interpolation() -> None:
    torch.manual_seed(0)
    u = unit(torch.randn(4, 16))
    copies = torch.randn(5, 4, 16) * torch.rand(5, 4, 1) * 3  # unequal norms: the anchor averages unit vectors
    anchor = unit(unit(copies).mean(dim=0))
    for step in (0.0, 0.3, 1.0):
        aom = AOM(AOMConfig(step=step))
        assert torch.allclose(aom.steer(u, copies), unit(u + step * (anchor - u)), atol=1e-6)
    assert torch.allclose(AOM(AOMConfig(step=0.0)).steer(u, copies), u, atol=1e-6)  # no step: the undefended model
    assert torch.allclose(AOM(AOMConfig(step=1.0)).steer(u, copies), anchor, atol=1e-6)  # full step: the anchor


def test_aom_noisy_copies_are_fresh_clipped_gaussian_draws() -> None:
    aom = AOM(AOMConfig(n_noise=64, sigma=0.1))
    x = torch.full((2, 3, 16, 16), 0.5)
    torch.manual_seed(0)
    views = aom.views(x)
    assert views.shape == (64, 2, 3, 16, 16) and views.min() >= 0 and views.max() <= 1
    assert abs(float((views - x).std()) - 0.1) < 0.005 and abs(float((views - x).mean())) < 0.005
    assert not torch.allclose(views, aom.views(x))
    edge = AOM(AOMConfig(n_noise=2, sigma=0.5, clip_noisy=False)).views(torch.zeros(1, 3, 16, 16))
    assert edge.min() < 0  # unclipped copies leave [0, 1]


def test_aom_pipeline_counts_and_gradients(ctx: harness.Context, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    aom = bound(ctx, AOM, n_noise=3)
    assert AOM.randomized and AOM.from_params({"fast": True}).n_views < AOM.from_params({}).n_views
    aom.counter.images = aom.counter.forward = aom.counter.backward = 0
    logits = aom.predict(x)
    assert logits.shape == (N, 10) and aom.counter.per_image() == (4, 0)
    undefended = bound(ctx, AOM, n_noise=3, step=0.0)
    assert torch.allclose(undefended.predict(x), ctx.base(x), atol=1e-4)  # step 0 leaves the classifier as it is
    x_ = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(aom.attack_surface()(x_), y), x_)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# ---- ATAC ------------------------------------------------------------------------------------------------


def test_atac_views_are_fixed_label_preserving_shifts_and_zoom() -> None:
    x = torch.rand(2, 3, 16, 16)
    atac = ATAC(ATACConfig(threshold=0.0))
    views = atac.views(x)
    assert views.shape == (5, 2, 3, 16, 16) and torch.equal(views, atac.views(x))  # deterministic
    assert torch.equal(views[0][..., :-1, :], x[..., 1:, :]) and (views[0][..., -1, :] == 0).all()  # up by 1 px
    assert torch.equal(shifted(x, 0, 1)[..., 1:], x[..., :-1])  # right by 1 px
    assert ATAC(ATACConfig(threshold=0.0, zoom_margin=0)).n_views == 4


def test_atac_corrects_along_the_mean_drift_only_above_the_threshold() -> None:
    torch.manual_seed(0)
    u = unit(torch.randn(2, 16))
    direction = unit(torch.randn(1, 16)).expand(2, 16)
    agreeing = unit(u.unsqueeze(0) + 0.3 * direction + 0.01 * torch.randn(5, 2, 16))  # drifts agree: high κ
    scattered = unit(u.unsqueeze(0) + 0.3 * torch.randn(5, 2, 16))  # drifts disagree: low κ
    atac = ATAC(ATACConfig(threshold=0.5, step=1.0))
    k_agree, k_scatter = atac.consistency(u, agreeing), atac.consistency(u, scattered)
    assert (k_agree > 0.9).all() and (k_scatter < 0.5).all()
    drifts = agreeing - u.unsqueeze(0)
    expected = unit(u + unit(drifts.mean(dim=0)))
    assert torch.allclose(atac.steer(u, agreeing), expected, atol=1e-6)
    assert torch.allclose(atac.steer(u, scattered), u, atol=1e-6)  # below the threshold: untouched
    # the surrogate changes the gate's gradient, never its value
    atac.surrogate = True
    assert torch.allclose(atac.steer(u, agreeing), expected, atol=1e-6)
    assert torch.allclose(atac.steer(u, scattered), u, atol=1e-6)
    k = torch.tensor([0.49, 0.51], requires_grad=True)
    (grad,) = torch.autograd.grad(atac.gate(k).sum(), k)
    assert (grad > 0).all()
    atac.surrogate = False
    k = torch.tensor([0.49, 0.51], requires_grad=True)
    assert atac.gate(k).squeeze(-1).tolist() == [0.0, 1.0] and not atac.gate(k).requires_grad


def test_atac_calibrates_on_clean_training_images(
    ctx: harness.Context, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = batch
    atac = bound(ctx, ATAC)
    cal = atac.calibration
    assert atac.threshold is not None and cal["images"] == 64
    assert cal["threshold_in_use"] == pytest.approx(cal["calibrated_threshold"], abs=1e-5)
    assert 0.0 < cal["fraction_corrected"] <= 0.1  # the 95 % quantile: about 5 % of clean training images
    atac.counter.images = atac.counter.forward = atac.counter.backward = 0
    logits = atac.predict(x)
    assert logits.shape == (N, 10) and atac.counter.per_image() == (6, 0) and not ATAC.randomized
    kappa = atac.measure(x)
    untouched = kappa < atac.threshold
    assert torch.allclose(logits[untouched], ctx.base(x)[untouched], atol=1e-4)
    x_ = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(atac.attack_surface()(x_), y), x_)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0 and not atac.surrogate
    fixed = ATAC.from_params({"threshold": 0.3})
    assert fixed.threshold == pytest.approx(0.3)
