"""Sim-CLIP, MMCoA and LEAF on the quick profile's scale: the defining property of each, and the text attacks."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from vlmdefense.defenses import create_defense
from vlmdefense.defenses.training_time.fare import FARE
from vlmdefense.defenses.training_time.leaf import LEAF, is_text_parameter
from vlmdefense.defenses.training_time.mmcoa import MMCoA, symmetric_contrastive
from vlmdefense.defenses.training_time.sim_clip import SimCLIP, SimCLIPConfig, siamese_loss
from vlmdefense.defenses.training_time.text_attacks import (
    CHARACTERS,
    _kl_from,
    _replace_core,
    caption_vocabulary,
    character_attack,
    charmer_classification_attack,
    edit,
    protected_words,
    substitute_pool,
    text_encoder,
    text_margins,
    word_substitution_attack,
    words_of,
)
from vlmdefense.workbench import harness
from vlmdefense.workbench.evaluation import text_classifier_weights


@pytest.fixture(scope="session")
def ctx() -> harness.Context:
    return harness.setup("sim-clip", "quick")


@pytest.fixture(scope="session")
def fitted(ctx: harness.Context) -> dict[str, object]:
    """Each method fitted once on a tiny budget (LEAF with the original image tower)."""
    before = {k: v.clone() for k, v in ctx.clip.model.state_dict().items()}
    out = {}
    for method, extra in (("sim-clip", {}), ("mmcoa", {}), ("leaf", {"image_tower": "original"})):
        defense = create_defense(method, **{**ctx.params, "train_limit": 32, **extra})
        harness.fit(ctx, defense)
        out[method] = defense
    assert all(torch.equal(before[k], v) for k, v in ctx.clip.model.state_dict().items()), "fit changed the base"
    return out


def _moved(defense: object, ctx: harness.Context) -> set[str]:
    tuned = defense.classifier.model.state_dict()  # type: ignore[attr-defined]
    return {k for k, v in ctx.clip.model.state_dict().items() if not torch.equal(tuned[k], v)}


def _levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


# ---- Sim-CLIP ------------------------------------------------------------------------------------


def test_siamese_loss_halves_the_gradient_of_each_side() -> None:
    """The stop-gradients: each embedding receives half the gradient of 1 − cos (without them it would
    receive all of it), and the gradient is orthogonal to the embedding (cosine, unlike FARE's L2)."""
    torch.manual_seed(0)
    p, z = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    loss = siamese_loss(p, z)
    assert loss.item() == pytest.approx(1 - F.cosine_similarity(p, z).mean().item(), abs=1e-6)
    gp, gz = torch.autograd.grad(loss, (p, z))
    fp, fz = torch.autograd.grad(1 - F.cosine_similarity(p, z).mean(), (p, z))
    assert torch.allclose(gp, 0.5 * fp, atol=1e-7) and torch.allclose(gz, 0.5 * fz, atol=1e-7)
    assert (gp * p).sum(-1).abs().max() < 1e-6


def test_sim_clip_clean_view_decides_where_the_gradient_flows(ctx: harness.Context) -> None:
    data = ctx.fit_data()
    x = ctx.seen_train.images[:8]
    x_adv = (x + 8 / 255 * torch.sign(torch.randn_like(x))).clamp(0, 1)

    def grads(clean_view: str, one_sided: bool = False) -> list[torch.Tensor]:
        defense = SimCLIP(SimCLIPConfig(clean_view=clean_view))
        defense.original, defense.classifier = data.base, defense._tuned_copy(data)
        batch = defense.reference({"images": x, "labels": ctx.seen_train.labels[:8]})
        if one_sided:
            loss = 1 - F.cosine_similarity(defense._features(x_adv), batch["original"]).mean()
        else:
            loss = defense.training_loss(batch, x_adv)[0]
        params = [p for p in defense.classifier.model.visual.parameters() if p.requires_grad]
        return list(torch.autograd.grad(loss, params))

    original, one_sided, shared = grads("original"), grads("original", True), grads("shared")
    assert all(torch.allclose(a, 0.5 * b, atol=1e-6) for a, b in zip(original, one_sided, strict=True))
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(original, shared, strict=True))
    with pytest.raises(ValueError):
        SimCLIP(SimCLIPConfig(clean_view="momentum"))


def test_sim_clip_is_label_free_and_tunes_the_image_tower_only(ctx: harness.Context, fitted: dict) -> None:
    defense = fitted["sim-clip"]
    moved = _moved(defense, ctx)
    assert moved and all(k.startswith("visual.") for k in moved)
    assert torch.equal(defense.classifier.text_weights, ctx.base.text_weights)
    assert not defense.needs_labels and defense.config.optimizer == "adamw"
    # the attack objective reads no label: FARE's distance to the original clean embedding
    fare = FARE()
    fare.original, fare.classifier = defense.original, defense.classifier
    x = ctx.seen_train.images[:4]
    batch = defense.reference({"images": x})
    assert defense.attack_objective(batch, x).item() == pytest.approx(fare._distance(batch, x).item())


