"""Test-time prompt tuning defenses built on the shared hooks: TPT, A-TPT, SS-TPT (and TTP's padding)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlmdefense.defenses.test_time_adaptation import a_tpt
from vlmdefense.defenses.test_time_adaptation.a_tpt import (
    ATPT,
    ATPTConfig,
    attention_rollout,
    mixing_map,
    tower_with_attention,
)
from vlmdefense.defenses.test_time_adaptation.prompt_tuning import adamw_first_step
from vlmdefense.defenses.test_time_adaptation.ss_tpt import SSTPT, SSTPTConfig, js_divergence
from vlmdefense.defenses.test_time_adaptation.tpt import TPT
from vlmdefense.defenses.test_time_adaptation.ttp import TTP, pad_into
from vlmdefense.defenses.test_time_adaptation.views import entropy, marginal_entropy
from vlmdefense.workbench import harness


@pytest.fixture(scope="session")
def quick():
    """The quick profile's context, its first six test images and their labels."""
    ctx = harness.setup("tpt", "quick")
    return ctx, ctx.sets.test.images[:6], ctx.sets.test.labels[:6]


def _weights(ctx) -> list[torch.Tensor]:
    return [t.detach().clone() for t in ctx.base.state_dict().values()]


def _same(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


# ---- the shared pieces ---------------------------------------------------------------------------------


def test_adamw_first_step_matches_torch():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(3, 7))
    grad = torch.randn(3, 7)
    start = param.detach().clone()
    optimizer = torch.optim.AdamW([param], lr=5e-3, weight_decay=0.01)
    param.grad = grad.clone()
    optimizer.step()
    assert torch.allclose(param.detach(), adamw_first_step(start, grad, 5e-3, 0.01), atol=1e-7)


# ---- TPT -----------------------------------------------------------------------------------------------


def test_tpt_objective_is_the_marginal_entropy():
    # two confident views that disagree: low pointwise entropy, high marginal entropy
    logits = torch.tensor([[[8.0, 0.0, 0.0], [0.0, 8.0, 0.0]]])
    loss = TPT().objective(logits, None)
    assert torch.allclose(loss, marginal_entropy(logits))
    assert float(loss) > float(entropy(logits).mean()) + 0.5


def test_tpt_step_lowers_the_marginal_entropy_and_keeps_the_weights(quick):
    ctx, images, labels = quick
    state = _weights(ctx)
    defense = TPT.from_params({"n_views": 6, "selection": 0.5, "lr": 0.05})
    defense.fit(ctx.fit_data())
    torch.manual_seed(0)
    before, after = defense.objective_change(images)
    assert (after < before).all()
    out = defense.predict(images)
    x = images.clone().requires_grad_(True)
    F.cross_entropy(defense.attack_surface()(x), labels).backward()
    assert out.shape == (6, 10) and x.grad is not None and x.grad.abs().sum() > 0
    assert _same(state, _weights(ctx))  # both encoders bit-identical
    assert all(p.grad is None for p in ctx.clip.model.parameters())


def test_tpt_classifies_the_unaugmented_image_with_the_tuned_prompt(quick):
    ctx, images, _ = quick
    defense = TPT.from_params({"n_views": 6, "selection": 0.5, "steps": 0})
    defense.fit(ctx.fit_data())
    assert defense.learner is not None
    with torch.no_grad():
        zero_shot = defense._base().logit_scale * defense._base().embed(images) @ defense.learner().T
    assert torch.allclose(defense.predict(images), zero_shot, atol=1e-4)  # no step: the template prompt
    defense.config.steps = 1
    torch.manual_seed(3)
    out = defense.run(images)
    assert torch.equal(out.weights[:, 0], torch.ones(6)) and out.weights[:, 1:].abs().sum() == 0
    with torch.no_grad():
        text = defense.learner(out.ctx, per_image=True)
        expected = defense._base().logit_scale * torch.einsum("bd,bcd->bc", defense._base().embed(images), text)
    assert torch.allclose(out.logits, expected, atol=1e-4)
    assert not torch.allclose(out.ctx[0], defense.learner.ctx_init)  # the prompt moved


def test_tpt_unrolled_attack_follows_the_step(quick):
    """Differentiating through the AdamW step gives (almost) BPDA's gradient: the step is a sign."""
    ctx, images, labels = quick
    defense = TPT.from_params({"n_views": 4, "selection": 0.5})
    defense.fit(ctx.fit_data())
    grads = []
    for unrolled in (False, True):
        x = images.clone().requires_grad_(True)
        torch.manual_seed(5)
        F.cross_entropy(defense.run(x, with_graph=True, unrolled=unrolled).logits, labels).backward()
        assert x.grad is not None
        grads.append(x.grad.flatten())
    assert F.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


# ---- A-TPT ---------------------------------------------------------------------------------------------


def test_atpt_tower_with_attention_reproduces_the_image_tower(quick):
    ctx, images, _ = quick
    features, inputs, maps = tower_with_attention(ctx.clip, images)
    assert torch.allclose(features, ctx.clip.encode_images(images), atol=1e-5)
    assert len(maps) == len(inputs) and torch.allclose(maps[-1].sum(-1), torch.ones(()), atol=1e-5)


