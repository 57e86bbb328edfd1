"""TTC's τ-gated counterattack written with the shared counterattack steps, so that it can be unrolled.

SCC runs it as a warm-up before its own correction. From uniform noise in an ``eps`` L∞ ball, signed
steps raise the squared L2 distance between the perturbed and the input's unnormalised image embedding.
τ, the relative embedding change caused by the starting noise alone, gates the result: an image with
τ below ``tau_thres`` (falsely stable, as attacked images are) receives the iterates combined with
weights ∝ exp(β·step); any other image keeps the starting noise only (Xing et al., CVPR 2025, official
defaults: 4/255, 2 steps of 1/255, τ threshold 0.2, β = 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vlmdefense.defenses.training_free.counterattack import (
    embedding_distance,
    inner_gradient,
    into_ball,
    raw_embed,
    relative_change,
    signed,
    uniform_start,
    variable,
)

if TYPE_CHECKING:
    from vlmdefense.workbench.models import LoadedClip


@dataclass(frozen=True)
class GateSettings:
    """The budget and gate of one τ-gated counterattack."""

    eps: float
    steps: int
    step_size: float
    tau_thres: float
    beta: float


def gated_counterattack(
    clip: LoadedClip, x: torch.Tensor, settings: GateSettings, unroll: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the gated perturbation, τ) for images ``x``; a graph to ``x`` only when ``unroll``."""
    s = settings
    x = x if unroll else x.detach()
    with torch.set_grad_enabled(unroll):
        reference = raw_embed(clip, x)
    delta = uniform_start(x, s.eps)
    iterates = [delta]
    tau: torch.Tensor | None = None
    with torch.enable_grad():
        for step in range(s.steps):
            d = variable(iterates[-1], unroll)
            embedding = raw_embed(clip, x + d)
            if step == 0:  # τ is the change caused by the starting noise alone
                tau = relative_change(embedding, reference).detach()
            grad = inner_gradient(embedding_distance(embedding, reference), d, unroll)
            moved = into_ball(d + s.step_size * signed(grad, unroll), x, s.eps)
            iterates.append(moved if unroll else moved.detach())
    if tau is None:
        with torch.no_grad():
            tau = relative_change(raw_embed(clip, x + delta), reference)
    stacked = torch.stack(iterates, dim=1)  # (N, steps + 1, C, H, W)
    order = torch.arange(s.steps + 1, device=x.device, dtype=x.dtype)
    soft = torch.softmax(s.beta * order, dim=0).expand(len(x), -1)
    hard = torch.zeros_like(soft)
    hard[:, 0] = 1.0
    weights = torch.where((tau < s.tau_thres).unsqueeze(1), soft, hard)
    return (weights.view(*weights.shape, 1, 1, 1) * stacked).sum(dim=1), tau
