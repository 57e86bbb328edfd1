"""Text-guided attention maps of a CLIP ViT image tower (TGA-ZSR's attention, Yu et al., NeurIPS 2024).

The map of an image for a text is the cosine similarity of every spatial patch token of the image tower
(after the final layer norm and the projection into the joint space, as the class token) with the text
embedding, min-max normalised per image; distances compare the maps bilinearly upsampled to ``size`` ×
``size`` pixels (the official code upsamples to the input resolution), computed on the patch grid. The
class-token embedding of the same forward pass is returned beside the patches, so one pass of the tower
gives both the logits and the map.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from vlmdefense.workbench.clip import LoadedClip


def embed_with_patches(clip: LoadedClip, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm image embeddings and unit-norm projected patch tokens ``(batch, patches, dim)`` of [0, 1]
    images, from one forward pass of ``clip``'s ViT image tower.

    Raises:
        ValueError: the tower is not a ViT pooling its class token with the layer norm before pooling
            (the open_clip default the small CLIP and ViT-B/32 use).
    """
    visual = clip.model.visual
    if getattr(visual, "pool_type", None) != "tok" or visual.attn_pool is not None or visual.final_ln_after_pool:
        raise ValueError("text-guided attention needs a ViT tower that pools its class token")
    x = visual._embeds(clip.normalize(images))
    x = visual.ln_post(visual.transformer(x))
    if visual.proj is not None:
        x = x @ visual.proj
    x = F.normalize(x, dim=-1)
    return x[:, 0], x[:, 1:]


def attention_from_patches(patches: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Text-guided attention maps on the patch grid ``(batch, patches)``: patch-text cosine similarity,
    min-max normalised per image.

    Args:
        patches: unit-norm patch tokens ``(batch, patches, dim)`` (a square grid).
        text: one unit-norm text embedding per image ``(batch, dim)`` (e.g. the true class's).
    """
    scores = torch.einsum("bpd,bd->bp", patches, text)
    low = scores.min(dim=1, keepdim=True).values
    high = scores.max(dim=1, keepdim=True).values
    return (scores - low) / (high - low).clamp_min(1e-8)


def attention_maps(clip: LoadedClip, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Text-guided attention maps ``(batch, patches)`` of ``images`` for one text embedding each."""
    return attention_from_patches(embed_with_patches(clip, images)[1], text)


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Patch-grid maps ``(batch, patches)`` upsampled bilinearly to ``(batch, size * size)`` pixels."""
    side = math.isqrt(maps.shape[1])
    if side * side != maps.shape[1]:
        raise ValueError(f"{maps.shape[1]} patch tokens do not form a square grid")
    grid = maps.reshape(-1, 1, side, side)
    return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False).flatten(1)


@functools.lru_cache(maxsize=8)
def _upsampling_gram(patches: int, size: int) -> torch.Tensor:
    """``U Uᵀ`` of the bilinear upsampling ``U`` (patches → size² pixels): inner products of upsampled maps
    are ``a (U Uᵀ) bᵀ`` on the patch grid, without materialising the large maps."""
    basis = upsample(torch.eye(patches, dtype=torch.float64), size)
    return (basis @ basis.T).float()


def map_distance(a: torch.Tensor, b: torch.Tensor, metric: str, size: int) -> torch.Tensor:
    """Batch mean of the distance between patch-grid maps once upsampled to ``size`` × ``size``:
    ``l2`` (the official default: Euclidean norm of the difference), ``l1`` (mean absolute difference) or
    ``cos`` (one minus cosine similarity). ``l2`` and ``cos`` are computed exactly on the patch grid."""
    if metric == "l1":
        return (upsample(a, size) - upsample(b, size)).abs().mean()
    gram = _upsampling_gram(a.shape[1], size).to(a.device, a.dtype)
    if metric == "l2":
        d = a - b
        return ((d @ gram) * d).sum(dim=1).clamp_min(1e-12).sqrt().mean()
    if metric == "cos":
        ab = ((a @ gram) * b).sum(dim=1)
        aa = ((a @ gram) * a).sum(dim=1)
        bb = ((b @ gram) * b).sum(dim=1)
        return (1.0 - ab / (aa * bb).clamp_min(1e-16).sqrt()).mean()
    raise ValueError(f"unknown distance {metric!r}: use 'l2', 'l1' or 'cos'")
