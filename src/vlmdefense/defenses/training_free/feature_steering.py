"""What AGC, AOM and ATAC share: the frozen image tower read at the input *and* at transformed copies of
it, and a correction of the input's unit embedding on the sphere before zero-shot classification.

:class:`EmbeddingSteering` is the base: a subclass says which copies it reads (:meth:`views`) and how the
input's embedding moves given theirs (:meth:`steer`); the base counts the passes, runs the pipeline
without a graph for :meth:`predict`, and keeps it differentiable for :meth:`attack_surface` (every view
is a differentiable function of the input, so an adaptive attack runs end to end, averaged over draws
when the views are random). The geometry helpers (geodesic step, mean pairwise cosine) and the batched
random perspective warp of AGC live here too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmdefense.defenses.base import Predictor
from vlmdefense.defenses.training_free.common import TrainingFreeDefense


def unit(x: torch.Tensor) -> torch.Tensor:
    """``x`` scaled to unit L2 norm along the last dimension."""
    return F.normalize(x, dim=-1)


def mean_direction(vectors: torch.Tensor) -> torch.Tensor:
    """(N, D) normalised mean of the unit versions of ``vectors`` (V, N, D): the anchor of AGC and AOM."""
    return unit(unit(vectors).mean(dim=0))


def geodesic_step(u: torch.Tensor, target: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Move unit vectors ``u`` (N, D) along the great circle towards ``target`` (N, D) by ``factor`` times
    the angle between them (``factor`` > 1 goes past the target). Differentiable; the angle comes from
    ``atan2`` so its gradient stays finite when ``u`` and ``target`` (nearly) coincide, where ``u`` is
    returned unchanged."""
    t = unit(target)
    cos = (u * t).sum(dim=-1, keepdim=True)
    tangent = t - cos * u
    sin = tangent.norm(dim=-1, keepdim=True)
    angle = torch.atan2(sin, cos)
    direction = tangent / sin.clamp_min(1e-12)
    step = factor * angle
    moved = unit(torch.cos(step) * u + torch.sin(step) * direction)
    return torch.where(sin > 1e-7, moved, u)


