"""Invariants of the attacks, as properties on tiny synthetic models (exact and fast, no CLIP).

- the per-example worst case over attacks keeps the first adversarial image that fools the target, never
  re-attacks a fooled image and never brings one back: its accuracy is the size of the set no attack fooled;
- every attack's output stays in the ε-ball (L∞ and L2) and in [0, 1]; ε = 0 returns the images unchanged;
- PGD steps along the gradient's sign (L∞) or direction (L2), then projects;
- EOT evaluates the objective exactly ``eot_samples`` times per step and averages the draws' gradients;
- BPDA runs the step forward and passes the incoming gradient through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from vlmdefense.workbench.attacks import (
    APGD,
    APGDT,
    PGD,
    WorstCase,
    bpda,
    cross_entropy_objective,
    input_gradient,
    make_attack,
    objective_gradient,
    project,
    random_start,
)

CLASSES = 4
SHAPE = (3, 4, 4)
FAST = settings(max_examples=25, deadline=None)

# ---------------------------------------------------------------------------------------------------------
# A coded world for the worst case: pixel (0, 0, 0) holds the predicted class, pixel (0, 0, 1) the image's id,
# pixel (0, 0, 2) which attack last wrote the image. An attack fools exactly the ids it is told to.


def coded_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images whose coded class is their label (all correctly classified) and whose id is their index."""
    labels = torch.arange(n) % CLASSES
    images = torch.zeros(n, *SHAPE)
    images[:, 0, 0, 0] = labels.float()
    images[:, 0, 0, 1] = torch.arange(n).float()
    return images, labels


def coded_model(images: torch.Tensor) -> torch.Tensor:
    """Logits that pick the class written in pixel (0, 0, 0)."""
    return 10.0 * nn.functional.one_hot(images[:, 0, 0, 0].round().long() % CLASSES, CLASSES).float()


class ScriptedAttack:
    """Fools the images whose id is in ``fools``; marks every image it returns with ``tag``; logs what it saw."""

    def __init__(self, fools: set[int], tag: int) -> None:
        self.fools = fools
        self.tag = tag
        self.seen: list[int] = []
        self.name = f"scripted-{tag}"

    def __call__(self, model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        ids = x[:, 0, 0, 1].long().tolist()
        self.seen += ids
        for row, image_id in enumerate(ids):
            if image_id in self.fools:
                out[row, 0, 0, 0] = float((int(y[row]) + 1) % CLASSES)
        out[:, 0, 0, 2] = float(self.tag)
        return out


def correct(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(dim=-1) == y


fool_sets = st.integers(1, 12).flatmap(
    lambda n: st.tuples(st.just(n), st.lists(st.sets(st.integers(0, n - 1)), min_size=1, max_size=4))
)


@FAST
@given(fool_sets)
def test_worst_case_is_the_per_example_minimum_and_never_resurrects(case: tuple[int, list[set[int]]]) -> None:
    n, fools = case
    images, labels = coded_images(n)
    attacks = [ScriptedAttack(f, tag) for tag, f in enumerate(fools, start=1)]
    result = WorstCase(attacks)(coded_model, images, labels)
    ok = correct(coded_model, result, labels)
    fooled_by_any = set().union(*fools)
    assert {i for i in range(n) if not ok[i]} == fooled_by_any
    for single in fools:
        alone = correct(coded_model, ScriptedAttack(single, 0)(coded_model, images, labels), labels)
        assert int(ok.sum()) <= int(alone.sum())  # never above any single attack's accuracy
        assert not (ok & ~alone).any()  # an image one attack fools stays fooled
    # each image keeps the first attack that fooled it (or the last one tried), and no attack sees an image
    # that an earlier one already fooled
    for i in range(n):
        first = next((tag for tag, f in enumerate(fools, start=1) if i in f), len(fools))
        assert int(result[i, 0, 0, 2]) == first
    for tag, attack in enumerate(attacks, start=1):
        expected = [i for i in range(n) if not any(i in f for f in fools[: tag - 1])]
        assert attack.seen == expected
    assert result[:, 0, 0, 1].long().tolist() == list(range(n))  # images stay in place


def test_worst_case_stops_once_everything_is_fooled() -> None:
    images, labels = coded_images(5)
    first, second = ScriptedAttack(set(range(5)), 1), ScriptedAttack(set(), 2)
    result = WorstCase([first, second])(coded_model, images, labels)
    assert second.seen == [] and not correct(coded_model, result, labels).any()
    assert torch.equal(images, coded_images(5)[0])  # the input is not written to
    assert WorstCase([first, second]).name == "worst(scripted-1, scripted-2)"


# ---------------------------------------------------------------------------------------------------------
# Budgets on a tiny linear classifier.


def linear_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(SHAPE).prod()), CLASSES))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def random_batch(seed: int, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, *SHAPE, generator=generator)
    images[0] = 0.0  # corners of the pixel range, where clipping matters
    images[1] = 1.0
    return images, torch.randint(0, CLASSES, (n,), generator=generator)


