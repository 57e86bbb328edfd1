"""Attacks: budgets hold, ε = 0 is a no-op, agreement with torchattacks, worst case, EOT, BPDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlmdefense.workbench.attacks import (
    APGD,
    PGD,
    WorstCase,
    bpda,
    input_gradient,
    make_attack,
    project,
    random_start,
)
from vlmdefense.workbench.data import digit_prompts, load_digits_split
from vlmdefense.workbench.evaluation import ZeroShotClassifier, accuracy
from vlmdefense.workbench.models import SMALL_CLIP, load_clip


@pytest.fixture(scope="module")
def setup():
    clip = load_clip(SMALL_CLIP, device="cpu")
    classifier = ZeroShotClassifier(clip, digit_prompts())
    for p in classifier.parameters():
        p.requires_grad_(False)
    _, test = load_digits_split(16)
    return classifier, test.images[:120], test.labels[:120]


def acc(model, x, y) -> float:
    with torch.no_grad():
        return accuracy(model(x), y)


@pytest.mark.parametrize("attack", [PGD(eps=0.0, steps=5), APGD(eps=0.0, steps=5)])
def test_eps_zero_changes_nothing(setup, attack) -> None:
    model, x, y = setup
    assert torch.equal(attack(model, x, y), x)


@pytest.mark.parametrize(
    "attack", [PGD(eps=8 / 255, steps=5), APGD(eps=8 / 255, steps=5), PGD(eps=8 / 255, steps=3, random_start=False)]
)
def test_linf_budget_and_pixel_range(setup, attack) -> None:
    model, x, y = setup
    adversarial = attack(model, x, y)
    assert (adversarial - x).abs().max() <= 8 / 255 + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert acc(model, adversarial, y) <= acc(model, x, y)


def test_l2_budget(setup) -> None:
    model, x, y = setup
    adversarial = PGD(eps=0.5, steps=5, norm="l2")(model, x, y)
    norms = (adversarial - x).flatten(1).norm(dim=1)
    assert float(norms.max()) <= 0.5 + 1e-5
    assert acc(model, adversarial, y) < acc(model, x, y)


def test_project() -> None:
    delta = torch.full((2, 3, 4, 4), 0.5)
    assert project(delta, 0.1, "linf").max() == pytest.approx(0.1)
    assert project(delta, 0.1, "l2").flatten(1).norm(dim=1).max() == pytest.approx(0.1, rel=1e-5)


def test_agrees_with_torchattacks_pgd(setup) -> None:
    import torchattacks

    model, x, y = setup
    torch.manual_seed(0)
    ours = acc(model, PGD(eps=4 / 255, steps=10, alpha=1 / 255)(model, x, y), y)
    torch.manual_seed(0)
    theirs = acc(model, torchattacks.PGD(model, eps=4 / 255, alpha=1 / 255, steps=10)(x, y), y)
    assert abs(ours - theirs) <= 2.0


def test_more_steps_never_help_the_defender(setup) -> None:
    model, x, y = setup
    torch.manual_seed(0)
    few = acc(model, PGD(eps=4 / 255, steps=3)(model, x, y), y)
    torch.manual_seed(0)
    many = acc(model, PGD(eps=4 / 255, steps=20)(model, x, y), y)
    assert many <= few + 2.5  # ±2.5 points is noise on 120 images


def test_worst_case_is_per_example_minimum(setup) -> None:
    model, x, y = setup
    attacks = [PGD(eps=3 / 255, steps=2), APGD(eps=3 / 255, steps=5)]
    torch.manual_seed(0)
    worst = acc(model, WorstCase(attacks)(model, x, y), y)
    singles = []
    for attack in attacks:
        torch.manual_seed(0)
        singles.append(acc(model, attack(model, x, y), y))
    assert worst <= singles[0]  # the first attack runs on the same batch with the same seed
    assert worst <= min(singles) + 2.5  # later attacks run on a subset: their random start differs
    assert WorstCase(attacks).name == "worst(PGD-2, APGD-CE-5)"


def test_eot_averages_gradients_of_a_random_pipeline(setup) -> None:
    model, x, y = setup
    calls = []

    def noisy(images: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return model(images + 0.02 * torch.randn_like(images))

    input_gradient(noisy, x[:4], y[:4], samples=5)
    assert len(calls) == 5
    adversarial = PGD(eps=8 / 255, steps=2, eot_samples=3)(noisy, x, y)
    assert (adversarial - x).abs().max() <= 8 / 255 + 1e-6
    assert PGD(eps=1.0, steps=2, eot_samples=3).name == "PGD-2+EOT-3"


def test_bpda_is_identity_backward() -> None:
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    out = bpda(lambda t: (t * 255).round() / 255)(x)
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert torch.allclose(out, (x.detach() * 255).round() / 255)


def test_make_attack() -> None:
    assert make_attack("pgd", 0.1, 7).name == "PGD-7"
    assert make_attack("apgd", 0.1, 7).name == "APGD-CE-7"
    with pytest.raises(ValueError, match="unknown attack"):
        make_attack("fgsm", 0.1, 1)


def _former_maximise(objective, images, eps, steps, step_size):
    """The inner attack of adversarial training as it was written before PGD took an objective."""
    images = images.detach()
    if eps == 0 or steps == 0:
        return images.clone()
    x = random_start(images, eps, "linf")
    for _ in range(steps):
        x_ = x.detach().requires_grad_(True)
        grad = torch.autograd.grad(objective(x_), x_)[0]
        x = (images + project(x_.detach() + step_size * grad.sign() - images, eps, "linf")).clamp(0, 1)
    return x.detach()


def _former_pgd(model, images, labels, eps, steps, alpha, norm, start):
    """PGD's iteration as it was written before it took an objective."""
    images = images.detach()
    x = random_start(images, eps, norm) if start else images.clone()
    for _ in range(steps):
        grad = torch.zeros_like(x)
        x_ = x.detach().requires_grad_(True)
        grad += torch.autograd.grad(F.cross_entropy(model(x_), labels, reduction="sum"), x_)[0]
        grad = grad / 1
        x = (
            x + alpha * grad.sign()
            if norm == "linf"
            else x + alpha * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        )
        x = (images + project(x - images, eps, norm)).clamp(0, 1).detach()
    return x


