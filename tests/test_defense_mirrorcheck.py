"""MirrorCheck's defining property on the small CLIP of the quick profile: the rendering of a clean digit's true
class scores higher than a wrong class's, so the detector flags inputs whose predicted label is wrong. The
generator is a closed-form class-conditional DDPM (data: one mean image per class), so nothing is trained."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vlmdefense.defenses import create_defense
from vlmdefense.defenses.training_free.mirrorcheck import MirrorCheck, MirrorCheckConfig, detection_row
from vlmdefense.units import Epsilon
from vlmdefense.workbench import harness
from vlmdefense.workbench.conditional_prior import ConditionalPrior, ConditionalRecipe, schedule

N = 30


class ClassMeans(nn.Module):
    """The exact ε of a DDPM whose data of class y are the point μ_y (the null class: the mean of the μ_y):
    ε(x, n, y) = (x − √ᾱ_n μ_y) / √(1 − ᾱ_n)."""

    def __init__(self, means: torch.Tensor) -> None:
        super().__init__()
        self.means = torch.cat([means, means.mean(0, keepdim=True)])  # [-1, 1]
        self.abar = torch.cumprod(1 - schedule(ConditionalRecipe()), dim=0)
        self.config = SimpleNamespace(sample_size=means.shape[-1])

    def forward(self, x: torch.Tensor, steps: torch.Tensor, class_labels: torch.Tensor) -> SimpleNamespace:
        abar = self.abar[steps].view(-1, 1, 1, 1)
        return SimpleNamespace(sample=(x - abar.sqrt() * self.means[class_labels]) / (1 - abar).sqrt())


@pytest.fixture(scope="module")
def ctx() -> harness.Context:
    return harness.setup("mirrorcheck", "quick")


@pytest.fixture(scope="module")
def means(ctx: harness.Context) -> torch.Tensor:
    train = ctx.train
    assert train is not None
    return torch.stack([train.images[train.labels == c].mean(0) for c in range(10)]) * 2 - 1


def detector(ctx: harness.Context, means: torch.Tensor, **changes: object) -> MirrorCheck:
    config = MirrorCheckConfig(sampler_steps=5, guidance=1.0, calibration_images=60, calibration_steps=3)
    for key, value in changes.items():
        setattr(config, key, value)
    check = MirrorCheck(config)
    check.prior = ConditionalPrior(ClassMeans(means), schedule(ConditionalRecipe()), 10, "closed form")
    check.encoders = [ctx.clip, ctx.clip]  # the test's encoders: the victim's tower (the notebook's are separate)
    harness.fit(ctx, check)
    return check


def test_registered_config_and_fast_overrides() -> None:
    check = create_defense("mirrorcheck")
    assert isinstance(check, MirrorCheck) and check.kind == "inference" and not check.randomized
    assert create_defense("mirrorcheck", fast=True).config.sampler_steps < check.config.sampler_steps
    assert create_defense("mirrorcheck", encoder_seeds="3").encoder_seeds() == [3]


def test_rendering_is_the_class_and_guidance_extrapolates(ctx: harness.Context, means: torch.Tensor) -> None:
    check = detector(ctx, means)
    labels = torch.tensor([0, 3, 7])
    target = ((means[labels] + 1) / 2).clamp(0, 1)
    assert torch.allclose(check.render(labels), target, atol=1e-3)
    check.config.guidance = 2.0  # ε(∅) + 2(ε(y) − ε(∅)): the point 2μ_y − μ_∅
    guided = ((2 * means[labels] - means.mean(0) + 1) / 2).clamp(0, 1)
    assert torch.allclose(check.render(labels), guided, atol=1e-3)


def test_true_class_scores_higher_and_wrong_labels_are_flagged(ctx: harness.Context, means: torch.Tensor) -> None:
    check = detector(ctx, means)
    x, y = ctx.sets.test.images[:N], ctx.sets.test.labels[:N]
    wrong = (y + 1 + torch.randint(0, 9, y.shape, generator=torch.Generator().manual_seed(0))) % 10
    with torch.no_grad():
        true_score = check.similarity(x, check.render(y))
        wrong_score = check.similarity(x, check.render(wrong))
    assert float((true_score > wrong_score).float().mean()) >= 0.9
    # a victim that names a wrong class is flagged far more often than the honest one
    _, _, honest = check.detect(x)
    check.bind(lambda images: torch.nn.functional.one_hot(wrong, 10).float() * 10)  # type: ignore[arg-type]
    _, _, lying = check.detect(x)
    assert float(lying.float().mean()) >= float(honest.float().mean()) + 0.5


def test_stochastic_variant_draws_and_reduces_to_the_mean(ctx: harness.Context, means: torch.Tensor) -> None:
    x = ctx.sets.test.images[:8]
    plain = detector(ctx, means)
    rendering = plain.render(ctx.sets.test.labels[:8])
    reference = plain.similarity(x, rendering)
    same = detector(ctx, means, stochastic=True, n_encoders=2, otu_noise=0.0)
    assert torch.allclose(same.similarity(x, rendering), reference, atol=1e-6)
    noisy = detector(ctx, means, stochastic=True, n_encoders=1, otu_noise=1e-3)
    first, second = noisy.similarity(x, rendering), noisy.similarity(x, rendering)
    assert not torch.equal(first, second)  # fresh weight noise per query
    assert float((first - reference).abs().max()) < 0.2


def test_joint_attack_evades_at_least_as_often_as_the_transfer_attack(
    ctx: harness.Context, means: torch.Tensor
) -> None:
    from vlmdefense.workbench.attacks import PGD

    check = detector(ctx, means, attack_targets=2, attack_bank=1)
    x, y = ctx.sets.test.images[:N], ctx.sets.test.labels[:N]
    eps = Epsilon.parse("8/255")
    logits, scores, flags = check.detect(x)
    clean = (scores.cpu(), (logits.argmax(-1) == y).cpu(), flags.cpu())
    torch.manual_seed(0)
    transfer = PGD(eps=eps.value, steps=5)(ctx.base, x, y)
    torch.manual_seed(0)
    joint = check.joint_attack(x, y, eps.value, steps=5)
    assert float((joint - x).abs().max()) <= eps.value + 1e-6 and joint.min() >= 0 and joint.max() <= 1
    row_t, _ = detection_row(check, clean, transfer, y, "PGD-5", eps, 5, adaptive=False)
    row_j, _ = detection_row(check, clean, joint, y, "joint", eps, 5, adaptive=True)
    assert row_j.evading >= row_t.evading
    assert row_j.accuracy_after_rejection <= row_t.accuracy_after_rejection + 1e-9
    assert 0 <= row_j.accuracy_after_rejection <= 100 and row_j.target == "classifier-and-detector"