def geodesic_angle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Angle (radians) between the rows of ``u`` and ``v`` (unit or not)."""
    u, v = unit(u), unit(v)
    cos = (u * v).sum(dim=-1)
    return torch.atan2((v - cos.unsqueeze(-1) * u).norm(dim=-1), cos)


def mean_pairwise_cosine(vectors: torch.Tensor) -> torch.Tensor:
    """(N,) mean cosine similarity over the distinct pairs of the ``V`` vectors of each of ``N`` items,
    ``vectors`` shaped (V, N, D). Needs ``V`` ≥ 2."""
    v = vectors.shape[0]
    if v < 2:
        raise ValueError("mean_pairwise_cosine needs at least two vectors per item")
    u = unit(vectors)
    total = u.sum(dim=0)  # sum_i sum_j u_i·u_j = |sum u|^2; the diagonal contributes V
    return ((total * total).sum(dim=-1) - (u * u).sum(dim=(0, 2))) / (v * (v - 1))


def perspective_corners(n: int, height: int, width: int, distortion: float, device: torch.device) -> torch.Tensor:
    """(n, 4, 2) end points (x, y) of the corners top-left, top-right, bottom-right, bottom-left, drawn as
    torchvision's ``RandomPerspective.get_params`` draws them (integer pixel offsets of up to
    ``distortion`` times half the side, inward), from torch's global generator."""
    dw, dh = int(distortion * (width // 2)), int(distortion * (height // 2))

    def draw(low: int, high: int) -> torch.Tensor:
        return torch.randint(low, high, (n,), device=device)

    x_left = [draw(0, dw + 1), draw(0, dw + 1)]  # top-left, bottom-left
    x_right = [draw(width - dw - 1, width), draw(width - dw - 1, width)]  # top-right, bottom-right
    y_top = [draw(0, dh + 1), draw(0, dh + 1)]  # top-left, top-right
    y_bottom = [draw(height - dh - 1, height), draw(height - dh - 1, height)]  # bottom-right, bottom-left
    xs = torch.stack([x_left[0], x_right[0], x_right[1], x_left[1]], dim=1)
    ys = torch.stack([y_top[0], y_top[1], y_bottom[0], y_bottom[1]], dim=1)
    return torch.stack([xs, ys], dim=-1).float()


def warp_perspective(images: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """``images`` (n, C, H, W) warped so that their corners (0, 0), (W-1, 0), (W-1, H-1), (0, H-1) land on
    ``corners`` (n, 4, 2), as torchvision's ``perspective`` does (same homography and sampling grid,
    zero fill), with bilinear sampling. Differentiable in ``images``."""
    n, _, h, w = images.shape
    dtype, device = images.dtype, images.device
    start = torch.tensor([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], dtype=dtype, device=device)
    end = corners.to(dtype)
    # homography taking output (end) points to input (start) points: 8 unknowns a..h
    rows = torch.zeros(n, 8, 8, dtype=dtype, device=device)
    rhs = torch.zeros(n, 8, dtype=dtype, device=device)
    for i in range(4):
        x, y = end[:, i, 0], end[:, i, 1]
        sx, sy = start[i, 0], start[i, 1]
        rows[:, 2 * i, 0], rows[:, 2 * i, 1], rows[:, 2 * i, 2] = x, y, 1
        rows[:, 2 * i, 6], rows[:, 2 * i, 7] = -sx * x, -sx * y
        rows[:, 2 * i + 1, 3], rows[:, 2 * i + 1, 4], rows[:, 2 * i + 1, 5] = x, y, 1
        rows[:, 2 * i + 1, 6], rows[:, 2 * i + 1, 7] = -sy * x, -sy * y
        rhs[:, 2 * i], rhs[:, 2 * i + 1] = sx, sy
    c = torch.linalg.solve(rows, rhs)  # (n, 8)
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=dtype, device=device) + 0.5,
        torch.arange(w, dtype=dtype, device=device) + 0.5,
        indexing="ij",
    )
    xs, ys = xs.reshape(1, -1), ys.reshape(1, -1)
    denom = c[:, 6:7] * xs + c[:, 7:8] * ys + 1
    x_in = (c[:, 0:1] * xs + c[:, 1:2] * ys + c[:, 2:3]) / denom
    y_in = (c[:, 3:4] * xs + c[:, 4:5] * ys + c[:, 5:6]) / denom
    grid = torch.stack([x_in / (w / 2) - 1, y_in / (h / 2) - 1], dim=-1).view(n, h, w, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_perspective(images: torch.Tensor, n_views: int, distortion: float) -> torch.Tensor:
    """(n_views, N, C, H, W) random perspective warps of every image (a fresh draw per view and image)."""
    n, _, h, w = images.shape
    source = images.unsqueeze(0).expand(n_views, *images.shape).reshape(n_views * n, *images.shape[1:])
    corners = perspective_corners(n_views * n, h, w, distortion, images.device)
    return warp_perspective(source, corners).view(n_views, *images.shape)


class EmbeddingSteering(TrainingFreeDefense):
    """A training-free defense that reads the frozen image tower at the input and at ``V`` transformed
    copies (:meth:`views`), moves the input's unit embedding from those readings (:meth:`steer`), and
    classifies the moved embedding with the zero-shot class embeddings."""

    @property
    def n_views(self) -> int:
        """Transformed copies per image (extra forward passes of the image tower)."""
        raise NotImplementedError

    def views(self, images: torch.Tensor) -> torch.Tensor:
        """(V, N, C, H, W) transformed copies of ``images``; differentiable in ``images``."""
        raise NotImplementedError

    def steer(self, embedding: torch.Tensor, view_embeddings: torch.Tensor) -> torch.Tensor:
        """The corrected unit embeddings (N, D) from the input's (N, D) and the views' (V, N, D)."""
        raise NotImplementedError

    def readings(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit embeddings of the input (N, D) and of its views (V, N, D), in one pass of the tower."""
        base = self._base()
        views = self.views(images)
        v, n = views.shape[:2]
        both = base.embed(torch.cat([images, views.flatten(0, 1)]))
        return both[:n], both[n:].view(v, n, -1)

    def steered(self, images: torch.Tensor) -> torch.Tensor:
        """The corrected unit embeddings of ``images`` (keeps the graph)."""
        return self.steer(*self.readings(images))

    def defended_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Zero-shot logits of the corrected embeddings (keeps the graph)."""
        return self._base().logits_from_embeddings(self.steered(images))

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        self.counter.images += len(images)
        self.counter.forward += len(images) * (1 + self.n_views)
        with torch.no_grad():
            return self.defended_logits(images)

    def attack_surface(self) -> Predictor:
        """The whole pipeline, differentiated end to end (views, readings and correction)."""
        return self.defended_logits