@pytest.mark.parametrize(
    ("eps", "steps", "step_size"), [(4 / 255, 1, 4 / 255), (8 / 255, 3, 8 / 255 / 2), (0.0, 2, 0.1)]
)
def test_pgd_maximise_equals_the_former_inner_attack_bit_for_bit(setup, eps, steps, step_size) -> None:
    """PGD with an objective replaces adversarial training's own PGD loop: same draws, same float ops."""
    model, x, y = setup
    x, y = x[:16], y[:16]
    objectives = {
        "mean cross-entropy": lambda z: F.cross_entropy(model(z), y),
        "embedding distance": lambda z: (model.embed(z) - model.embed(x).detach()).pow(2).sum(-1).mean(),
    }
    for objective in objectives.values():
        torch.manual_seed(3)
        former = _former_maximise(objective, x, eps, steps, step_size)
        torch.manual_seed(3)
        current = PGD(eps=eps, steps=steps, alpha=step_size).maximise(objective, x)
        assert torch.equal(former, current)
        if eps > 0:
            assert not torch.equal(current, x) and (current - x).abs().max() <= eps + 1e-6


@pytest.mark.parametrize(("norm", "start"), [("linf", True), ("linf", False), ("l2", True)])
def test_pgd_call_is_unchanged_by_the_objective_api(setup, norm, start) -> None:
    model, x, y = setup
    x, y = x[:16], y[:16]
    eps = 8 / 255 if norm == "linf" else 0.5
    attack = PGD(eps=eps, steps=3, norm=norm, random_start=start)
    torch.manual_seed(5)
    former = _former_pgd(model, x, y, eps, 3, attack.step_size, norm, start)
    torch.manual_seed(5)
    assert torch.equal(attack(model, x, y), former)
