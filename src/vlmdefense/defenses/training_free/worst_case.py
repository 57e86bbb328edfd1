"""The per-example worst case of the purification defenses' adaptive evaluation: each image counts as robust
only when it survives every (attack surface, attack) pair run on it, and the record gains that worst case as
an adaptive row (JPEG, DiffPure, DiffPure-VLM, CLIPure and DiffCAP use it)."""

from __future__ import annotations

import time
from typing import Any

import torch

from vlmdefense.defenses.base import Predictor
from vlmdefense.runs.records import Result, RobustEntry
from vlmdefense.units import Epsilon
from vlmdefense.workbench.attacks import WorstCase
from vlmdefense.workbench.evaluation import EvalSets, robust_correct, split_accuracy
from vlmdefense.workbench.models import set_seed


def per_example_worst(
    predict: Predictor,
    runs: dict[str, tuple[Predictor, Any]],
    sets: EvalSets,
    batch_size: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Robust accuracy of ``predict`` under each named ``(surface, attack)`` pair (each seeded alike), and the
    per-example worst case over all pairs. Returns ``{"per_surface": {name: Accuracy}, "worst": Accuracy,
    "seconds": float, "attack": the attacks' names}``.

    Raises:
        ValueError: ``runs`` is empty.
    """
    start = time.perf_counter()
    per: dict[str, Any] = {}
    names: list[str] = []
    test_all: torch.Tensor | None = None
    transfer_all: torch.Tensor | None = None
    for name, (surface, attack) in runs.items():
        set_seed(seed)
        test = robust_correct(predict, surface, attack, sets.test, batch_size, desc=name)
        transfer = None
        if sets.transfer is not None:
            transfer = robust_correct(predict, surface, attack, sets.transfer, batch_size, desc=name)
            transfer_all = transfer if transfer_all is None else transfer_all & transfer
        per[name] = split_accuracy(test, sets.test.labels, sets.seen_classes, transfer)
        test_all = test if test_all is None else test_all & test
        names.append(str(getattr(attack, "name", name)).removeprefix("worst(").removesuffix(")"))
    if test_all is None:
        raise ValueError("per_example_worst: no attack runs")
    worst = split_accuracy(test_all, sets.test.labels, sets.seen_classes, transfer_all)
    attacks = ", ".join(dict.fromkeys(", ".join(names).split(", ")))
    return {"per_surface": per, "worst": worst, "seconds": time.perf_counter() - start, "attack": attacks}


def surface_worst_case(
    predict: Predictor,
    surfaces: dict[str, Predictor],
    sets: EvalSets,
    attack: WorstCase,
    batch_size: int,
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`per_example_worst` of one ``attack`` differentiating each of ``surfaces`` in turn."""
    return per_example_worst(predict, {name: (s, attack) for name, s in surfaces.items()}, sets, batch_size, seed)


def with_worst_case_row(result: Result, eps: Epsilon, outcome: dict[str, Any], steps: int) -> Result:
    """``result`` with the per-example worst case over the surfaces added as an adaptive row at ``eps``
    (attack ``worst(<attacks>; through <surfaces>)``), and the adaptive headline lowered to it when lower."""
    names = ", ".join(outcome["per_surface"])
    attacks = str(outcome["attack"]).removeprefix("worst(").removesuffix(")")
    entry = RobustEntry(
        attack=f"worst({attacks}; through {names})",
        eps=eps,
        steps=steps,
        adaptive=True,
        target="defended-pipeline",
        acc=outcome["worst"],
        seconds=round(float(outcome["seconds"]), 2),
    )
    headline = result.headline
    if headline is not None and entry.acc.all is not None and abs(headline.eps.value - eps.value) < 1e-12:
        current = headline.robust_adaptive
        if current is None or entry.acc.all < current:
            headline = headline.model_copy(update={"robust_adaptive": entry.acc.all})
    return result.model_copy(update={"robust": [*result.robust, entry], "headline": headline})
