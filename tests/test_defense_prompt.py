"""Prompt learning (APT) and test-time prompt tuning (R-TPT, TAPT) on the quick profile's scale."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlmdefense.defenses.prompt_learner import ContextInit, PromptLearner, VisualPromptEncoder
from vlmdefense.defenses.test_time_adaptation.r_tpt import RTPT
from vlmdefense.defenses.test_time_adaptation.tapt import TAPT
from vlmdefense.defenses.test_time_adaptation.views import (
    entropy,
    gather_views,
    marginal_entropy,
    most_confident,
    random_views,
)
from vlmdefense.defenses.training_time.apt import APT
from vlmdefense.workbench import harness


@pytest.fixture(scope="session")
def ctx():
    return harness.setup("apt", "quick")


@pytest.fixture(scope="session")
def batch(ctx):
    return ctx.sets.test.images[:6], ctx.sets.test.labels[:6]


def _base_state(ctx):
    return {k: v.clone() for k, v in ctx.base.state_dict().items()}


def _unchanged(ctx, state) -> bool:
    return all(torch.equal(v, state[k]) for k, v in ctx.base.state_dict().items())


# ---- the prompt learner ------------------------------------------------------------------------------


@pytest.mark.parametrize("template_index", range(8))
def test_prompt_learner_reproduces_encode_text(ctx, template_index):
    template = ctx.prompts.templates[template_index]
    learner = PromptLearner(ctx.clip, ctx.prompts, ContextInit(template=template))
    texts = [template.format(name=n, digit=i) for i, n in enumerate(ctx.prompts.classnames)]
    with torch.no_grad():
        reference = F.normalize(ctx.clip.model.encode_text(ctx.clip.tokenizer(texts)), dim=-1)
        assert torch.allclose(learner(), reference, atol=1e-5)
        # one context per image gives the same embeddings for every image
        per_image = learner(learner.ctx_init.unsqueeze(0).repeat(3, 1, 1), per_image=True)
    assert per_image.shape == (3, 10, reference.shape[-1])
    assert torch.allclose(per_image[2], reference, atol=1e-5)


def test_prompt_learner_gradient_reaches_only_the_context(ctx):
    learner = PromptLearner(ctx.clip, ctx.prompts, ContextInit(n_ctx=3, random=True))
    context = torch.nn.Parameter(learner.ctx_init.clone())
    learner(context).sum().backward()
    assert context.grad is not None and context.grad.abs().sum() > 0
    assert all(p.grad is None for p in ctx.clip.model.parameters())


def test_visual_prompt_encoder_reproduces_encode_image(ctx, batch):
    images, _ = batch
    encoder = VisualPromptEncoder(ctx.clip)
    with torch.no_grad():
        assert torch.allclose(encoder(images).features, ctx.clip.encode_images(images), atol=1e-5)
        prompts = torch.randn(len(images), 2, 2, encoder.width) * 0.02
        out = encoder(images.repeat_interleave(2, dim=0), prompts, record=True, views_per_prompt=2)
    assert out.features.shape == (12, 64)
    assert len(out.block_inputs) == encoder.layers and out.block_inputs[0].shape[1] == 17 + 2


def test_views_and_selection(batch):
    images, _ = batch
    views = random_views(images, 5)
    assert views.shape == (6, 5, *images.shape[1:])
    assert torch.equal(views[:, 0], images)
    logits = torch.tensor([[[5.0, 0.0], [0.0, 0.0], [2.0, 0.0]]])
    assert most_confident(logits, 0.34).tolist() == [[0]]
    assert torch.allclose(marginal_entropy(torch.zeros(1, 3, 4)), torch.log(torch.tensor([4.0])))


# ---- APT -----------------------------------------------------------------------------------------------


def test_apt_fit_predict_static(ctx, batch):
    images, _ = batch
    state = _base_state(ctx)
    defense = APT.from_params({**ctx.params, "backbone": "original", "epochs": 1, "train_batch_size": 128})
    findings = defense.fit(ctx.fit_data())
    assert _unchanged(ctx, state)
    assert defense.kind == "static"
    out1 = defense.predict(images)
    out2 = defense.predict(images)
    assert out1.shape == (6, 10) and torch.equal(out1, out2)
    assert defense.counter.images == 12 and defense.counter.forward == 12
    x = images.clone().requires_grad_(True)
    defense.attack_surface()(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert "loss_curve" in findings and findings["context_norm"]["moved"] > 0
    assert "backbone" not in findings  # backbone: original


def test_apt_schedule_is_dassls_with_the_warmup_recounted(ctx, monkeypatch):
    """APT's code trains with Dassl's scheduler: a constant warm-up epoch, then a cosine of period ``epochs``
    counted from the end of the warm-up, so that no epoch trains at rate 0."""
    import math

    from vlmdefense.defenses.training_time import apt

    seen: list = []

    def no_training(loop, task, images, labels):
        seen.append(loop)
        return []

    monkeypatch.setattr(apt.AdversarialLoop, "run", no_training)
    epochs, lr, warmup_lr = 5, 0.01, 1e-5
    params = {**ctx.params, "backbone": "original", "epochs": epochs, "warmup_epochs": 1, "lr": lr}
    APT.from_params({**params, "warmup_lr": warmup_lr}).fit(ctx.fit_data())
    rates = [seen[0].schedule(0, epoch, 0) for epoch in range(epochs)]
    assert rates[0] == warmup_lr
    assert rates[1:] == pytest.approx([lr * 0.5 * (1 + math.cos(math.pi * (e - 1) / epochs)) for e in range(1, epochs)])
    assert rates[-1] > 0.09 * lr


# ---- R-TPT ---------------------------------------------------------------------------------------------


def test_rtpt_predict_counts_and_adaptive_surface(ctx, batch):
    images, labels = batch
    state = _base_state(ctx)
    defense = RTPT.from_params(ctx.params)
    defense.fit(ctx.fit_data())
    assert defense.randomized and defense.kind == "inference"
    out = defense.predict(images)
    assert out.shape == (6, 10)
    cfg = defense.config
    assert defense.counter.images == 6 and defense.counter.forward == 6 * cfg.n_views
    assert defense.counter.backward == 6 * cfg.steps
    x = images.clone().requires_grad_(True)
    F.cross_entropy(defense.attack_surface()(x), labels).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert _unchanged(ctx, state)


def test_rtpt_step_lowers_the_entropy_and_weights_sum_to_one(ctx, batch):
    images, _ = batch
    defense = RTPT.from_params({"n_views": 6, "neighbours": 2, "selection": 0.5, "lr": 0.05})
    defense.fit(ctx.fit_data())
    torch.manual_seed(0)
    out = defense.run(images)
    assert out.weights.shape == (6, 6) and torch.allclose(out.weights.sum(1), torch.ones(6), atol=1e-5)
    with torch.no_grad():
        features = defense.view_features(images)
    torch.manual_seed(1)
    ctx_tuned, selected, before = defense.tune(features)
    with torch.no_grad():
        after = entropy(gather_views(defense.view_logits(features, ctx_tuned), selected)).mean(1)
    assert (after <= before + 1e-6).float().mean() >= 0.8


def test_rtpt_batch_equals_one_by_one(ctx, batch):
    """Tuning a batch at once equals tuning every image alone (summed loss, elementwise AdamW)."""
    images, _ = batch
    defense = RTPT.from_params({"n_views": 4, "neighbours": 2, "selection": 0.5})
    defense.fit(ctx.fit_data())
    with torch.no_grad():
        features = defense.view_features(images)
    together, _, _ = defense.tune(features)
    alone = torch.cat([defense.tune(features[i : i + 1])[0] for i in range(len(images))])
    assert torch.allclose(together, alone, atol=1e-6)


# ---- TAPT ----------------------------------------------------------------------------------------------


def test_tapt_fit_predict_and_surface(ctx, batch):
    images, labels = batch
    state = _base_state(ctx)
    defense = TAPT.from_params({**ctx.params, "train_batch_size": 128, "lr_tta": 0.05})
    defense.fit(ctx.fit_data())
    assert _unchanged(ctx, state)
    assert set(defense.stats) == {"clean", "adversarial"}
    mean, var = defense.stats["clean"]
    assert mean.shape == var.shape == (defense.config.align_layers, 17 + defense.config.n_ctx_vision, 96)
    out = defense.predict(images)
    assert out.shape == (6, 10) and defense.counter.images == 6 and defense.counter.backward > 0
    # the test-time step changes the prompts of every image separately
    prompts, info = defense.tune(images)
    assert prompts.vision.shape[0] == 6 and prompts.text.shape[0] == 6
    assert not torch.allclose(prompts.vision[0], defense.prompts.vision)
    assert {"entropy", "alignment"} <= set(info)
    x = images.clone().requires_grad_(True)
    F.cross_entropy(defense.attack_surface()(x), labels).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
