"""TGA-ZSR, MAT and LAAT (adversarial fine-tuning with alignment terms) on the quick profile's scale."""

from __future__ import annotations

import math
from typing import TypeVar

import pytest
import torch
import torch.nn.functional as F

from vlmdefense.defenses import create_defense
from vlmdefense.defenses.training_time.attention_maps import attention_maps, map_distance, upsample
from vlmdefense.defenses.training_time.finetuning import AdversarialFineTuning
from vlmdefense.defenses.training_time.laat import LAAT, expand_anchors, mean_pairwise_cosine
from vlmdefense.defenses.training_time.mat import (
    MAT,
    Vocabulary,
    caption_loss,
    encode_tokens,
    multi_positive_ce,
    substitute_words,
)
from vlmdefense.defenses.training_time.tga_zsr import TGAZSR
from vlmdefense.workbench import harness
from vlmdefense.workbench.attacks import PGD
from vlmdefense.workbench.evaluation import text_classifier_weights

T = TypeVar("T", bound=AdversarialFineTuning)


@pytest.fixture(scope="module")
def ctx() -> harness.Context:
    return harness.setup("tga-zsr", "quick")


def _start(defense: T, ctx: harness.Context) -> T:
    """The defense at initialisation (the fine-tuned copy equals the original model)."""
    defense.original = ctx.base
    defense.classifier = defense._tuned_copy(ctx.fit_data())
    defense.train_classes = list(range(len(ctx.prompts.classnames)))
    return defense


def _batch(ctx: harness.Context, n: int = 16) -> dict[str, torch.Tensor]:
    train = ctx.seen_train
    return {"images": train.images[:n], "labels": train.labels[:n]}


# ---- TGA-ZSR --------------------------------------------------------------------------------------


def test_attention_maps_are_normalised_and_text_guided(ctx: harness.Context) -> None:
    images = ctx.seen_train.images[:6]
    weights = ctx.base.text_weights
    with torch.no_grad():
        maps = attention_maps(ctx.base.clip, images, weights[ctx.seen_train.labels[:6]])
        other = attention_maps(ctx.base.clip, images, weights[(ctx.seen_train.labels[:6] + 3) % 10])
    assert maps.shape == (6, 16)  # the 4x4 patch grid of the small CLIP
    assert torch.allclose(maps.min(dim=1).values, torch.zeros(6)) and torch.allclose(
        maps.max(dim=1).values, torch.ones(6)
    )
    assert map_distance(maps, other, "l2", 16) > 0.5, "the map must depend on the text"


def test_map_distances_on_the_patch_grid_equal_those_of_the_upsampled_maps() -> None:
    a, b = torch.rand(3, 16), torch.rand(3, 16)
    big_a, big_b = upsample(a, 40), upsample(b, 40)
    assert big_a.shape == (3, 1600)
    l2 = (big_a - big_b).norm(dim=1).mean()
    cos = (1 - F.cosine_similarity(big_a, big_b, dim=1)).mean()
    assert torch.allclose(map_distance(a, b, "l2", 40), l2, rtol=1e-4)
    assert torch.allclose(map_distance(a, b, "cos", 40), cos, rtol=1e-4, atol=1e-6)


def _tga(ctx: harness.Context, **params: float) -> TGAZSR:
    defense = create_defense("tga-zsr", **{**ctx.params, **params})
    assert isinstance(defense, TGAZSR)
    return defense


def test_tga_zsr_constraint_is_zero_at_initialisation(ctx: harness.Context) -> None:
    defense = _start(_tga(ctx), ctx)
    batch = defense.reference(_batch(ctx))
    x_adv = PGD(eps=ctx.headline.value, steps=2)(ctx.base, batch["images"], batch["labels"])
    _, refinement, constraint = defense.attention_terms(batch, x_adv)
    assert constraint.item() < 1e-3
    assert refinement.item() > 1.0, "the attack must move the attention map of the original model"


def _refinement_after_steps(
    ctx: harness.Context, alpha: float, steps: int = 6, lr: float = 1e-5
) -> tuple[float, float]:
    """Refinement distance on a fixed batch before and after ``steps`` SGD steps on the TGA-ZSR loss."""
    torch.manual_seed(0)
    defense = _start(_tga(ctx, alpha=alpha, beta=0.0), ctx)
    assert defense.classifier is not None
    batch = defense.reference(_batch(ctx))
    x_adv = PGD(eps=ctx.headline.value, steps=2)(ctx.base, batch["images"], batch["labels"])
    parameters = [p for p in defense.classifier.model.visual.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=0.9)
    with torch.no_grad():
        before = defense.attention_terms(batch, x_adv)[1].item()
    for _ in range(steps):
        loss, _ = defense.training_loss(batch, x_adv)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = defense.attention_terms(batch, x_adv)[1].item()
    return before, after


