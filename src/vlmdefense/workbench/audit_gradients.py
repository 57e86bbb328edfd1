"""Two audit checks that look at the pipeline itself: its input gradients, and its randomness."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from vlmdefense.defenses.base import Defense
from vlmdefense.runs.records import AuditCheck, AuditStatus
from vlmdefense.workbench.data import ImageSet
from vlmdefense.workbench.evaluation import Predictor


def margin_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed margin of the best wrong class over the true class (the CW / DLR numerator): unlike
    cross-entropy it does not vanish when the softmax saturates in float32."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf")).amax(dim=1)
    return (other - true).sum()


def _per_example_norms(surface: Predictor, images: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    x = images.detach().clone().requires_grad_(True)
    logits = surface(x)
    value = F.cross_entropy(logits, labels, reduction="sum") if loss == "ce" else margin_loss(logits, labels)
    (grad,) = torch.autograd.grad(value, x)
    finite = torch.isfinite(grad).flatten(1).all(dim=1)
    norms = grad.flatten(1).norm(dim=1)
    return torch.where(finite, norms, torch.full_like(norms, float("nan")))


def gradient_check(surface: Predictor, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> AuditCheck:
    """The input gradients of the attacked surface: none may be zero or non-finite (margin loss); the
    cross-entropy's zeros, from a saturated softmax, are reported beside them."""
    norms: dict[str, list[torch.Tensor]] = {"ce": [], "margin": []}
    for start in range(0, len(labels), batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        for loss in norms:
            norms[loss].append(_per_example_norms(surface, x, y, loss).detach().cpu())
    ce, margin = torch.cat(norms["ce"]), torch.cat(norms["margin"])
    numbers: dict[str, float | int] = {
        "images": len(labels),
        "margin_zero": int((margin == 0).sum()),
        "margin_non_finite": int(margin.isnan().sum()),
        "ce_zero": int((ce == 0).sum()),
        "ce_non_finite": int(ce.isnan().sum()),
    }
    finite = margin[~margin.isnan()]
    if finite.numel():
        numbers["margin_median_norm"] = float(f"{finite.median().item():.3g}")
        numbers["margin_min_norm"] = float(f"{finite.min().item():.3g}")
    broken = numbers["margin_zero"] + numbers["margin_non_finite"]
    detail = (
        f"margin-loss input gradients: {numbers['margin_zero']} zero and {numbers['margin_non_finite']} non-finite of "
        f"{len(labels)}; cross-entropy: {numbers['ce_zero']} zero (softmax saturated in float32) and "
        f"{numbers['ce_non_finite']} non-finite"
    )
    if broken:
        detail += ": an attack following these gradients cannot move those images (gradient masking)"
    return AuditCheck(
        id="gradients",
        title="Input gradients exist and are finite",
        status=AuditStatus.FLAG if broken else AuditStatus.PASS,
        detail=detail,
        numbers=numbers,
    )


def _repeated_correct(
    defense: Defense, images: torch.Tensor, labels: torch.Tensor, repeats: int, batch_size: int
) -> torch.Tensor:
    """(repeats, n) booleans: which images each of ``repeats`` calls of the defense classifies correctly."""
    rows = []
    for _ in range(repeats):
        row = []
        for start in range(0, len(labels), batch_size):
            with torch.no_grad():
                logits = defense.predict(images[start : start + batch_size])
            row.append(logits.argmax(dim=-1).cpu() == labels[start : start + batch_size].cpu())
        rows.append(torch.cat(row))
    return torch.stack(rows)


def _determinism(defense: Defense, test: ImageSet, batch_size: int) -> AuditCheck:
    first, second = (
        torch.cat([defense.predict(test.images[s : s + batch_size]).detach() for s in range(0, len(test), batch_size)])
        for _ in range(2)
    )
    gap = float((first - second).abs().max().item()) if first.numel() else 0.0
    ok = gap <= 1e-4 * max(1.0, float(first.abs().max().item()))
    return AuditCheck(
        id="randomness",
        title="Randomness is accounted for",
        status=AuditStatus.PASS if ok else AuditStatus.FLAG,
        detail=(
            f"declared deterministic; two calls on the test images differ by at most {gap:.2g} in any logit"
            + ("" if ok else ": the prediction is random, so it needs EOT and repeated scoring")
        ),
        numbers={"max_logit_difference": float(f"{gap:.3g}")},
    )


def randomness_check(
    defense: Defense,
    test: ImageSet,
    adversarial: torch.Tensor | None,
    repeats: int,
    eot: int,
    batch_size: int,
    recorded: float | None,
    tol: Callable[[float | None], float],
) -> AuditCheck:
    """For a randomised defense: how much its prediction varies over ``repeats`` calls, the EOT count of
    its adaptive attack, and its robust accuracy when an image counts only if every call is right
    (on the images of the convergence check). A deterministic defense is checked to be one."""
    if not defense.randomized:
        return _determinism(defense, test, batch_size)
    clean = _repeated_correct(defense, test.images, test.labels, repeats, batch_size).float()
    agree = ((clean == clean[0]).all(dim=0)).float().mean().item()
    numbers: dict[str, Any] = {
        "repeats": repeats,
        "eot_samples": eot,
        "clean_per_call": [round(100 * v, 2) for v in clean.mean(dim=1).tolist()],
        "clean_all_calls": round(100 * clean.min(dim=0).values.mean().item(), 2),
        "same_prediction": round(100 * agree, 2),
    }
    if adversarial is None:
        return AuditCheck(
            id="randomness",
            title="Randomness is accounted for",
            status=AuditStatus.SKIP,
            detail="the convergence check did not run, so there are no adversarial images to score repeatedly",
            numbers=numbers,
        )
    robust = _repeated_correct(defense, adversarial, test.labels, repeats, batch_size).float()
    single = round(100 * robust[0].mean().item(), 2)
    every = round(100 * robust.min(dim=0).values.mean().item(), 2)
    numbers.update({"robust_first_call": single, "robust_all_calls": every, "recorded": recorded})
    ok = recorded is None or every >= recorded - tol(recorded)
    return AuditCheck(
        id="randomness",
        title="Randomness is accounted for",
        status=AuditStatus.PASS if ok else AuditStatus.FLAG,
        detail=(
            f"{repeats} calls agree on {100 * agree:.1f} % of clean images; adaptive attack with EOT-{eot}; on the "
            f"convergence check's images {single:.2f} % are right in one call and {every:.2f} % in all {repeats}"
            + (
                ""
                if ok
                else ", below the recorded single-call worst case: the image counts only when every call is right"
            )
        ),
        numbers=numbers,
        robust=every,
    )