def check_budget(adversarial: torch.Tensor, images: torch.Tensor, eps: float, norm: str) -> None:
    delta = adversarial - images
    if norm == "linf":
        assert float(delta.abs().max()) <= eps + 1e-6
    else:
        assert float(delta.flatten(1).norm(dim=1).max()) <= eps + 1e-5
    assert float(adversarial.min()) >= 0.0 and float(adversarial.max()) <= 1.0
    assert adversarial.shape == images.shape and not adversarial.requires_grad


eps_values = st.sampled_from([1 / 255, 8 / 255, 0.1, 0.5, 2.0])


@FAST
@given(seed=st.integers(0, 2**16), eps=eps_values, norm=st.sampled_from(["linf", "l2"]), steps=st.integers(1, 4))
def test_pgd_and_maximise_stay_in_the_ball_and_the_pixel_range(seed: int, eps: float, norm: str, steps: int) -> None:
    model = linear_model(seed % 7)
    images, labels = random_batch(seed)
    torch.manual_seed(seed)
    check_budget(PGD(eps=eps, steps=steps, norm=norm)(model, images, labels), images, eps, norm)  # type: ignore[arg-type]
    attack = PGD(eps=eps, steps=steps, norm=norm, alpha=3 * eps, random_start=False)  # type: ignore[arg-type]
    check_budget(attack.maximise(lambda x: model(x).pow(2).sum(), images), images, eps, norm)
    check_budget(random_start(images, eps, norm), images, eps, norm)  # type: ignore[arg-type]


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), eps=eps_values, norm=st.sampled_from(["linf", "l2"]))
def test_apgd_and_worst_case_stay_in_the_ball_and_the_pixel_range(seed: int, eps: float, norm: str) -> None:
    model = linear_model(seed % 7)
    images, labels = random_batch(seed)
    torch.manual_seed(seed)
    apgd = APGD(eps=eps, steps=3, norm=norm, seed=seed)  # type: ignore[arg-type]
    check_budget(apgd(model, images, labels), images, eps, norm)
    worst = WorstCase([PGD(eps=eps, steps=2, norm=norm), apgd])  # type: ignore[arg-type]
    check_budget(worst(model, images, labels), images, eps, norm)
    targeted = APGDT(eps=eps, steps=3, norm=norm, seed=seed)  # type: ignore[arg-type]
    check_budget(targeted(model, images, labels), images, eps, norm)


def test_apgd_t_fools_a_linear_model_and_skips_tasks_under_four_classes() -> None:
    model = linear_model(0)
    images, labels = random_batch(1, n=32)
    labels = model(images).argmax(-1)  # every image starts correctly classified
    adversarial = APGDT(eps=0.5, steps=10)(model, images, labels)
    assert float((model(adversarial).argmax(-1) == labels).float().mean()) < 0.5
    torch.manual_seed(0)
    three = nn.Sequential(nn.Flatten(), nn.Linear(48, 3)).requires_grad_(False)
    assert torch.equal(APGDT(eps=0.5, steps=10)(three, images, labels % 3), images)  # the DLR loss needs four


