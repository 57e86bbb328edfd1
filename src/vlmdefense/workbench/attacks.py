"""Attacks on any differentiable ``images -> logits`` callable, images in [0, 1] (NCHW).

Conventions follow AutoAttack / torchattacks: ``eps``, ``alpha`` and ``steps`` are explicit, the
random start draws from torch's global generator (re-seed before an attack to repeat it), and robust
accuracy over several attacks is the per-example worst case (:class:`WorstCase`). :class:`PGD`'s
``eot_samples`` averages gradients over draws of a randomised pipeline (EOT), and :meth:`PGD.maximise`
runs the same iteration on any scalar objective (the inner attack of adversarial training);
:func:`bpda` makes a non-differentiable step pass gradients straight through (BPDA).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

Predictor = Callable[[torch.Tensor], torch.Tensor]
Objective = Callable[[torch.Tensor], torch.Tensor]
"""A scalar function of the input that an attack maximises."""
NormName = Literal["linf", "l2"]


def _l2_norms(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(p=2, dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))


def project(delta: torch.Tensor, eps: float, norm: NormName) -> torch.Tensor:
    """Project perturbations onto the ε-ball of ``norm``."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    factor = torch.clamp(eps / _l2_norms(delta), max=1.0)
    return delta * factor


def random_start(images: torch.Tensor, eps: float, norm: NormName) -> torch.Tensor:
    """A uniformly random point of the ε-ball around ``images``, clipped to [0, 1]."""
    if norm == "linf":
        delta = torch.empty_like(images).uniform_(-eps, eps)
    else:
        direction = torch.randn_like(images)
        direction = direction / _l2_norms(direction)
        radius = torch.rand(images.shape[0], *([1] * (images.dim() - 1)), device=images.device)
        delta = direction * radius * eps
    return (images + delta).clamp(0, 1)


def objective_gradient(objective: Objective, x: torch.Tensor, samples: int = 1) -> torch.Tensor:
    """Gradient of the scalar ``objective(x)`` w.r.t. ``x``, averaged over ``samples`` evaluations (EOT)."""
    grad = torch.zeros_like(x)
    for _ in range(samples):
        x_ = x.detach().requires_grad_(True)
        grad += torch.autograd.grad(objective(x_), x_)[0]
    return grad / samples


def cross_entropy_objective(model: Predictor, labels: torch.Tensor) -> Objective:
    """The default objective of an attack: the summed cross-entropy of ``model(x)`` against ``labels``."""

    def objective(x: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), labels, reduction="sum")

    return objective


def input_gradient(model: Predictor, x: torch.Tensor, labels: torch.Tensor, samples: int = 1) -> torch.Tensor:
    """Gradient of the summed cross-entropy w.r.t. ``x``, averaged over ``samples`` forward draws (EOT)."""
    return objective_gradient(cross_entropy_objective(model, labels), x, samples)