def test_atpt_views_keep_the_base_where_attention_is_high():
    cfg = ATPTConfig()
    attention = torch.linspace(0, 1, 100).view(1, 1, 10, 10)  # distinct values: the top 20 are the last two rows
    m = mixing_map(attention, torch.tensor([0.5]), cfg)
    assert torch.equal(m.flatten()[80:], torch.full((20,), cfg.m_high))
    assert torch.equal(m.flatten()[:80], torch.full((80,), cfg.m_low))
    cfg_mid = ATPTConfig(p_high=0.2, p_low=0.5)  # the AugMix Beta draw between the quantiles
    assert torch.equal(mixing_map(attention, torch.tensor([0.37]), cfg_mid).flatten()[50:80], torch.full((30,), 0.37))


def test_atpt_views_blend_base_and_mix_by_the_attention_map(quick, monkeypatch):
    ctx, images, _ = quick
    defense = ATPT.from_params({"n_views": 3})
    defense.fit(ctx.fit_data())
    captured = {}
    original = a_tpt.augmix_pure_mix

    def spy(base, *args):
        mix, beta = original(base, *args)
        captured.update(base=base.detach(), mix=mix.detach())
        return mix, beta

    monkeypatch.setattr(a_tpt, "augmix_pure_mix", spy)
    torch.manual_seed(0)
    views = defense.make_views(images)
    assert views.shape == (6, 3, *images.shape[1:]) and torch.equal(views[:, 0], images)
    base, mix = captured["base"], captured["mix"]
    text = defense.learner()
    attention = attention_rollout(ctx.clip, text, defense._base().logit_scale, base, 0.99)
    m = mixing_map(attention, torch.zeros(len(base)), defense.config)
    assert torch.allclose(views[:, 1:].flatten(0, 1), m * base + (1 - m) * mix, atol=1e-5)
    assert 0.15 < float((m == defense.config.m_high).float().mean()) < 0.3  # the top fifth of each map


# ---- SS-TPT --------------------------------------------------------------------------------------------


def test_sstpt_scores_prefer_dense_and_stable_views(quick):
    ctx, images, _ = quick
    defense = SSTPT.from_params({"n_views": 4})
    defense.fit(ctx.fit_data())
    features = F.normalize(torch.tensor([[[1.0, 0.0], [0.99, 0.1], [0.98, -0.1], [0.0, 1.0]]]), dim=-1)
    distance = 2 - 2 * features @ features.transpose(1, 2)
    suitability = 1 / (distance.sum(-1) / 3 + 1e-8)
    assert int(suitability.argmin()) == 3  # the outlier
    weights = defense.weights(torch.stack([suitability, torch.tensor([[1.0, 5.0, 1.0, 1.0]])], dim=-1))
    assert torch.allclose(weights.sum(), torch.ones(())) and int(weights.argmax()) == 1  # dense and stable
    torch.manual_seed(0)
    views = defense.make_views(images)
    scores = defense.view_scores(views, defense._base().embed(views.flatten(0, 1)).view(6, 4, -1))
    assert scores.shape == (6, 4, 2) and (scores > 0).all()
    assert js_divergence(torch.tensor([0.3, 0.7]), torch.tensor([0.3, 0.7])) < 1e-6


def test_sstpt_consistency_pulls_towards_the_other_views():
    defense = SSTPT(SSTPTConfig(consistency=1.0))
    scores = torch.ones(1, 2, 2)
    agree = torch.tensor([[[3.0, 0.0, 0.0], [3.0, 0.0, 0.0]]])
    disagree = torch.tensor([[[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]]])
    plain = entropy(disagree).mean(1)
    assert torch.allclose(defense.objective(agree, scores), entropy(agree).mean(1), atol=1e-5)  # KL 0
    p = torch.softmax(disagree, -1)[0]  # the reference of each view is the other view
    kl = 0.5 * ((p[1] * (p[1] / p[0]).log()).sum() + (p[0] * (p[0] / p[1]).log()).sum())
    assert torch.allclose(defense.objective(disagree, scores) - plain, kl.view(1), atol=1e-4)


# ---- TTP -----------------------------------------------------------------------------------------------


def test_ttp_detects_by_the_padding_shift_and_leaves_clean_inputs_alone(quick):
    ctx, images, labels = quick
    state = _weights(ctx)
    defense = TTP.from_params({"n_views": 4, "selection": 0.5})
    findings = defense.fit(ctx.fit_data())
    data = ctx.fit_data()
    with torch.no_grad():
        flagged = defense.similarity(data.seen_train.images) < defense.threshold
    assert abs(float(flagged.float().mean()) - defense.config.detection_fpr) < 0.02
    assert findings["threshold"] == round(defense.threshold, 5)
    zero = pad_into(images, torch.zeros_like(images), 2)
    assert zero[..., :2, :].abs().sum() == 0 and zero[..., 2:-2, 2:-2].abs().sum() > 0
    torch.manual_seed(0)
    out = defense.run(images)
    with torch.no_grad():
        plain = defense._base()(images)
    keep = ~out.flagged
    assert torch.allclose(out.logits[keep], plain[keep], atol=1e-5)  # judged clean: zero-shot unchanged
    defense.threshold = 2.0  # flag everything: the border is adapted
    torch.manual_seed(0)
    adapted = defense.run(images)
    assert adapted.flagged.all() and not torch.allclose(adapted.logits, plain, atol=1e-3)
    assert adapted.weights is not None and torch.allclose(adapted.weights.sum(1), torch.ones(6), atol=1e-5)
    x = images.clone().requires_grad_(True)
    F.cross_entropy(defense.attack_surface()(x), labels).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert _same(state, _weights(ctx))