# ---- MMCoA ---------------------------------------------------------------------------------------


def test_word_substitution_changes_one_unprotected_word_and_picks_the_farthest(ctx: harness.Context) -> None:
    encode = text_encoder(ctx.clip)
    pool, protected = substitute_pool(ctx.prompts), protected_words(ctx.prompts)
    assert pool and not set(pool) & protected and "digit" in pool
    sentences = [p for c in (0, 3, 7) for p in ctx.prompts.prompts(c)]
    attacked = word_substitution_attack(encode, sentences, pool, protected, n_words=1)
    origins = encode(sentences)
    for sentence, new, origin in zip(sentences, attacked, origins, strict=True):
        old_words, new_words = sentence.split(" "), new.split(" ")
        diff = [i for i, (a, b) in enumerate(zip(old_words, new_words, strict=True)) if a != b]
        assert len(old_words) == len(new_words) and len(diff) <= 1
        assert words_of(sentence) & protected <= words_of(new)
        if diff:
            i = diff[0]
            options = [" ".join([*old_words[:i], _replace_core(old_words[i], s), *old_words[i + 1 :]]) for s in pool]
            # Scored in one batch; the KL scores are about 1e-6 to 1e-5, and float32 log-softmax values near
            # log(1/64) carry absolute errors of a few 1e-7, so a different batch may rank near-ties differently.
            scores = _kl_from(origin, encode(options))
            assert new in options and scores[options.index(new)] >= scores.max() - 1e-6


def test_symmetric_contrastive_matches_pairs() -> None:
    torch.manual_seed(0)
    images = torch.randn(5, 8)
    aligned = symmetric_contrastive(images, images.clone(), 20.0)
    shuffled = symmetric_contrastive(images, images.roll(1, 0), 20.0)
    assert aligned < shuffled
    assert symmetric_contrastive(images, images.roll(1, 0), 20.0) == pytest.approx(
        symmetric_contrastive(images.roll(1, 0), images, 20.0).item()
    )


def test_mmcoa_tunes_both_towers_and_both_pairs_train_both(ctx: harness.Context, fitted: dict) -> None:
    defense = fitted["mmcoa"]
    moved = _moved(defense, ctx)
    assert any(k.startswith("visual.") for k in moved) and any(is_text_parameter(k) for k in moved)
    assert not any(k.startswith("logit_") for k in moved)
    expected = text_classifier_weights(defense.classifier.clip, ctx.prompts)
    assert torch.allclose(defense.classifier.text_weights, expected, atol=1e-6)
    assert not torch.allclose(defense.classifier.text_weights, ctx.base.text_weights)
    assert set(ctx.findings["text_attack"]) == {"original", "tuned"}
    # from a fresh copy: each adversarial pair alone sends gradient into both towers
    for weights in ((1.0, 0.0), (0.0, 1.0)):
        fresh = MMCoA.from_params({"lambda_image": weights[0], "lambda_text": weights[1]})
        data = ctx.fit_data()
        fresh._substitutes, fresh._protected = substitute_pool(ctx.prompts), protected_words(ctx.prompts)
        fresh.original, fresh.classifier = data.base, fresh._tuned_copy(data)
        fresh.train_classes = list(range(10))
        x, y = ctx.seen_train.images[:6], ctx.seen_train.labels[:6]
        with torch.no_grad():
            batch = fresh.reference({"images": x, "labels": y})
        loss, _ = fresh.training_loss(batch, (x + 4 / 255).clamp(0, 1))
        loss.backward()
        grads = {n: p.grad for n, p in fresh.classifier.model.named_parameters() if p.grad is not None}
        assert any(n.startswith("visual.") and g.abs().sum() > 0 for n, g in grads.items())
        assert any(is_text_parameter(n) and g.abs().sum() > 0 for n, g in grads.items())
        # the pairing: the image pair reads the adversarial image and the clean caption, the text pair the
        # clean image and the adversarial caption (each loss is blind to the other pair's adversarial input)
        with torch.no_grad():
            other_image = fresh.training_loss(batch, (x - 4 / 255).clamp(0, 1))[0]
            other_text = fresh.training_loss({**batch, "adversarial_captions": batch["captions"]}, x)[0]
            same_text = fresh.training_loss(
                {**batch, "adversarial_captions": batch["captions"]}, (x + 4 / 255).clamp(0, 1)
            )[0]
        if weights == (1.0, 0.0):
            assert other_image != pytest.approx(loss.item()) and same_text == pytest.approx(loss.item())
        else:
            assert other_image == pytest.approx(loss.item()) and batch["changed"] > 0
            assert other_text != pytest.approx(loss.item())


# ---- LEAF ----------------------------------------------------------------------------------------


def test_edit_inserts_replaces_and_deletes() -> None:
    assert edit("abc", 0, "x") == "xabc" and edit("abc", 6, "x") == "abcx"
    assert edit("abc", 3, "x") == "axc" and edit("abc", 3, None) == "ac"
    assert edit("abc", 3, "b") == "ac" and edit("abc", 2, None) == "abc"