@pytest.mark.parametrize(
    "attack",
    [
        PGD(eps=0.0, steps=3),
        PGD(eps=0.0, steps=3, norm="l2"),
        PGD(eps=0.3, steps=0),
        APGD(eps=0.0, steps=3),
        APGD(eps=0.3, steps=0),
        APGDT(eps=0.0, steps=3),
        APGDT(eps=0.3, steps=0),
        WorstCase([PGD(eps=0.0, steps=3), APGD(eps=0.0, steps=3)]),
    ],
)
def test_a_zero_budget_returns_the_images_unchanged(attack: Callable[..., torch.Tensor]) -> None:
    model = linear_model(0)
    images, labels = random_batch(1)
    out = attack(model, images, labels)
    assert torch.equal(out, images) and out is not images
    assert torch.equal(PGD(eps=0.0, steps=3).maximise(lambda x: x.sum(), images), images)


@FAST
@given(seed=st.integers(0, 2**16), eps=st.floats(0.01, 0.3))
def test_pgd_steps_along_the_gradient_then_projects(seed: int, eps: float) -> None:
    """One step without random start on a linear objective is closed-form: ``x + α·sign(w)`` (L∞) or
    ``x + α·w/‖w‖`` (L2), projected onto the ball and clipped."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(2, *SHAPE, generator=generator)
    images = torch.rand(2, *SHAPE, generator=generator)

    def objective(x: torch.Tensor) -> torch.Tensor:
        return (weights * x).sum()

    for alpha in (eps / 2, 2 * eps):
        linf = PGD(eps=eps, steps=1, alpha=alpha, random_start=False).maximise(objective, images)
        expected = (images + (alpha * weights.sign()).clamp(-eps, eps)).clamp(0, 1)
        assert torch.allclose(linf, expected, atol=1e-6)
        l2 = PGD(eps=eps, steps=1, alpha=alpha, norm="l2", random_start=False).maximise(objective, images)
        unit = weights / weights.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        expected = (images + min(alpha, eps) * unit).clamp(0, 1)
        assert torch.allclose(l2, expected, atol=1e-6)
    assert objective(linf) >= objective(images)


def test_pgd_defaults_and_names() -> None:
    assert PGD(eps=0.1, steps=4).step_size == pytest.approx(2.5 * 0.1 / 4)
    assert PGD(eps=0.1, steps=0).step_size == pytest.approx(0.25)
    assert PGD(eps=0.1, steps=4, alpha=0.02).step_size == 0.02
    assert PGD(eps=0.1, steps=4, norm="l2", eot_samples=2).name == "PGD-L2-4+EOT-2"
    assert APGD(eps=0.1, steps=4, norm="l2", eot_samples=3).name == "APGD-CE-L2-4+EOT-3"
    assert APGD(eps=0.1, steps=4).name == "APGD-CE-4"
    assert (
        APGDT(eps=0.1, steps=4).name == "APGD-T-4" and APGDT(eps=0.1, steps=4, eot_samples=2).name == "APGD-T-4+EOT-2"
    )
    for name, cls in (("PGD", PGD), ("apgd-ce", APGD), ("APGD", APGD), ("apgd-t", APGDT)):
        attack = make_attack(name, 0.1, 3, "l2", 2)
        assert isinstance(attack, cls)
        assert (attack.eps, attack.steps, attack.norm, attack.eot_samples) == (0.1, 3, "l2", 2)


@FAST
@given(seed=st.integers(0, 2**16), eps=st.floats(0.01, 2.0), norm=st.sampled_from(["linf", "l2"]))
def test_project_is_a_projection(seed: int, eps: float, norm: str) -> None:
    delta = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(seed))
    projected = project(delta, eps, norm)  # type: ignore[arg-type]
    assert torch.allclose(project(projected, eps, norm), projected, atol=1e-6)  # type: ignore[arg-type]
    if norm == "linf":
        assert torch.equal(projected, delta.clamp(-eps, eps))
    else:
        norms = delta.flatten(1).norm(dim=1)
        for row in range(3):
            scale = min(1.0, eps / float(norms[row]))
            assert torch.allclose(projected[row], delta[row] * scale, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# EOT and BPDA.


@FAST
@given(samples=st.integers(1, 5), steps=st.integers(1, 3))
def test_eot_averages_exactly_the_stated_number_of_draws(samples: int, steps: int) -> None:
    """A stochastic objective whose gradient is the k-th draw's weight: the gradient is the mean of the draws,
    and PGD evaluates the objective ``steps × eot_samples`` times."""
    draws = torch.randn(32, 2, *SHAPE, generator=torch.Generator().manual_seed(samples * 10 + steps))
    calls: list[int] = []

    def stochastic(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return (draws[len(calls) - 1] * x).sum()

    x = torch.rand(2, *SHAPE)
    grad = objective_gradient(stochastic, x, samples)
    assert len(calls) == samples
    assert torch.allclose(grad, draws[:samples].mean(dim=0), atol=1e-6)
    calls.clear()
    PGD(eps=0.1, steps=steps, eot_samples=samples).maximise(stochastic, x)
    assert len(calls) == steps * samples

    model_calls: list[int] = []
    model = linear_model(0)

    def noisy(images: torch.Tensor) -> torch.Tensor:
        model_calls.append(1)
        return model(images + 0.01 * torch.randn_like(images))

    labels = torch.zeros(2, dtype=torch.long)
    PGD(eps=0.1, steps=steps, eot_samples=samples)(noisy, x, labels)
    assert len(model_calls) == steps * samples
    model_calls.clear()
    input_gradient(noisy, x, labels, samples)
    assert len(model_calls) == samples


def test_input_gradient_is_the_gradient_of_the_summed_cross_entropy() -> None:
    model = linear_model(3)
    images, labels = random_batch(3)
    x = images.clone().requires_grad_(True)
    nn.functional.cross_entropy(model(x), labels, reduction="sum").backward()
    assert torch.allclose(input_gradient(model, images, labels), x.grad, atol=1e-6)
    assert float(cross_entropy_objective(model, labels)(images)) == pytest.approx(
        float(nn.functional.cross_entropy(model(images), labels, reduction="sum")), rel=1e-6
    )


@FAST
@given(seed=st.integers(0, 2**16))
def test_bpda_is_the_step_forward_and_the_identity_backward(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(2, *SHAPE, generator=generator).requires_grad_(True)
    upstream = torch.randn(2, *SHAPE, generator=generator)

    def quantise(t: torch.Tensor) -> torch.Tensor:  # zero gradient almost everywhere
        return (t * 4).round() / 4

    out = bpda(quantise)(x)
    assert torch.equal(out.detach(), quantise(x.detach()))
    (out * upstream).sum().backward()
    assert x.grad is not None and torch.equal(x.grad, upstream)


# ---------------------------------------------------------------------------------------------------------
# What each attack hands torchattacks, and that a real budget is used.


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_fools_a_linear_model_at_a_real_budget(norm: str) -> None:
    model = linear_model(0)
    images, _ = random_batch(1, n=32)
    labels = model(images).argmax(-1)  # every image starts correctly classified
    eps = 0.5 if norm == "linf" else 4.0
    adversarial = APGD(eps=eps, steps=10, norm=norm)(model, images, labels)  # type: ignore[arg-type]
    assert float((model(adversarial).argmax(-1) == labels).float().mean()) < 0.5
    single = APGDT(eps=0.5, steps=10)(model, images[2:3], labels[2:3])  # one image is attacked too
    assert not torch.equal(single, images[2:3])


class SpyAttack:
    """Stands in for a torchattacks class: notes its model and options, returns images outside [0, 1]."""

    seen: ClassVar[dict[str, Any]] = {}

    def __init__(self, model: nn.Module, **options: Any) -> None:
        SpyAttack.seen = {"model": model, **options}

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return images + (2 * images - 1)  # dark pixels pushed below 0, bright ones above 1


@pytest.mark.parametrize(("norm", "name"), [("linf", "Linf"), ("l2", "L2")])
def test_apgd_hands_torchattacks_its_norm_budget_and_options_and_projects_the_answer(
    monkeypatch: pytest.MonkeyPatch, norm: str, name: str
) -> None:
    import torchattacks

    monkeypatch.setattr(torchattacks, "APGD", SpyAttack)
    monkeypatch.setattr(torchattacks, "APGDT", SpyAttack)
    model = linear_model(0)
    images, labels = random_batch(2)
    adversarial = APGD(eps=0.25, steps=7, norm=norm, restarts=3, seed=5)(model, images, labels)  # type: ignore[arg-type]
    seen = SpyAttack.seen
    assert (seen["norm"], seen["eps"], seen["steps"], seen["n_restarts"], seen["seed"]) == (name, 0.25, 7, 3, 5)
    assert seen["loss"] == "ce"
    check_budget(adversarial, images, 0.25, norm)  # projected back onto the ball and [0, 1]
    APGDT(eps=0.25, steps=7, norm=norm, n_targets=9)(model, images, labels)  # type: ignore[arg-type]
    seen = SpyAttack.seen
    assert (seen["norm"], seen["eps"], seen["n_restarts"], seen["n_classes"]) == (name, 0.25, 1, CLASSES)
    APGDT(eps=0.25, steps=7, norm=norm, n_targets=2)(model, images, labels)  # type: ignore[arg-type]
    assert SpyAttack.seen["n_classes"] == 3  # the true class and two targets


def test_torchattacks_sees_one_frozen_parameter_on_the_images_device() -> None:
    """torchattacks reads the device from the model's first parameter: the wrapper's anchor."""
    from vlmdefense.workbench.attacks import _CallableModule

    model = linear_model(0)
    (anchor,) = list(_CallableModule(lambda x: model(x), torch.device("meta")).parameters())
    assert anchor.device.type == "meta" and anchor.shape == (1,) and not anchor.requires_grad
    wrapped = _CallableModule(model, torch.device("cpu"))
    assert next(wrapped.parameters()) is wrapped._anchor  # first, before the wrapped module's own


def test_random_starts_fill_the_linf_box_and_draw_an_l2_radius_per_image() -> None:
    torch.manual_seed(0)
    images = torch.full((64, *SHAPE), 0.5)
    box = random_start(images, 0.1, "linf") - images
    assert float(box.abs().max()) <= 0.1 + 1e-6 and float(box.max()) > 0.09 and float(box.min()) < -0.09
    assert float(box.flatten(1).norm(dim=1).min()) > 0.1  # a box corner region, not the L2 ball
    ball = random_start(images, 0.1, "l2") - images
    radii = ball.flatten(1).norm(dim=1)
    assert float(radii.max()) <= 0.1 + 1e-6 and len(set(radii.round(decimals=5).tolist())) == len(images)
    meta = torch.empty(2, *SHAPE, device="meta")
    assert random_start(meta, 0.1, "l2").device.type == "meta"


def test_one_gradient_draw_by_default() -> None:
    calls: list[int] = []
    model = linear_model(0)

    def counted(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return model(x)

    images, labels = random_batch(0)
    input_gradient(counted, images, labels)
    objective_gradient(cross_entropy_objective(counted, labels), images)
    assert calls == [len(images), len(images)]


def test_pgd_leaves_pixels_the_model_ignores_where_they_were() -> None:
    """A pixel with zero gradient has no ascent direction: without a random start PGD must not move it."""
    model = linear_model(0)

    def first_channel_only(x: torch.Tensor) -> torch.Tensor:
        return model(torch.cat([x[:, :1], torch.zeros_like(x[:, 1:])], dim=1))

    images, labels = random_batch(4)
    adversarial = PGD(eps=0.1, steps=3, random_start=False)(first_channel_only, images, labels)
    assert torch.equal(adversarial[:, 1:], images[:, 1:]) and not torch.equal(adversarial[:, :1], images[:, :1])
