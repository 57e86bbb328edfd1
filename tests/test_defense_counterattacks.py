"""The counterattack defenses (Hedge Defense, MAC, DOC, SCC, FPT-Noise) and their shared steps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlmdefense.defenses.training_free.counterattack import (
    CounterattackDefense,
    into_ball,
    raw_embed,
    relative_change,
    signed,
)
from vlmdefense.defenses.training_free.doc import DOC, orthogonal_direction
from vlmdefense.defenses.training_free.fpt_noise import FPTNoise
from vlmdefense.defenses.training_free.gated_counterattack import GateSettings, gated_counterattack
from vlmdefense.defenses.training_free.hedge_defense import HedgeDefense, hedge_loss
from vlmdefense.defenses.training_free.mac import MAC
from vlmdefense.defenses.training_free.scc import SCC, margin_to_prototype
from vlmdefense.workbench import harness
from vlmdefense.workbench.surface_choice import choose_surface

N = 8


@pytest.fixture(scope="module")
def ctx() -> harness.Context:
    return harness.setup("hedge-defense", "quick")


@pytest.fixture(scope="module")
def batch(ctx: harness.Context) -> tuple[torch.Tensor, torch.Tensor]:
    return ctx.sets.test.images[:N], ctx.sets.test.labels[:N]


def fitted(ctx: harness.Context, cls: type[CounterattackDefense], **params: object) -> CounterattackDefense:
    defense = cls.from_params({**ctx.params, **params})
    harness.fit(ctx, defense)
    return defense


def surface_checks(defense: CounterattackDefense, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every surface forwards the defended prediction (same seed) and gives a finite, non-zero gradient."""
    grads = {}
    for mode in ("bpda", "input", "unrolled"):
        torch.manual_seed(3)
        with torch.no_grad():
            expected = defense.predict(x)
        torch.manual_seed(3)
        x_ = x.clone().requires_grad_(True)
        logits = defense.surface(mode)(x_)
        assert torch.allclose(logits.detach(), expected, atol=1e-4), mode
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, y), x_)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, mode
        grads[mode] = grad
    with pytest.raises(ValueError):
        defense.surface("nonsense")
    return grads


def test_signed_is_sign_forward_with_a_smooth_backward() -> None:
    g = torch.tensor([[-2.0, 0.5, 3.0]], requires_grad=True)
    hard = signed(g, smooth=False)
    smooth = signed(g, smooth=True)
    assert torch.equal(hard, smooth) and torch.equal(hard, torch.tensor([[-1.0, 1.0, 1.0]]))
    (grad,) = torch.autograd.grad(smooth.sum(), g)
    assert (grad > 0).all()  # tanh' > 0: the unrolled attack sees how the step depends on the gradient
    x = torch.tensor([0.0, 0.5, 1.0])
    assert torch.equal(into_ball(torch.tensor([0.5, -0.5, 0.5]), x, 0.1), torch.tensor([0.1, -0.1, 0.0]))