def test_character_attack_stays_within_k_edits_and_the_constraint(ctx: harness.Context) -> None:
    encode = text_encoder(ctx.clip)
    sentences = [p for c in (1, 4) for p in ctx.prompts.prompts(c)]
    dictionary = caption_vocabulary(ctx.prompts)
    for k in (1, 2):
        attacked = character_attack(encode, sentences, encode(sentences), 12, k, random.Random(0), dictionary)
        again = character_attack(encode, sentences, encode(sentences), 12, k, random.Random(0), dictionary)
        assert attacked == again
        for s, a in zip(sentences, attacked, strict=True):
            assert 1 <= _levenshtein(s, a) <= k
            assert words_of(a) & dictionary < words_of(s) & dictionary  # a word broken, none created
    # the attack beats a random edit of the same budget on the embedding distance
    rng = random.Random(1)
    anchors = encode(sentences)
    attacked = character_attack(encode, sentences, anchors, 30, 1, random.Random(0), None)
    randomly = [edit(s, rng.randrange(2 * len(s) + 1), rng.choice("abcxyz ")) for s in sentences]
    assert (encode(attacked) - anchors).pow(2).sum(-1).mean() > (encode(randomly) - anchors).pow(2).sum(-1).mean()


def test_charmer_maximises_the_margin_within_k_edits_and_stops_on_success(ctx: harness.Context) -> None:
    """The paper's evaluation attack: per round at most one edit, deterministic, the constraint holds, a
    sentence already misclassified is left alone, and the chosen edit's margin is the best of all single
    edits at the best slots (checked against a brute force over every slot and character)."""
    encode = text_encoder(ctx.clip)
    sentences = [p for c in (0, 6) for p in ctx.prompts.prompts(c)[:3]]
    labels = [0, 0, 0, 6, 6, 6]
    torch.manual_seed(0)
    prototypes = F.normalize(torch.randn(10, encode(sentences[:1]).shape[-1]), dim=-1)
    prototypes[0] = F.normalize(encode([sentences[0]]), dim=-1)[0]  # sentence 0 starts correctly classified
    dictionary = caption_vocabulary(ctx.prompts)
    before = text_margins(encode, sentences, torch.tensor(labels), prototypes)
    rounds = charmer_classification_attack(encode, sentences, labels, prototypes, 4, 2, dictionary)
    assert rounds == charmer_classification_attack(encode, sentences, labels, prototypes, 4, 2, dictionary)
    assert len(rounds) == 2
    after = text_margins(encode, rounds[0], torch.tensor(labels), prototypes)
    for i, (s, one, two) in enumerate(zip(sentences, rounds[0], rounds[1], strict=True)):
        assert _levenshtein(s, one) <= 1 and _levenshtein(one, two) <= 1
        if one != s:
            assert words_of(one) & dictionary < words_of(s) & dictionary
        if after[i] > 0:  # misclassified after one edit: the second round leaves it
            assert two == one
    assert before[0] < 0  # a correctly classified sentence is attacked too
    assert charmer_classification_attack(encode, sentences, labels, prototypes, 4, 3, dictionary)[:2] == rounds
    # unconstrained, rho = every slot: the first round is the best single edit of all (a brute force)
    s, y = sentences[0], labels[0]
    every = charmer_classification_attack(encode, [s], [y], prototypes, 2 * len(s) + 1, 1)[0][0]
    brute = [edit(s, z, ch) for z in range(2 * len(s) + 1) for ch in CHARACTERS]
    best = text_margins(encode, brute, torch.full((len(brute),), y), prototypes).max()
    assert text_margins(encode, [every], torch.tensor([y]), prototypes)[0] == pytest.approx(best.item(), abs=1e-5)


def test_leaf_changes_only_the_text_tower(ctx: harness.Context, fitted: dict) -> None:
    defense = fitted["leaf"]
    moved = _moved(defense, ctx)
    assert moved and all(is_text_parameter(k) for k in moved)
    tuned = defense.classifier.model.state_dict()
    for key, value in ctx.clip.model.state_dict().items():
        if not is_text_parameter(key):
            assert torch.equal(tuned[key], value), key
    assert not torch.allclose(defense.classifier.text_weights, ctx.base.text_weights)
    assert ctx.findings["train_captions"] == 8 * len(ctx.prompts.seen_classes)
    table = ctx.findings["text_classification"]["k=1"]
    assert set(table) == {"original", "tuned"}  # the original image tower: no third model
    for row in table.values():
        assert row["attacked"]["all"] <= row["clean"]["all"]


def test_leaf_with_fare_keeps_fares_image_tower(ctx: harness.Context) -> None:
    data = ctx.fit_data()
    leaf = LEAF.from_params({"fast": True, "epochs": 1, "eval_k": 1})
    leaf.fit(data)
    fare = FARE.from_params({"fast": True, "seed": 0})
    fare.fit(data)
    for key, value in fare.tuned_state().items():
        assert torch.equal(leaf.classifier.model.visual.state_dict()[key].cpu(), value), key
    with pytest.raises(ValueError):
        LEAF.from_params({"image_tower": "tecoa"})