def test_tga_zsr_alignment_term_lowers_adversarial_to_clean_attention_distance(ctx: harness.Context) -> None:
    before, with_term = _refinement_after_steps(ctx, alpha=1.0)
    _, without_term = _refinement_after_steps(ctx, alpha=0.0)
    assert with_term < before, "the attention-refinement term must pull the adversarial map to the clean one"
    assert with_term < without_term - 1.0, "the alignment must come from the term, not from the cross-entropy"


# ---- MAT --------------------------------------------------------------------------------------------


def test_multi_positive_ce_is_cross_entropy_with_one_positive() -> None:
    logits = torch.randn(5, 7)
    labels = torch.tensor([0, 3, 6, 2, 2])
    positives = torch.nn.functional.one_hot(labels, 7).bool()
    assert torch.allclose(multi_positive_ce(logits, positives), F.cross_entropy(logits, labels, reduction="none"))


def test_mat_word_substitution_keeps_class_names_and_raises_the_loss(ctx: harness.Context) -> None:
    clip, prompts = ctx.base.clip, ctx.prompts
    vocabulary = Vocabulary(clip, prompts)
    tokens = torch.stack([clip.tokenizer(prompts.prompts(c)) for c in range(10)]).flatten(0, 1)
    classes = torch.arange(10).repeat_interleave(len(prompts.templates))
    images = ctx.seen_train.images[:40]
    with torch.no_grad():
        embedded = ctx.base.embed(images)
    loss_of = caption_loss(ctx.base.logit_scale, embedded, ctx.seen_train.labels[:40], classes)
    adversarial = substitute_words(clip, tokens, loss_of, vocabulary, budget=1, candidates=4)
    changed = adversarial != tokens
    assert changed.any(), "the attack must substitute words"
    assert (changed.sum(dim=1) <= 1).all(), "one word per caption at budget 1"
    for token in vocabulary.protected | vocabulary.special:
        assert torch.equal(adversarial == token, tokens == token), "class names and special tokens stay"
    with torch.no_grad():
        before, after = loss_of(encode_tokens(clip, tokens)), loss_of(encode_tokens(clip, adversarial))
    assert (after >= before - 1e-5).all() and (after > before + 1e-3).any()


def test_mat_trains_both_towers_and_classifies_with_the_tuned_text_tower(ctx: harness.Context) -> None:
    defense = create_defense("mat", **{**ctx.params, "train_limit": 32})
    assert isinstance(defense, MAT)
    harness.fit(ctx, defense)
    assert defense.classifier is not None
    tuned, base = defense.classifier.model, ctx.base.model
    assert not torch.equal(tuned.token_embedding.weight, base.token_embedding.weight), "text tower must train"
    assert not torch.equal(tuned.visual.conv1.weight, base.visual.conv1.weight), "image tower must train"
    assert torch.equal(tuned.logit_scale, base.logit_scale)
    expected = text_classifier_weights(defense.classifier.clip, ctx.prompts)
    assert torch.allclose(defense.classifier.text_weights, expected, atol=1e-6)
    assert not torch.allclose(defense.classifier.text_weights, ctx.base.text_weights, atol=1e-4)


def test_mat_pairs_draw_distinct_templates_of_the_true_class(ctx: harness.Context) -> None:
    defense = create_defense("mat", **{**ctx.params, "captions_per_image": 3})
    assert isinstance(defense, MAT)
    defense.captions = torch.stack([ctx.base.clip.tokenizer(ctx.prompts.prompts(c)) for c in range(10)])
    defense.train_classes = list(range(10))
    labels = torch.tensor([0, 4, 9])
    tokens, classes = defense._pairs(labels)
    assert tokens.shape[0] == 9 and classes.tolist() == [0, 0, 0, 4, 4, 4, 9, 9, 9]
    for i, label in enumerate(labels.tolist()):
        rows = {tuple(t.tolist()) for t in tokens[3 * i : 3 * i + 3]}
        pool = {tuple(t.tolist()) for t in defense.captions[label]}
        assert len(rows) == 3 and rows <= pool


