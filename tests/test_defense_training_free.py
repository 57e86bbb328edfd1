"""Training-free defenses (TTC, Anti-Adversary, CLIPure-Cos, TTE) on the quick profile's scale."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlmdefense.defenses.training_free.anti_adversary import AntiAdversary
from vlmdefense.defenses.training_free.clipure import CLIPure
from vlmdefense.defenses.training_free.common import TrainingFreeDefense, auc, tau_quantiles
from vlmdefense.defenses.training_free.ttc import TTC, TTCConfig
from vlmdefense.defenses.training_free.tte import TTE
from vlmdefense.workbench import harness

N = 12


@pytest.fixture(scope="session")
def ctx() -> harness.Context:
    return harness.setup("ttc", "quick")


@pytest.fixture(scope="session")
def batch(ctx: harness.Context) -> tuple[torch.Tensor, torch.Tensor]:
    return ctx.sets.test.images[:N], ctx.sets.test.labels[:N]


@pytest.fixture(scope="session")
def fitted(ctx: harness.Context) -> dict[str, TrainingFreeDefense]:
    before = {k: v.clone() for k, v in ctx.base.state_dict().items()}
    out: dict[str, TrainingFreeDefense] = {}
    for cls in (TTC, AntiAdversary, CLIPure, TTE):
        defense = cls.from_params(ctx.params)
        harness.fit(ctx, defense)
        out[cls.id] = defense
    after = ctx.base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "fit modified ctx.base"
    return out


def test_from_params_defaults_fast_and_overrides() -> None:
    ttc = TTC.from_params({"ttc_eps": "2/255", "tau_thres": "calibrate", "beta": 1})
    assert ttc.config.ttc_eps == pytest.approx(2 / 255)
    assert ttc.config.ttc_step_size == pytest.approx(1 / 255) and ttc.config.ttc_steps == 2
    assert ttc.config.tau_thres == "calibrate" and ttc.threshold is None and ttc.config.beta == 1.0
    assert TTC.from_params({}).threshold == pytest.approx(0.2)
    assert TTC.from_params({"fast": True}).config.calibration_images < TTCConfig().calibration_images
    anti = AntiAdversary.from_params({"k": 3, "alpha": 0.05})
    assert (anti.config.k, anti.config.alpha) == (3, 0.05)
    assert CLIPure.from_params({}).config.step_size == 30.0 and CLIPure.from_params({}).config.steps == 10
    assert TTE.from_params({"fast": True}).n_views < TTE.from_params({}).n_views
    assert TTC.kind == AntiAdversary.kind == CLIPure.kind == TTE.kind == "inference"
    assert TTC.randomized and not (AntiAdversary.randomized or CLIPure.randomized or TTE.randomized)


@pytest.mark.parametrize("method", ["ttc", "anti-adversary", "clipure", "tte"])
def test_predict_shape_counts_and_differentiable_surface(
    fitted: dict[str, TrainingFreeDefense], batch: tuple[torch.Tensor, torch.Tensor], method: str
) -> None:
    defense = fitted[method]
    x, y = batch
    defense.counter.forward = defense.counter.backward = defense.counter.images = 0
    with torch.no_grad():
        logits = defense.predict(x)
    assert logits.shape == (N, 10) and torch.isfinite(logits).all()
    expected = {
        "ttc": (2 + 2, 2),
        "anti-adversary": (2 + 2, 2),
        "clipure": (1, 0),
        "tte": (fitted["tte"].n_views, 0),
    }[method]
    assert defense.counter.images == N
    assert defense.counter.per_image() == expected
    x_ = x.clone().requires_grad_(True)
    loss = F.cross_entropy(defense.attack_surface()(x_), y)
    (grad,) = torch.autograd.grad(loss, x_)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["anti-adversary", "clipure", "tte"])
def test_deterministic_defenses_repeat(
    fitted: dict[str, TrainingFreeDefense], batch: tuple[torch.Tensor, torch.Tensor], method: str
) -> None:
    with torch.no_grad():
        assert torch.equal(fitted[method].predict(batch[0]), fitted[method].predict(batch[0]))


def test_ttc_counterattack_moves_embedding_away_and_stays_in_ball(
    fitted: dict[str, TrainingFreeDefense], batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    ttc = fitted["ttc"]
    assert isinstance(ttc, TTC)
    x = batch[0]
    torch.manual_seed(0)
    out = ttc.counterattack(x)  # τ_thres 0.2 is far above the small model's τ: every image is counterattacked
    assert out.counterattacked.all()
    eps = ttc.config.ttc_eps
    assert out.delta.abs().max() <= eps + 1e-6
    assert (x + out.delta).min() >= -1e-6 and (x + out.delta).max() <= 1 + 1e-6
    with torch.no_grad():
        ref = ttc.raw_embed(x)
        moved = (ttc.raw_embed(x + out.delta) - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert (moved > out.tau).float().mean() > 0.9  # further away than the random start alone
    torch.manual_seed(0)
    gated = ttc.counterattack(x, threshold=0.0)  # every image "clean": only the initial noise is kept
    assert not gated.counterattacked.any()
    torch.manual_seed(0)
    noise = torch.empty_like(x).uniform_(-eps, eps)
    assert torch.allclose(gated.delta, torch.max(torch.min(noise, 1 - x), -x))
    with torch.no_grad():
        torch.manual_seed(1)
        a = ttc.predict(x)
        torch.manual_seed(1)
        b = ttc.predict(x)
    assert torch.equal(a, b)


def test_ttc_calibration_records_tau(ctx: harness.Context) -> None:
    ttc = TTC.from_params({**ctx.params, "tau_thres": "calibrate", "tau_quantile": 0.5})
    record = ttc.fit(ctx.fit_data())["tau_clean_train"]
    assert ttc.threshold == pytest.approx(record["calibrated_threshold"], abs=1e-5)
    assert 0.3 <= record["fraction_below_threshold"] <= 0.7
    assert list(tau_quantiles(torch.arange(10.0))) == ["q05", "q25", "q50", "q75", "q95"]
    assert auc(torch.zeros(4), torch.ones(4)) == 1.0 and auc(torch.ones(3), torch.ones(3)) == 0.5


def test_anti_adversary_raises_confidence_in_own_prediction(
    fitted: dict[str, TrainingFreeDefense], batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    anti = fitted["anti-adversary"]
    assert isinstance(anti, AntiAdversary)
    x = batch[0]
    delta, initial = anti.anti_adversary(x)
    pseudo = initial.argmax(-1)
    with torch.no_grad():
        after = anti.base(x + delta)
    assert F.cross_entropy(after, pseudo) < F.cross_entropy(initial, pseudo)
    assert delta.abs().max() <= anti.config.k * anti.config.alpha + 1e-6


def test_clipure_purification_geometry(
    fitted: dict[str, TrainingFreeDefense], batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    clipure = fitted["clipure"]
    assert isinstance(clipure, CLIPure) and clipure.base is not None
    assert clipure.blank_prompts[0] == "a photo of the digit ."
    with torch.no_grad():
        e = clipure.base.embed(batch[0])
    # the closed-form ascent direction is the autograd gradient of the cosine, scaled by the norm
    e_ = e.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(clipure.blank_similarity(e_).sum(), e_)
    t = F.normalize(clipure.blank_embedding, dim=-1)
    assert torch.allclose(grad, t - (e * t).sum(-1, keepdim=True) * e, atol=1e-5)
    small = clipure.purify(e, steps=3, step_size=0.05)
    assert torch.allclose(small.norm(dim=-1), e.norm(dim=-1), atol=1e-5)
    assert (clipure.blank_similarity(small) > clipure.blank_similarity(e)).all()
    # with the official step (30) one step turns by atan(30) ≈ 88.1°, so two steps bring back every
    # embedding that starts closer than that to the blank direction: the forward map is periodic
    assert clipure.config.step_size == 30.0
    back = clipure.purify(e, steps=2)
    near = clipure.blank_similarity(e) > math.cos(math.atan(30.0)) + 1e-3
    assert near.any() and torch.allclose(back[near], e[near], atol=1e-4)


def test_tte_views_keep_size_and_identity(
    fitted: dict[str, TrainingFreeDefense], batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    tte = fitted["tte"]
    assert isinstance(tte, TTE)
    x = batch[0]
    views = tte.views(x)
    assert views.shape == (tte.n_views, *x.shape)
    assert torch.equal(views[0], x) and "flip" not in tte.view_names
    assert len(set(tte.offsets)) == len(tte.offsets) and (tte.config.pad, tte.config.pad) not in tte.offsets
    with torch.no_grad():
        manual = torch.stack([tte.base(v) for v in views]).mean(0)
        assert torch.allclose(tte.predict(x), manual, atol=1e-5)


@pytest.mark.parametrize("method", ["ttc", "anti-adversary", "clipure", "tte"])
def test_attack_surface_forward_is_the_defended_prediction(
    fitted: dict[str, TrainingFreeDefense], batch: tuple[torch.Tensor, torch.Tensor], method: str
) -> None:
    defense = fitted[method]
    x = batch[0]
    torch.manual_seed(3)
    with torch.no_grad():
        predicted = defense.predict(x)
    torch.manual_seed(3)
    surface = defense.attack_surface()(x.clone().requires_grad_(True))
    assert torch.allclose(surface.detach(), predicted, atol=1e-4)


def test_anti_adversary_bpda_placements(
    ctx: harness.Context, fitted: dict[str, TrainingFreeDefense], batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = batch
    grads = {}
    for point in ("input", "moved"):
        layer = AntiAdversary.from_params({"bpda_point": point})
        layer.bind(ctx.base)
        x_ = x.clone().requires_grad_(True)
        logits = layer.attack_surface()(x_)
        with torch.no_grad():
            assert torch.allclose(logits, fitted["anti-adversary"].predict(x), atol=1e-4)
        (grads[point],) = torch.autograd.grad(F.cross_entropy(logits, y), x_)
    x_ = x.clone().requires_grad_(True)
    (at_input,) = torch.autograd.grad(F.cross_entropy(ctx.base(x_), y), x_)
    assert not torch.allclose(grads["input"], grads["moved"])
    # the input placement's gradient is the base model's gradient at x, reweighted by the pipeline's softmax
    assert F.cosine_similarity(grads["input"].flatten(), at_input.flatten(), dim=0) > 0.5
    with pytest.raises(ValueError):
        AntiAdversary.from_params({"bpda_point": "elsewhere"}).attack_surface()
