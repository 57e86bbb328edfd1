"""The mechanisms shared by the test-time adaptation defenses (R-TPT, TAPT): random augmented views
of every test image, the entropies that select the most confident views and tune the prompts, and the
randomised :class:`TestTimeDefense` base.

Both tune a prompt separately for every test image, from that image's random augmented views, and
reset it for the next image. Here a whole batch is tuned at once: every image holds its own prompt
(tensors with a leading batch dimension), the per-image losses are *summed* so that each prompt's
gradient is its own image's, and AdamW's update is elementwise — the result equals tuning the images
one by one.

Adaptive attack surfaces (BPDA through the prompt update): the tuned prompts are recomputed for the
current input, from fresh random views, without a graph to the input, and then used as constants;
the attacker's gradient flows through everything else. The views are random, so the harness averages
the gradients over draws (EOT).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vlmdefense.defenses.base import InferenceDefense


def random_views(
    images: torch.Tensor,
    n_views: int,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """``(B, V, C, H, W)``: the image itself, then ``V - 1`` random resized crops (area fraction in
    ``scale``, aspect ratio in ``ratio``, bilinear, resized back to the input size). Differentiable in
    ``images``; draws from torch's global generator."""
    b = images.shape[0]
    if n_views < 1:
        raise ValueError("n_views must be at least 1")
    if n_views == 1:
        return images.unsqueeze(1)
    n = b * (n_views - 1)
    device, dtype = images.device, images.dtype
    area = torch.empty(n, device=device, dtype=dtype).uniform_(*scale)
    log_ratio = torch.empty(n, device=device, dtype=dtype).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_ratio)
    width = torch.sqrt(area * aspect).clamp(max=1.0)  # fractions of the side
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(n, device=device, dtype=dtype) * 2 - 1) * (1 - width)  # centre in [-1, 1] coordinates
    cy = (torch.rand(n, device=device, dtype=dtype) * 2 - 1) * (1 - height)
    theta = torch.zeros(n, 2, 3, device=device, dtype=dtype)
    theta[:, 0, 0], theta[:, 0, 2] = width, cx
    theta[:, 1, 1], theta[:, 1, 2] = height, cy
    source = images.repeat_interleave(n_views - 1, dim=0)
    grid = F.affine_grid(theta, list(source.shape), align_corners=False)
    crops = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)
    crops = crops.view(b, n_views - 1, *images.shape[1:])
    return torch.cat([images.unsqueeze(1), crops], dim=1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of softmax(logits) along the last dimension."""
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """TPT's objective: entropy of the mean probability over the views (dim -2) of each image."""
    log_p = F.log_softmax(logits, dim=-1)
    log_mean = torch.logsumexp(log_p, dim=-2) - math.log(logits.shape[-2])
    return -(log_mean.exp() * log_mean).sum(dim=-1)


def most_confident(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices ``(B, k)`` of the ``k = max(1, int(V · fraction))`` lowest-entropy views of each image
    (``logits``: ``(B, V, C)``)."""
    k = max(1, int(logits.shape[1] * fraction))
    return entropy(logits).argsort(dim=1)[:, :k]


def gather_views(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b]]`` for ``x`` of shape ``(B, V, ...)``."""
    shape = index.shape + x.shape[2:]
    expanded = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(shape)
    return x.gather(1, expanded)


class TestTimeDefense(InferenceDefense):
    """A test-time adaptation defense: prompts tuned per input on random views, so it is randomised."""

    randomized = True


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (%) of ``logits``, rounded to 2 decimals."""
    return round(100.0 * float((logits.argmax(-1) == labels).float().mean()), 2)
