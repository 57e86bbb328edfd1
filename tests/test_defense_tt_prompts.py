"""Adversarial prompt tuning (AdvPT, FAP, CBA-FAPT) on the quick profile's scale."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from vlmdefense.defenses import create_defense
from vlmdefense.defenses.prompt_learner import ContextInit, PromptLearner
from vlmdefense.defenses.training_time.adversarial_prompts import CoupledPrompts, few_shot_indices, kl_per_sample
from vlmdefense.defenses.training_time.advpt import AdvPT, feature_attack, raw_embeddings
from vlmdefense.defenses.training_time.cba_fapt import Attributions, CBAFAPTConfig, CBAFAPTTask, run_block
from vlmdefense.defenses.training_time.fap import FAP, FAPTask, fap_consistency
from vlmdefense.workbench import harness

METHODS = ("advpt", "fap", "cba-fapt")
TEMPLATE = "a photo of the digit {name}."
SEEN = [0, 1, 2, 3, 4]


@pytest.fixture(scope="session")
def ctx() -> harness.Context:
    return harness.setup("fap", "quick")


@pytest.fixture(scope="session")
def fitted(ctx: harness.Context) -> dict:
    """Each method fitted once on the quick budget, with a bit-for-bit check of both towers around it."""
    out = {}
    for method in METHODS:
        before = {k: v.detach().clone() for k, v in ctx.clip.model.state_dict().items()}
        defense = create_defense(method, **ctx.params)
        harness.fit(ctx, defense)
        findings = dict(ctx.findings)
        after = ctx.clip.model.state_dict()
        out[method] = (defense, findings, all(torch.equal(before[k], after[k]) for k in before))
    return out


def _prompts(ctx: harness.Context, depth: int = 2) -> CoupledPrompts:
    torch.manual_seed(0)
    return CoupledPrompts(ctx.clip, ctx.prompts, 2, depth, TEMPLATE)


# ---- shared: frozen towers, static predictions, the few-shot split ----------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_prompt_tuning_leaves_both_towers_bit_identical(ctx, fitted, method):
    defense, findings, unchanged = fitted[method]
    assert unchanged, f"{method} changed a CLIP weight"
    assert not any(p.grad is not None and p.grad.abs().sum() > 0 for p in ctx.clip.model.parameters())
    images = ctx.sets.test.images[:8]
    first, second = defense.predict(images), defense.predict(images)
    assert first.shape == (8, 10) and torch.equal(first, second)
    assert not torch.allclose(first, ctx.base(images)), "the learned prompts changed nothing"
    assert defense.kind == "static" and not defense.randomized and findings["loss_curve"]
    x = images.clone().requires_grad_(True)
    defense.attack_surface()(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # the predictions run through the CLIP's own towers, not a (possibly trained) copy of them
    clip_ids = {id(p) for p in ctx.clip.model.parameters()}
    prompt_ids = {id(p) for p in defense.prompts.learnable()} if method != "advpt" else set()
    modules = [m for m in vars(defense).values() if isinstance(m, torch.nn.Module)]
    assert modules and all(id(p) in clip_ids | prompt_ids for m in modules for p in m.parameters())


def test_few_shot_split_has_exactly_the_stated_shots(ctx, fitted):
    labels = ctx.seen_train.labels
    index = few_shot_indices(labels, 3, seed=1)
    counts = torch.bincount(labels[index], minlength=10)
    assert counts[SEEN].tolist() == [3] * 5 and counts.sum() == 15
    assert len(set(index.tolist())) == 15
    assert torch.equal(index, few_shot_indices(labels, 3, seed=1))
    assert not torch.equal(index, few_shot_indices(labels, 3, seed=2))
    with pytest.raises(ValueError):
        few_shot_indices(labels, 10_000, seed=0)
    for method in ("fap", "cba-fapt"):
        _, findings, _ = fitted[method]
        shots = findings["hyperparameters"]["shots"]
        assert findings["shots_per_class"] == {str(c): shots for c in SEEN}
        assert findings["train_images"] == 5 * shots


def test_few_shot_training_sees_only_the_split(ctx):
    """The loop of FAP (and CBA-FAPT, same shell) trains on exactly ``shots`` images per seen class."""
    seen_labels: list[torch.Tensor] = []
    seen_images: list[torch.Tensor] = []
    defense = FAP.from_params({**ctx.params, "shots": 3, "train_batch_size": 4})
    make_task = defense.make_task

    def recording(prompts, classes):
        task = make_task(prompts, classes)
        prepare = task.prepare

        def record(images, labels):
            seen_images.append(images.clone())
            seen_labels.append(labels.clone())
            return prepare(images, labels)

        task.prepare = record  # type: ignore[method-assign]
        return task

    defense.make_task = recording  # type: ignore[method-assign]
    harness.fit(ctx, defense)
    images, labels = torch.cat(seen_images), torch.cat(seen_labels)
    assert len(labels) == 15 and torch.bincount(labels, minlength=5).tolist() == [3] * 5
    assert len(torch.unique(images.flatten(1), dim=0)) == 15


def test_coupled_prompts_start_from_the_template_and_couple_the_towers(ctx):
    shallow = _prompts(ctx, depth=1)
    with torch.no_grad():
        reference = ctx.clip.encode_texts([TEMPLATE.format(name=n) for n in ctx.prompts.classnames])
        assert torch.allclose(shallow.text_weights(), reference, atol=1e-5)
    prompts = _prompts(ctx)
    images = ctx.sets.test.images[:4]
    loss = prompts.text_weights().sum() + prompts.encode(images).features.sum()
    grads = torch.autograd.grad(
        loss, [prompts.ctx, prompts.visual_deep, prompts.to_text[0].weight, prompts.to_vision.weight]
    )
    assert all(g.abs().sum() > 0 for g in grads)
    # the image tower's layer-0 prompt is the projection of the text context
    assert torch.equal(prompts.visual_prompts()[0], prompts.to_vision(prompts.ctx))


# ---- AdvPT ---------------------------------------------------------------------------------------------


def test_advpt_bank_attack_is_bounded_and_raises_the_feature_kl(ctx):
    images = ctx.seen_train.images[:16]
    eps = 8 / 255
    torch.manual_seed(0)
    adversarial = feature_attack(ctx.clip, images, eps, steps=5)
    assert (adversarial - images).abs().max() <= eps + 1e-6 and adversarial.min() >= 0 and adversarial.max() <= 1
    with torch.no_grad():
        clean = raw_embeddings(ctx.clip, images)
        noise = (images + eps * torch.sign(torch.randn_like(images))).clamp(0, 1)
        attacked = kl_per_sample(clean, raw_embeddings(ctx.clip, adversarial)).mean()
        random = kl_per_sample(clean, raw_embeddings(ctx.clip, noise)).mean()
    assert attacked > 2 * random


def test_advpt_bank_is_independent_of_the_prompt_and_the_text_tower(ctx):
    """The bank is crafted on the image tower alone: a scrambled text tower gives the same bank, bit for bit."""
    defense = AdvPT.from_params({**ctx.params, "bank_steps": 3, "train_eps": "8/255"})
    images = ctx.seen_train.images[:12]
    scrambled = dataclasses.replace(ctx.clip, model=copy.deepcopy(ctx.clip.model))
    with torch.no_grad():
        for name, p in scrambled.model.named_parameters():
            if not name.startswith("visual."):
                p.copy_(torch.randn_like(p))
    assert not torch.allclose(
        scrambled.encode_texts(["a photo of the digit zero."]), ctx.clip.encode_texts(["a photo of the digit zero."])
    )
    torch.manual_seed(3)
    bank = defense.build_bank(ctx.clip, images)
    torch.manual_seed(3)
    assert torch.equal(bank, defense.build_bank(scrambled, images))


def test_advpt_tunes_on_the_stored_bank_without_the_image_tower(ctx, monkeypatch):
    defense = AdvPT.from_params({**ctx.params, "epochs": 4, "warmup_epochs": 0, "lr": 0.01, "train_eps": "8/255"})
    images, labels = ctx.seen_train.images[:64], ctx.seen_train.labels[:64]
    bank = defense.build_bank(ctx.clip, images)
    with torch.no_grad():
        clean = ctx.clip.encode_images(images)
    assert torch.allclose(bank.norm(dim=-1), torch.ones(64)) and (F.cosine_similarity(bank, clean) < 0.999).all()
    defense.learner = PromptLearner(ctx.clip, ctx.prompts, ContextInit(n_ctx=4, random=True))
    context = torch.nn.Parameter(defense.learner.ctx_init.clone())
    visual = type(ctx.clip.model.visual)
    monkeypatch.setattr(visual, "forward", lambda *a, **k: pytest.fail("the image tower ran during tuning"))
    history = defense.tune(context, bank, clean, labels, list(range(10)), float(ctx.base.logit_scale))
    monkeypatch.undo()
    assert len(history) == 4 and min(h["loss"] for h in history[1:]) < history[0]["loss"]
    assert not torch.equal(context.detach(), defense.learner.ctx_init)


# ---- FAP -----------------------------------------------------------------------------------------------


def test_fap_consistency_term_properties():
    clean_logits = torch.tensor([[3.0, 0.0, -1.0], [0.5, 0.2, 0.1]])
    adv_logits = torch.tensor([[0.0, 2.0, 0.0], [0.1, 0.9, 0.0]])
    features = F.normalize(torch.randn(2, 8), dim=-1)
    # cross-modal consistency: nothing to pay when the predictions agree, whatever the features
    assert fap_consistency(clean_logits, clean_logits, features, features).abs() < 1e-6
    kl = kl_per_sample(clean_logits, adv_logits)
    # the official direction: KL(p_clean || p_adv), the clean prediction is the target
    p_clean, p_adv = clean_logits.softmax(-1), adv_logits.softmax(-1)
    assert torch.allclose(kl, (p_clean * (p_clean.log() - p_adv.log())).sum(-1))
    assert not torch.allclose(kl, (p_adv * (p_adv.log() - p_clean.log())).sum(-1))
    assert torch.allclose(fap_consistency(clean_logits, adv_logits, features, features), 2 * kl.mean())
    assert torch.allclose(fap_consistency(clean_logits, adv_logits, features, -features), torch.zeros(()), atol=1e-6)
    # uni-modal term: its gradient moves the adversarial features away from the clean ones
    adv = F.normalize(features + 0.3 * torch.randn(2, 8), dim=-1).requires_grad_(True)
    fap_consistency(clean_logits, adv_logits, features, adv).backward()
    assert adv.grad is not None
    moved = adv.detach() - 0.05 * adv.grad
    assert (F.cosine_similarity(moved, features) < F.cosine_similarity(adv.detach(), features)).all()


def test_fap_attack_raises_the_kl_and_loss_combines_both_terms(ctx):
    prompts = _prompts(ctx)
    task = FAPTask(prompts, SEEN, lam=1.5)
    images, labels = ctx.seen_train.images[:8], ctx.seen_train.labels[:8]
    with torch.no_grad():
        state = task.prepare(images, labels)
        assert task.attack_objective(state, images) < 1e-4
    x_adv = (images + 4 / 255 * torch.sign(torch.randn_like(images))).clamp(0, 1)
    loss, parts = task.training_loss(state, x_adv)
    assert loss.item() == pytest.approx((parts["natural_ce"] + 1.5 * parts["weighted_kl"]) / 8, rel=1e-4)
    assert FAP.from_params({"fast": True}).config.shots == 4


# ---- CBA-FAPT ------------------------------------------------------------------------------------------


def test_cba_fapt_block_rewrite_and_features_are_exact(ctx):
    prompts = _prompts(ctx)
    images = ctx.sets.test.images[:4]
    with torch.no_grad():
        out = prompts.encode(images, record=True)
        block = list(ctx.clip.model.visual.transformer.resblocks)[-1]
        x = out.block_inputs[-1]
        parts = run_block(block, x, torch.zeros(4, dtype=torch.long))
        assert torch.allclose(parts.output, block(x), atol=1e-5)
    attributions = Attributions(prompts, SEEN)
    logits, visual, text = attributions(images, torch.tensor([0, 1, 2, 3]))
    with torch.no_grad():
        reference = prompts(images, prompts.text_weights()[SEEN])
    assert torch.allclose(logits, reference, atol=1e-4)
    assert visual.shape == (4, 16) and (visual >= 0).all() and torch.allclose(visual.sum(-1), torch.ones(4))
    assert (text >= 0).all() and torch.allclose(text.sum(-1), torch.ones(4))


def test_cba_fapt_alignment_terms_vanish_on_clean_copies_and_their_step_lowers_them(ctx):
    prompts = _prompts(ctx)
    images, labels = ctx.seen_train.images[:8], ctx.seen_train.labels[:8]
    _, parts = CBAFAPTTask(prompts, SEEN, CBAFAPTConfig()).training_loss((images, labels), images.clone())
    assert parts["visual_l2"] < 1e-8 and abs(parts["textual_kl"]) < 1e-6
    x_adv = (images + 8 / 255 * torch.sign(torch.randn_like(images))).clamp(0, 1)

    def visual_l2() -> torch.Tensor:
        attributions = Attributions(prompts, SEEN)
        return (attributions(images, labels)[1] - attributions(x_adv, labels)[1]).pow(2).sum(-1).mean()

    first = visual_l2()
    grads = torch.autograd.grad(first, prompts.learnable(), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "the attribution term does not reach the prompts"
    norm = torch.sqrt(sum((g**2).sum() for g in grads if g is not None))
    with torch.no_grad():
        for p, g in zip(prompts.learnable(), grads, strict=True):
            if g is not None:
                p -= 1e-3 * g / norm
    assert visual_l2().item() < first.item()