@dataclass
class PGD:
    """Projected gradient descent (Madry et al.) under an L∞ or L2 budget, with random start.

    Args:
        eps: budget on [0, 1] pixels (``4/255`` for L∞).
        steps: iterations.
        alpha: step size; default ``2.5 * eps / steps``.
        norm: ``linf`` or ``l2``.
        random_start: start from a random point of the ball.
        eot_samples: gradient draws per step for randomised pipelines (EOT).
    """

    eps: float
    steps: int = 10
    alpha: float | None = None
    norm: NormName = "linf"
    random_start: bool = True
    eot_samples: int = 1

    @property
    def name(self) -> str:
        """E.g. ``PGD-10`` or ``PGD-L2-10`` (``+EOT-8`` when averaging gradients)."""
        base = f"PGD-{self.steps}" if self.norm == "linf" else f"PGD-L2-{self.steps}"
        return base + (f"+EOT-{self.eot_samples}" if self.eot_samples > 1 else "")

    @property
    def step_size(self) -> float:
        """The step size in use."""
        return self.alpha if self.alpha is not None else 2.5 * self.eps / max(1, self.steps)

    def __call__(self, model: Predictor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Adversarial ``images`` that maximise the summed cross-entropy of ``model`` against ``labels``."""
        return self.maximise(cross_entropy_objective(model, labels), images)

    def maximise(self, objective: Objective, images: torch.Tensor) -> torch.Tensor:
        """Points of the ε-ball around ``images`` (clipped to [0, 1]) that maximise the scalar
        ``objective(x)``: the attack of :meth:`__call__` for any objective, e.g. the inner problem of
        adversarial training (only the input receives gradients). Draws the random start from torch's
        global generator; with ``eot_samples > 1`` the gradient averages that many evaluations."""
        images = images.detach()
        if self.eps == 0 or self.steps == 0:
            return images.clone()
        x = random_start(images, self.eps, self.norm) if self.random_start else images.clone()
        alpha = self.step_size
        for _ in range(self.steps):
            grad = objective_gradient(objective, x, self.eot_samples)
            if self.norm == "linf":
                x = x + alpha * grad.sign()
            else:
                x = x + alpha * grad / _l2_norms(grad)
            x = (images + project(x - images, self.eps, self.norm)).clamp(0, 1).detach()
        return x


class _CallableModule(nn.Module):
    """Wraps an ``images -> logits`` callable as the ``nn.Module`` torchattacks expects."""

    def __init__(self, fn: Predictor, device: torch.device) -> None:
        super().__init__()
        self.fn = fn
        self._anchor = nn.Parameter(torch.zeros(1, device=device), requires_grad=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fn(images)


def _attack_name(kind: str, steps: int, norm: NormName, eot_samples: int) -> str:
    """E.g. ``APGD-CE-10``, ``APGD-T-L2-100+EOT-4``."""
    base = f"{kind}-{steps}" if norm == "linf" else f"{kind}-L2-{steps}"
    return base + (f"+EOT-{eot_samples}" if eot_samples > 1 else "")


def _through_torchattacks(
    attack_class: Any,
    options: dict[str, Any],
    model: Predictor,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    norm: NormName,
) -> torch.Tensor:
    """Run torchattacks' ``attack_class`` (with ``options``) on ``model`` at budget ``eps`` in ``norm``, and
    return its images projected onto the ε-ball of ``images`` and [0, 1] (its own clipping is not trusted to
    be exact)."""
    wrapped = _CallableModule(model, images.device)
    attack = attack_class(wrapped, norm="Linf" if norm == "linf" else "L2", eps=eps, **options)
    adversarial = attack(images, labels)
    return (images + project(adversarial - images, eps, norm)).clamp(0, 1).detach()


@dataclass
class APGD:
    """APGD with cross-entropy loss (Croce & Hein, 2020), through torchattacks' implementation.

    Args:
        eps: budget; steps: iterations; norm: ``linf`` or ``l2``; eot_samples: EOT draws per step;
        restarts: random restarts; seed: torchattacks' seed for its random start.
    """

    eps: float
    steps: int = 10
    norm: NormName = "linf"
    eot_samples: int = 1
    restarts: int = 1
    seed: int = 0

    @property
    def name(self) -> str:
        """E.g. ``APGD-CE-10``."""
        return _attack_name("APGD-CE", self.steps, self.norm, self.eot_samples)

    def __call__(self, model: Predictor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        import torchattacks

        images = images.detach()
        if self.eps == 0 or self.steps == 0:
            return images.clone()
        options = {
            "steps": self.steps,
            "n_restarts": self.restarts,
            "seed": self.seed,
            "loss": "ce",
            "eot_iter": self.eot_samples,
        }
        return _through_torchattacks(torchattacks.APGD, options, model, images, labels, self.eps, self.norm)


@dataclass
class APGDT:
    """Targeted APGD with the DLR loss (Croce & Hein, 2020), through torchattacks' implementation: one run per
    target class, the ``n_targets`` classes the model ranks highest after the true one (AutoAttack: 9).

    Args:
        eps: budget; steps: iterations per target; norm: ``linf`` or ``l2``; eot_samples: EOT draws per step;
        n_targets: target classes tried (fewer when the task has fewer classes); seed: torchattacks' seed.
    """

    eps: float
    steps: int = 100
    norm: NormName = "linf"
    eot_samples: int = 1
    n_targets: int = 9
    seed: int = 0

    @property
    def name(self) -> str:
        """E.g. ``APGD-T-100``."""
        return _attack_name("APGD-T", self.steps, self.norm, self.eot_samples)

    def __call__(self, model: Predictor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        import torchattacks

        images = images.detach()
        if self.eps == 0 or self.steps == 0 or len(images) == 0:
            return images.clone()
        with torch.no_grad():
            classes = int(model(images[:1]).shape[-1])
        if classes < 4:  # the targeted DLR loss reads the four largest logits (AutoAttack skips it below that)
            return images.clone()
        options = {
            "steps": self.steps,
            "n_restarts": 1,
            "seed": self.seed,
            "eot_iter": self.eot_samples,
            "n_classes": min(self.n_targets, classes - 1) + 1,
        }
        return _through_torchattacks(torchattacks.APGDT, options, model, images, labels, self.eps, self.norm)


Attack = PGD | APGD | APGDT


@dataclass
class WorstCase:
    """Per-example worst case over several attacks: the first adversarial image that fools the target."""

    attacks: Sequence[Callable[[Predictor, torch.Tensor, torch.Tensor], torch.Tensor]]

    @property
    def name(self) -> str:
        """E.g. ``worst(PGD-10, APGD-CE-10)``."""
        return "worst(" + ", ".join(getattr(a, "name", type(a).__name__) for a in self.attacks) + ")"

    def __call__(self, model: Predictor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        result = images.detach().clone()
        still_correct = torch.ones(len(labels), dtype=torch.bool, device=images.device)
        for attack in self.attacks:
            index = still_correct.nonzero().flatten()
            if index.numel() == 0:
                break
            adversarial = attack(model, images[index], labels[index])
            with torch.no_grad():
                fooled = model(adversarial).argmax(dim=-1) != labels[index]
            result[index] = adversarial
            still_correct[index[fooled]] = False
        return result


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fn: Predictor) -> torch.Tensor:
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output, None


def bpda(fn: Predictor) -> Predictor:
    """BPDA (Athalye et al., 2018): ``fn`` forward, identity backward, for image-to-image steps
    (JPEG, purification) that have no useful gradient."""

    def wrapped(x: torch.Tensor) -> torch.Tensor:
        return _StraightThrough.apply(x, fn)

    return wrapped


def make_attack(name: str, eps: float, steps: int, norm: NormName = "linf", eot_samples: int = 1) -> Attack:
    """An attack by name: ``pgd``, ``apgd`` (``apgd-ce``) or ``apgd-t``.

    Raises:
        ValueError: unknown name.
    """
    key = name.lower()
    if key == "pgd":
        return PGD(eps=eps, steps=steps, norm=norm, eot_samples=eot_samples)
    if key in {"apgd", "apgd-ce"}:
        return APGD(eps=eps, steps=steps, norm=norm, eot_samples=eot_samples)
    if key == "apgd-t":
        return APGDT(eps=eps, steps=steps, norm=norm, eot_samples=eot_samples)
    raise ValueError(f"unknown attack {name!r}: use 'pgd', 'apgd' (or 'apgd-ce') or 'apgd-t'")
