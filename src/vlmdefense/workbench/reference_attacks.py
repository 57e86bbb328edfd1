"""Maintained reference attacks through torchattacks: Square (gradient-free) and the AutoAttack suites.

Each is an attack in the harness' sense — ``attack(model, images, labels) -> adversarial images`` — so it
runs through a defense's attack surface like PGD does. :class:`AutoAttackSuite` composes torchattacks'
own APGD-CE, APGD-T, FAB-T and Square (``standard``) or APGD-CE and APGD-DLR with EOT (``rand``), the
two versions of Croce & Hein's AutoAttack, with budgets a profile can shrink for a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from vlmdefense.workbench.attacks import NormName, Predictor, _CallableModule, project

STANDARD_STEPS = 100
STANDARD_QUERIES = 5000


def _torchattacks_norm(norm: NormName) -> str:
    return "Linf" if norm == "linf" else "L2"


def _run(attack: Any, images: torch.Tensor, labels: torch.Tensor, eps: float, norm: NormName) -> torch.Tensor:
    """Run a torchattacks attack and re-project its output onto the budget and [0, 1]."""
    images = images.detach()
    if eps == 0:
        return images.clone()
    adversarial = attack(images, labels)
    return (images + project(adversarial - images, eps, norm)).clamp(0, 1).detach()


@dataclass
class Square:
    """Square attack (Andriushchenko et al., 2020): random square updates, no gradients, margin loss."""

    eps: float
    queries: int = STANDARD_QUERIES
    norm: NormName = "linf"
    seed: int = 0

    @property
    def name(self) -> str:
        """E.g. ``Square-1000``."""
        return f"Square-{self.queries}"

    def __call__(self, model: Predictor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        import torchattacks

        wrapped = _CallableModule(model, images.device)
        attack = torchattacks.Square(
            wrapped, norm=_torchattacks_norm(self.norm), eps=self.eps, n_queries=self.queries, seed=self.seed
        )
        return _run(attack, images, labels, self.eps, self.norm)


@dataclass
class AutoAttackSuite:
    """AutoAttack's ``standard`` (APGD-CE, APGD-T, FAB-T, Square) or ``rand`` (APGD-CE and APGD-DLR with
    EOT) version, run one attack after the other on the images the previous ones did not fool.

    Args:
        eps: budget; norm: ``linf`` or ``l2``; n_classes: size of the label space (targets of APGD-T, FAB-T).
        version: ``standard`` for deterministic defenses, ``rand`` for randomised ones.
        steps: iterations of each gradient attack (standard: 100); queries: Square's (standard: 5000).
        eot_samples: gradient draws per step in the ``rand`` version (standard: 20).
    """

    eps: float
    n_classes: int
    version: Literal["standard", "rand"] = "standard"
    norm: NormName = "linf"
    steps: int = STANDARD_STEPS
    queries: int = STANDARD_QUERIES
    eot_samples: int = 20
    seed: int = 0

    @property
    def name(self) -> str:
        """E.g. ``AutoAttack-standard (APGD-CE, APGD-T, FAB-T, Square; 100 steps, 5000 queries)``."""
        if self.version == "standard":
            parts = f"APGD-CE, APGD-T, FAB-T, Square; {self.steps} steps, {self.queries} queries"
        else:
            parts = f"APGD-CE, APGD-DLR; {self.steps} steps, EOT-{self.eot_samples}"
        return f"AutoAttack-{self.version} ({parts})"

    @property
    def reduced(self) -> bool:
        """Whether the budgets are below the standard AutoAttack's."""
        if self.version == "rand":
            return self.steps < STANDARD_STEPS or self.eot_samples < 20
        return self.steps < STANDARD_STEPS or self.queries < STANDARD_QUERIES

    def attacks(self, wrapped: torch.nn.Module) -> list[Any]:
        """The torchattacks attacks of this version, in AutoAttack's order."""
        import torchattacks

        norm = _torchattacks_norm(self.norm)
        common = {"norm": norm, "eps": self.eps, "seed": self.seed}
        if self.version == "rand":
            return [
                torchattacks.APGD(wrapped, steps=self.steps, loss=loss, eot_iter=self.eot_samples, **common)
                for loss in ("ce", "dlr")
            ]
        if self.n_classes < 4:
            raise ValueError("AutoAttack's targeted DLR loss needs at least 4 classes")
        return [
            torchattacks.APGD(wrapped, steps=self.steps, loss="ce", **common),
            torchattacks.APGDT(wrapped, steps=self.steps, n_classes=self.n_classes, **common),
            torchattacks.FAB(wrapped, steps=self.steps, n_classes=self.n_classes, multi_targeted=True, **common),
            torchattacks.Square(wrapped, n_queries=self.queries, **common),
        ]

    def __call__(self, model: Predictor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        import torchattacks

        wrapped = _CallableModule(model, images.device)
        suite = torchattacks.MultiAttack(self.attacks(wrapped))
        return _run(suite, images, labels, self.eps, self.norm)
