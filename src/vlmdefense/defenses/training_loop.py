"""The one adversarial training loop, shared by the fine-tuning methods (TeCoA, PMG-AFT, FARE), APT's
prompt tuning and TAPT's initial prompt tuning.

Every epoch visits the training images in an order drawn from a generator seeded once; every batch,
the inner attack (:meth:`~vlmdefense.workbench.attacks.PGD.maximise`) maximises the task's objective
inside the ε-ball, then the optimiser takes one step on the task's loss at the adversarial images, at
the learning rate of the schedule. What the methods learn and which losses they use is the task's
(:class:`AdversarialTask`); the loop owns the order of operations, so that the random draws (batch
order, PGD's random start) happen in the same order for all of them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from vlmdefense.workbench.attacks import PGD
from vlmdefense.workbench.data import ImageSet, PromptSpec

State = TypeVar("State")

Schedule = Callable[[int, int, int], float]
"""``(step, epoch, total_steps) -> learning rate`` (e.g. through :func:`vlmdefense.workbench.schedule.cosine_lr`)."""


class AdversarialTask(Generic[State]):
    """What one method trains: per batch, a state computed without gradients, the objective the inner
    attack maximises and the loss the optimiser minimises."""

    def prepare(self, images: torch.Tensor, labels: torch.Tensor) -> State:
        """Per-batch quantities computed once before the attack (called under ``torch.no_grad``)."""
        raise NotImplementedError

    def attack_objective(self, state: State, x: torch.Tensor) -> torch.Tensor:
        """The scalar the inner attack maximises at ``x``."""
        raise NotImplementedError

    def training_loss(self, state: State, x_adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar the optimiser minimises, and metrics summed over the batch (logged per epoch as
        their mean per image)."""
        raise NotImplementedError

    def before_attack(self) -> None:
        """Called before the inner attack (e.g. to put a model in eval mode)."""

    def after_attack(self) -> None:
        """Called after the inner attack, before the loss (e.g. to put a model back in train mode)."""

    def after_step(self, state: State, x_adv: torch.Tensor) -> dict[str, float]:
        """Metrics summed over the batch, measured after the optimiser step (under ``torch.no_grad``)."""
        return {}


@dataclass
class AdversarialLoop:
    """The epochs and batches of adversarial training.

    Attributes:
        epochs: passes over the training images.
        batch_size: images per optimiser step (the last batch of an epoch may be smaller).
        seed: seed of the generator of the batch order (PGD's random start draws from torch's global
            generator, which the caller seeds).
        attack: the inner attack (its objective is the task's).
        optimizer: the optimiser of the learned parameters.
        schedule: the learning rate of every step, set before the step's attack.
    """

    epochs: int
    batch_size: int
    seed: int
    attack: PGD
    optimizer: torch.optim.Optimizer
    schedule: Schedule

    def steps_per_epoch(self, n: int) -> int:
        """Optimiser steps per epoch over ``n`` images."""
        return math.ceil(n / self.batch_size)

    def run(self, task: AdversarialTask[Any], images: torch.Tensor, labels: torch.Tensor) -> list[dict[str, float]]:
        """Train ``task`` on ``images`` with ``labels`` (indices of the training label space); returns
        one row per epoch: ``epoch`` and the mean per image of ``loss`` and of the task's metrics."""
        generator = torch.Generator().manual_seed(self.seed)
        n = len(labels)
        per_epoch = self.steps_per_epoch(n)
        total = self.epochs * per_epoch
        history: list[dict[str, float]] = []
        step = 0
        for epoch in range(self.epochs):
            order = torch.randperm(n, generator=generator).to(images.device)
            sums: dict[str, float] = {}
            for b in range(per_epoch):
                index = order[b * self.batch_size : (b + 1) * self.batch_size]
                for group in self.optimizer.param_groups:
                    group["lr"] = self.schedule(step, epoch, total)
                with torch.no_grad():
                    state = task.prepare(images[index], labels[index])
                task.before_attack()
                x_adv = self.attack.maximise(functools.partial(task.attack_objective, state), images[index])
                task.after_attack()
                loss, parts = task.training_loss(state, x_adv)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                step += 1
                with torch.no_grad():
                    parts = {**parts, **task.after_step(state, x_adv)}
                for key, value in {"loss": loss.item() * len(index), **parts}.items():
                    sums[key] = sums.get(key, 0.0) + value
            history.append({"epoch": epoch + 1, **{k: round(v / n, 4) for k, v in sums.items()}})
        return history


def inner_attack(eps: float, steps: int, step_size: float) -> PGD:
    """The L∞ PGD of adversarial training: uniform random start, ``steps`` signed steps of ``step_size``."""
    return PGD(eps=eps, steps=steps, alpha=step_size, norm="linf", random_start=True)


def with_training_eps(config: Any, headline: float) -> Any:
    """``config`` (a dataclass) with its ``train_eps`` set to the headline ε when it is unset."""
    return config if config.train_eps is not None else dataclasses.replace(config, train_eps=headline)


def training_classes(prompts: PromptSpec, train_text: str) -> list[int]:
    """The classes of the training softmax: the seen classes (``seen``) or all class names (``all``)."""
    return list(prompts.seen_classes) if train_text == "seen" else list(range(len(prompts.classnames)))


def training_labels(train: ImageSet, prompts: PromptSpec, classes: list[int]) -> torch.Tensor:
    """``train``'s labels as indices into ``classes`` (the training label space; -1 outside it)."""
    device = train.labels.device
    to_train = torch.full((len(prompts.classnames),), -1, dtype=torch.long, device=device)
    to_train[classes] = torch.arange(len(classes), device=device)
    return to_train[train.labels]
