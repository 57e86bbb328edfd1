"""What the counterattack defenses (DOC, FPT-Noise, Hedge Defense, MAC, SCC) share.

A counterattack runs a few signed-gradient steps on the *input* at inference, inside its own L∞ budget,
before the frozen zero-shot classifier reads the moved image. :class:`CounterattackDefense` holds the
inference and the two adaptive attack surfaces every such defense offers:

- ``bpda``: the inner perturbation is computed without a graph and added as a constant, so the gradient
  reaches the input through the final classification only (the identity is the backward pass of the
  inner optimisation, as for TTC);
- ``input``: BPDA over the whole defense: the forward pass is the defended pipeline's, the backward pass
  the base classifier's at the input itself (as Anti-Adversary's default), for counterattacks whose
  moved point is a poor place to read the gradient;
- ``unrolled``: the inner steps are differentiated as they run (``create_graph``), so the attacker also
  sees how the counterattack's own gradient, reference embedding and projections depend on the input.
  ``sign`` has a zero derivative almost everywhere, so in this mode the signed step is a straight-through
  estimator whose backward pass is that of ``tanh(g / mean|g|)``; the forward pass is unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from vlmdefense.defenses.base import Predictor
from vlmdefense.defenses.training_free.common import TrainingFreeDefense

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData
    from vlmdefense.workbench.models import LoadedClip

ADAPTIVE_MODES = ("bpda", "input", "unrolled")


def raw_embed(clip: LoadedClip, images: torch.Tensor) -> torch.Tensor:
    """Unnormalised image embeddings of [0, 1] images (TTC's official code measures distances on them)."""
    return clip.model.encode_image(clip.normalize(images))


def into_ball(delta: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """``delta`` clipped to the L∞ ball of radius ``eps`` and to the pixel range (x + delta in [0, 1])."""
    delta = delta.clamp(-eps, eps)
    return torch.max(torch.min(delta, 1 - x), -x)


def uniform_start(x: torch.Tensor, eps: float) -> torch.Tensor:
    """A uniform draw from the ε-ball around ``x``, kept in the pixel range (torch's global generator)."""
    return into_ball(torch.empty_like(x).uniform_(-eps, eps), x, eps)


def signed(grad: torch.Tensor, smooth: bool) -> torch.Tensor:
    """``sign(grad)``; with ``smooth`` the backward pass is that of ``tanh(grad / mean|grad|)`` per image."""
    step = grad.sign()
    if not smooth:
        return step
    scale = grad.detach().abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
    surrogate = torch.tanh(grad / scale)
    return step.detach() + surrogate - surrogate.detach()


def variable(delta: torch.Tensor, unroll: bool) -> torch.Tensor:
    """The tensor to differentiate an inner loss by: a fresh leaf, or (``unroll``) ``delta`` in its graph."""
    if not unroll:
        return delta.detach().requires_grad_(True)
    return delta if delta.requires_grad else delta.detach().clone().requires_grad_(True)


def inner_gradient(loss: torch.Tensor, delta: torch.Tensor, unroll: bool) -> torch.Tensor:
    """``d loss / d delta``; differentiable itself (second order) when ``unroll``."""
    return torch.autograd.grad(loss, delta, create_graph=unroll)[0]


def embedding_distance(embedding: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The TTC objective: the squared L2 distance between embeddings, summed over the batch."""
    return (embedding - reference).pow(2).sum()


def relative_change(embedding: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """‖embedding − reference‖ / ‖reference‖ per image (TTC's τ)."""
    return (embedding - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-12)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, size: int = 5) -> torch.Tensor:
    """Per-image Gaussian blur (``sigma`` of shape (N,)), reflect-padded, differentiable in ``x``."""
    n, c, h, w = x.shape
    r = torch.arange(size, device=x.device, dtype=x.dtype) - size // 2
    kernel = torch.exp(-(r.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (N, size)
    pad = size // 2
    out = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    rows = kernel.repeat_interleave(c, dim=0)
    out = F.conv2d(out, rows.view(n * c, 1, 1, size), groups=n * c)
    out = F.conv2d(out, rows.view(n * c, 1, size, 1), groups=n * c)
    return out.view(n, c, h, w)


def random_affine(x: torch.Tensor, degrees: float, translate: float, scale: float) -> torch.Tensor:
    """A random rotation (±``degrees``), shift (±``translate`` of the side) and zoom (1 ± ``scale``) per
    image, bilinear with zero fill; differentiable in ``x``."""
    n = len(x)
    angle = torch.empty(n, device=x.device).uniform_(-degrees, degrees) * torch.pi / 180
    zoom = torch.empty(n, device=x.device).uniform_(1 - scale, 1 + scale)
    shift = torch.empty(n, 2, device=x.device).uniform_(-translate, translate) * 2  # grid units span 2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def score_clean_train(data: FitData, score: Callable[[torch.Tensor], torch.Tensor], limit: int) -> torch.Tensor:
    """``score`` of at most ``limit`` clean seen-class training images (a seeded subset, no gradients)."""
    train = data.seen_train
    generator = torch.Generator().manual_seed(data.seed)
    n = min(limit, len(train))
    index = torch.randperm(len(train), generator=generator)[:n]
    with torch.no_grad():
        return torch.cat([score(train.images[index[i : i + 256]]) for i in range(0, n, 256)])


@contextlib.contextmanager
def second_order() -> Iterator[None]:
    """Attention through the math kernel, whose backward pass can itself be differentiated on CPU."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


class CounterattackDefense(TrainingFreeDefense):
    """A counterattack in front of the frozen zero-shot classifier.

    Subclasses implement :meth:`defend` (logits of the defended pipeline; with ``unroll`` False the inner
    perturbations carry no graph to the input) and :meth:`passes` (forward and backward passes of the
    image tower per image). Their config has a field ``adaptive`` (one of :data:`ADAPTIVE_MODES`): the
    surface :meth:`attack_surface` returns.
    """

    def defend(self, images: torch.Tensor, unroll: bool) -> torch.Tensor:
        """Logits of the defended pipeline for ``images``."""
        raise NotImplementedError

    def passes(self) -> tuple[int, int]:
        """(forward, backward) passes of the image tower per image and prediction."""
        raise NotImplementedError

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        forward, backward = self.passes()
        n = len(images)
        self.counter.images += n
        self.counter.forward += n * forward
        self.counter.backward += n * backward
        with torch.no_grad():
            return self.defend(images.detach(), unroll=False).detach()

    def surface(self, mode: str) -> Predictor:
        """The adaptive attack surface ``bpda``, ``input`` or ``unrolled`` (see the module docstring).

        Raises:
            ValueError: unknown mode.
        """
        if mode not in ADAPTIVE_MODES:
            raise ValueError(f"{type(self).__name__}: adaptive must be one of {ADAPTIVE_MODES}, not {mode!r}")
        unroll = mode == "unrolled"

        def attacked(images: torch.Tensor) -> torch.Tensor:
            if mode == "input":
                at_input = self._base()(images)
                with torch.no_grad():
                    defended = self.defend(images.detach(), unroll=False)
                return at_input + (defended - at_input.detach())
            if not unroll:
                return self.defend(images, unroll=False)
            with second_order():
                return self.defend(images, unroll=True)

        return attacked

    def attack_surface(self) -> Predictor:
        """The surface the config's ``adaptive`` names."""
        return self.surface(str(getattr(self.config, "adaptive", "bpda")))