def test_mat_class_negatives_are_the_absent_training_classes_and_never_positive(ctx: harness.Context) -> None:
    defense = create_defense("mat", **ctx.params)
    assert isinstance(defense, MAT) and defense.config.class_negatives
    defense.captions = torch.stack([ctx.base.clip.tokenizer(ctx.prompts.prompts(c)) for c in range(10)])
    defense.train_classes = list(range(10))
    classes = torch.tensor([0, 4, 4, 2])
    negatives = defense._negative_tokens(classes)
    absent = [1, 3, 5, 6, 7, 8, 9]
    assert len(negatives) == len(absent)
    for row, label in zip(negatives, absent, strict=True):
        assert any(torch.equal(row, t) for t in defense.captions[label])
    batch = {"classes": classes, "text_classes": torch.tensor([0, 4, 2]), "negatives": negatives}
    positives = defense._image_to_text_positives(batch)
    assert positives.shape == (4, 3 + len(absent)) and not positives[:, 3:].any()
    expected = [[True, False, False], [False, True, False], [False, True, False], [False, False, True]]
    assert positives[:, :3].tolist() == expected
    plain = create_defense("mat", **{**ctx.params, "class_negatives": False})
    assert isinstance(plain, MAT)
    plain.captions, plain.train_classes = defense.captions, defense.train_classes
    assert len(plain._negative_tokens(classes)) == 0


# ---- LAAT -------------------------------------------------------------------------------------------


def test_laat_expansion_spreads_the_reference_anchors_to_a_right_angle() -> None:
    torch.manual_seed(0)
    anchors = F.normalize(torch.randn(8, 16) * 0.3 + torch.ones(16), dim=-1)  # crowded, like CLIP's
    reference = [0, 1, 2, 3, 4]
    expanded = expand_anchors(anchors, reference)
    mean = F.normalize(anchors[reference].mean(dim=0), dim=0)
    angles = torch.arccos((expanded @ mean).clamp(-1, 1))
    before = torch.arccos((anchors @ mean).clamp(-1, 1))
    assert torch.allclose(expanded.norm(dim=-1), torch.ones(8), atol=1e-5)
    assert abs(angles[reference].max().item() - math.pi / 2) < 1e-4
    assert torch.allclose(angles / before, angles[0] / before[0], atol=1e-4), "angles scale by one factor"
    assert mean_pairwise_cosine(expanded[reference]) < mean_pairwise_cosine(anchors[reference]) - 0.3
    # novel classes follow the rule fitted on the reference classes only
    assert torch.allclose(expand_anchors(anchors[:5], reference)[:5], expanded[:5], atol=1e-5)


def test_laat_trains_against_fixed_expanded_anchors(ctx: harness.Context) -> None:
    defense = create_defense("laat", **{**ctx.params, "train_limit": 32})
    assert isinstance(defense, LAAT)
    before = {k: v.clone() for k, v in ctx.base.model.state_dict().items() if not k.startswith("visual.")}
    harness.fit(ctx, defense)
    assert defense.classifier is not None
    expected = expand_anchors(ctx.base.text_weights, list(ctx.prompts.seen_classes))
    assert torch.allclose(defense.classifier.text_weights, expected)
    assert defense.train_classes == list(range(10)) and defense.config.tau == pytest.approx(0.07)
    tuned = defense.classifier.model.state_dict()
    assert all(torch.equal(tuned[k], v) for k, v in before.items()), "the text tower stays frozen"
    assert defense.classifier.logit_scale == pytest.approx(1.0 / defense.config.tau)


def test_laat_loss_is_anchor_cross_entropy_plus_feature_smoothness(ctx: harness.Context) -> None:
    laat = create_defense("laat", **{**ctx.params, "beta": 2.0, "tau": 0.5})
    assert isinstance(laat, LAAT)
    defense = _start(laat, ctx)
    assert defense.classifier is not None and defense.anchors is not None
    seen = list(ctx.prompts.seen_classes)
    defense.train_classes = seen
    batch = _batch(ctx)
    torch.manual_seed(0)
    x_adv = (batch["images"] + 0.1 * torch.randn_like(batch["images"])).clamp(0, 1)
    with torch.no_grad():
        loss, parts = defense.training_loss(batch, x_adv)
        f_adv, f_clean = defense.classifier.embed(x_adv), defense.classifier.embed(batch["images"])
        ce = F.cross_entropy(f_adv @ defense.anchors[seen].T / 0.5, batch["labels"])
        raw = F.cross_entropy(f_adv @ ctx.base.text_weights[seen].T / 0.5, batch["labels"])
        smooth = (1 - F.cosine_similarity(f_adv, f_clean, dim=-1)).mean()
        _, at_clean = defense.training_loss(batch, batch["images"])
    assert parts["alignment_ce_adv"] == pytest.approx(ce.item(), rel=1e-5)
    assert abs(raw.item() - ce.item()) > 1e-2, "the head must use the expanded anchors, not the raw embeddings"
    assert parts["smoothness"] == pytest.approx(smooth.item(), rel=1e-4) and smooth.item() > 1e-3
    assert loss.item() == pytest.approx(ce.item() + 2.0 * smooth.item(), rel=1e-5)
    assert at_clean["smoothness"] < 1e-5, "no smoothness penalty when the adversarial image is the clean one"