def test_hedge_loss_is_the_cross_entropy_of_every_class(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits = torch.randn(5, 10)
    every_class = sum(F.cross_entropy(logits, torch.full((5,), c), reduction="sum") for c in range(10))
    assert hedge_loss(logits).item() == pytest.approx(float(every_class) / 10 - 5 * math.log(10), rel=1e-5)
    kl = F.kl_div(F.log_softmax(logits, -1), torch.full_like(logits, 0.1), reduction="sum")
    assert hedge_loss(logits).item() == pytest.approx(kl.item(), rel=1e-5)  # the official KL form


def test_hedge_raises_its_loss_inside_its_ball(ctx: harness.Context, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    hedge = fitted(ctx, HedgeDefense, random_start=False)
    assert isinstance(hedge, HedgeDefense)
    x, y = batch
    iterates, seen = hedge.hedge(x, unroll=False)
    steps, eps = hedge.config.hedge_steps, hedge.config.hedge_eps
    assert len(iterates) == steps + 1 and len(seen) == steps and torch.equal(iterates[0], torch.zeros_like(x))
    for d in iterates:
        assert d.abs().max() <= eps + 1e-6 and (x + d).min() >= -1e-6 and (x + d).max() <= 1 + 1e-6
    base = hedge._base()
    with torch.no_grad():
        before = [hedge_loss(base(x[i : i + 1])).item() for i in range(N)]
        after = [hedge_loss(base(x[i : i + 1] + iterates[-1][i : i + 1])).item() for i in range(N)]
    assert sum(a > b for a, b in zip(after, before, strict=True)) >= N - 1
    # the official prediction: logits summed over the visited iterates after the start, the last one unread
    with torch.no_grad():
        expected = torch.stack([base(x + d) for d in iterates[1:-1]]).mean(0)
        assert torch.allclose(hedge.predict(x), expected, atol=1e-4)
    assert hedge.passes() == (steps, steps)
    grads = surface_checks(fitted(ctx, HedgeDefense), x, y)
    assert not torch.allclose(grads["bpda"], grads["unrolled"])  # the unrolled steps add the inner Jacobian


def test_mac_gate_scales_the_counterattack(ctx: harness.Context, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    closed = fitted(ctx, MAC, tau_thres=10.0)  # no degree reaches it: every view is left as it is
    assert isinstance(closed, MAC)
    torch.manual_seed(0)
    with torch.no_grad():
        views = closed.views(x)
        delta, weight = closed.counterattack(views, unroll=False)
    assert views.shape == (2 * N, *x.shape[1:]) and torch.equal(views[:N], x)
    assert views.min() >= 0 and views.max() <= 1 and not torch.equal(views[N:], x)
    assert weight.max() < 1e-6 and delta.abs().max() < 1e-6
    torch.manual_seed(0)
    with torch.no_grad():
        plain = closed._base()(closed.views(x)).view(2, N, -1).mean(0)
        torch.manual_seed(0)
        assert torch.allclose(closed.predict(x), plain, atol=1e-4)  # the closed gate: view averaging only
    opened = fitted(ctx, MAC, tau_thres=-1.0)  # every degree is above it: the full counterattack
    assert isinstance(opened, MAC)
    torch.manual_seed(0)
    delta, weight = opened.counterattack(x, unroll=False)
    eps = opened.config.mac_eps
    assert weight.min() > 1 - 1e-6 and delta.abs().max() <= eps + 1e-6
    torch.manual_seed(0)
    noise = into_ball(torch.empty_like(x).uniform_(-eps, eps), x, eps)
    with torch.no_grad():
        ref = raw_embed(opened.clip, x)
        moved = relative_change(raw_embed(opened.clip, x + delta), ref)
        by_noise = relative_change(raw_embed(opened.clip, x + noise), ref)
    assert (moved > by_noise).all()  # the steps push the embedding further than their random start
    assert opened.passes() == (2 * (opened.config.mac_steps + 3), 2 * opened.config.mac_steps)
    surface_checks(opened, x, y)


def test_mac_calibrated_threshold(ctx: harness.Context) -> None:
    mac = MAC.from_params({**ctx.params, "tau_thres": "calibrate", "tau_quantile": 0.5})
    with pytest.raises(RuntimeError):
        mac.soft_weight(torch.zeros(1))
    record = mac.fit(ctx.fit_data())["corruption_clean_train"]
    assert mac.threshold == pytest.approx(record["calibrated_threshold"], abs=1e-5)
    assert 0.3 <= record["fraction_above_threshold"] <= 0.7


def test_doc_orthogonal_momentum_counterattack_and_gate(
    ctx: harness.Context, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    grad, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    direction = orthogonal_direction(grad, noise, 0.5)
    unit = F.normalize(grad.flatten(1), dim=1)
    extra = direction.flatten(1) - unit
    assert torch.allclose((extra * unit).sum(1), torch.zeros(3), atol=1e-5)  # orthogonal to the gradient
    assert torch.allclose(extra.norm(dim=1), torch.full((3,), 0.5), atol=1e-5)  # scaled by lambda
    x, y = batch
    closed = fitted(ctx, DOC, dss_thres=-1.0, dss_temp=0.01)  # no score is below it: only the random start is kept
    assert isinstance(closed, DOC)
    torch.manual_seed(0)
    delta, weight = closed.counterattack(x, unroll=False)
    eps = closed.config.doc_eps
    torch.manual_seed(0)
    start = into_ball(torch.empty_like(x).uniform_(-eps, eps), x, eps)
    assert weight.max() < 1e-6 and torch.allclose(delta, start, atol=1e-6)
    opened = fitted(ctx, DOC, dss_thres=10.0, dss_temp=0.01)
    assert isinstance(opened, DOC)
    torch.manual_seed(0)
    delta, weight = opened.counterattack(x, unroll=False)
    assert weight.min() > 1 - 1e-6 and delta.abs().max() <= eps + 1e-6
    with torch.no_grad():
        ref = raw_embed(opened.clip, x)
        moved = relative_change(raw_embed(opened.clip, x + delta), ref)
        by_start = relative_change(raw_embed(opened.clip, x + start), ref)
    assert (moved > by_start).all()  # pushed away from the input's embedding beyond its random start
    calibrated = fitted(ctx, DOC)
    record = ctx.findings["dss_clean_train"]
    assert isinstance(calibrated, DOC) and calibrated.threshold == pytest.approx(record["threshold_in_use"], abs=1e-5)
    assert 0.2 <= record["weight_mean"] <= 0.8  # the median threshold splits clean images around one half
    surface_checks(opened, x, y)


def test_gated_counterattack_follows_the_tau_gate(
    ctx: harness.Context, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, _ = batch
    clip = fitted(ctx, MAC).clip
    closed = GateSettings(eps=4 / 255, steps=2, step_size=1 / 255, tau_thres=-1.0, beta=2.0)
    torch.manual_seed(0)
    delta, tau = gated_counterattack(clip, x, closed, unroll=False)
    torch.manual_seed(0)
    start = into_ball(torch.empty_like(x).uniform_(-closed.eps, closed.eps), x, closed.eps)
    assert torch.allclose(delta, start, atol=1e-7) and (tau >= 0).all()  # no image gated: the noise only
    opened = GateSettings(eps=4 / 255, steps=2, step_size=1 / 255, tau_thres=10.0, beta=2.0)
    torch.manual_seed(0)
    delta, _ = gated_counterattack(clip, x, opened, unroll=False)
    assert delta.abs().max() <= opened.eps + 1e-6 and not torch.allclose(delta, start)
    with torch.no_grad():
        ref = raw_embed(clip, x)
        assert (
            relative_change(raw_embed(clip, x + delta), ref) > relative_change(raw_embed(clip, x + start), ref)
        ).all()


def test_scc_margin_and_correction(ctx: harness.Context, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    text = F.normalize(torch.randn(4, 6), dim=-1)
    emb = F.normalize(torch.randn(3, 6), dim=-1)
    pseudo = torch.tensor([0, 2, 3])
    margin = margin_to_prototype(emb, 5 * text[pseudo], text, pseudo)  # a one-hot prototype, any scale
    cos = emb @ text.T
    others = torch.stack([torch.cat([cos[i, :p], cos[i, p + 1 :]]).max() for i, p in enumerate(pseudo.tolist())])
    assert torch.allclose(margin, cos[torch.arange(3), pseudo] - others, atol=1e-6)
    x, y = batch
    scc = fitted(ctx, SCC, n_views=3, scc_steps=3, temperature=0.05)
    assert isinstance(scc, SCC)
    torch.manual_seed(0)
    noise = scc.draw_noise(x)
    assert noise.shape == (2, *x.shape) and torch.equal(scc.views(x, noise)[: len(x)], x)
    prototype, pseudo = scc.prototype(x, noise)
    base = scc._base()
    assert torch.allclose(F.normalize(prototype, dim=-1), base.text_weights[pseudo], atol=0.05)  # sharp: ≈ top class
    delta = scc.correct(x, noise, prototype, pseudo, unroll=False)
    assert delta.shape == x.shape and delta.abs().max() <= scc.config.scc_eps + 1e-6  # one perturbation for all views
    with torch.no_grad():
        before = scc.margin(x, noise, prototype, pseudo)
        after = scc.margin(x + delta, noise, prototype, pseudo)
    assert (after > before).float().mean() >= 0.75 and after.mean() > before.mean()  # ascent on the margin
    forward, backward = scc.passes()
    w = scc.config.warmup_steps  # warm-up: reference and one per step; views; correction; prediction
    assert (forward, backward) == (1 + w + 3 + 3 * 3 + 3, w + 3 * 3)
    surface_checks(fitted(ctx, SCC), x, y)
    gate = scc.fit(ctx.fit_data())["tau_clean_train"]
    assert gate["images"] > 0 and 0 <= gate["fraction_gated"] <= 1


def test_fpt_noise_budget_regulation_and_thresholds(
    ctx: harness.Context, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = batch
    fpt = fitted(ctx, FPTNoise)
    assert isinstance(fpt, FPTNoise)
    record = fpt.fit(ctx.fit_data())["perception_clean_train"]
    threshold = fpt.rate_threshold
    assert threshold is not None and threshold == pytest.approx(record["rate_threshold"], abs=1e-5)
    cfg = fpt.config
    rates = torch.linspace(0.5 * threshold, 2 * threshold, 7)
    budgets = fpt.budget(rates)
    assert (budgets[1:] < budgets[:-1]).all()  # slower features: a larger budget
    assert budgets.min() >= cfg.eps_min - 1e-9 and budgets.max() <= cfg.eps_max + 1e-9
    torch.manual_seed(0)
    delta, eps, _ = fpt.modulated(x, unroll=False)
    assert (delta.abs().flatten(1).max(1).values <= eps.flatten() + 1e-6).all()  # each image within its own budget
    assert ((x + delta).min() >= 0) and ((x + delta).max() <= 1)
    everything = fitted(ctx, FPTNoise, stability_thres=-1.0)  # every move exceeds it: every image regulated
    assert isinstance(everything, FPTNoise)
    torch.manual_seed(0)
    regulated_delta, regulated = everything.counterattack(x, unroll=False)
    torch.manual_seed(0)
    unregulated, _, _ = everything.modulated(x, unroll=False)
    assert regulated.all() and torch.allclose(regulated_delta, cfg.regulation * unregulated, atol=1e-7)
    nothing = fitted(ctx, FPTNoise, stability_thres=1e9)
    assert isinstance(nothing, FPTNoise)
    assert not nothing.counterattack(x, unroll=False)[1].any()
    with pytest.raises(RuntimeError):
        FPTNoise.from_params(ctx.params).budget(rates)
    surface_checks(fpt, x, y)


def test_choose_surface_adopts_the_lowest_accuracy(ctx: harness.Context) -> None:
    hedge = fitted(ctx, HedgeDefense)
    assert isinstance(hedge, HedgeDefense)
    rows = choose_surface(ctx, hedge, images=6)
    modes = ("bpda", "input", "unrolled")
    assert rows["strongest"] == min(modes, key=lambda m: rows[m]) == hedge.config.adaptive
    assert ctx.findings["surface_comparison"] is rows and rows["images"] == 6
    assert f"{rows['strongest']}, twice the steps" in rows and rows["eps_255"] <= 4
