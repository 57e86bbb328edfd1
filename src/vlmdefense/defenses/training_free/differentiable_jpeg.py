"""JPEG round trips for [0, 1] image batches: the real codec (Pillow's libjpeg) and a differentiable
approximation of it, for BPDA attacks on JPEG-based defenses.

The approximation follows the baseline JPEG pipeline step by step, as Shin & Song (2017, "JPEG-resistant
adversarial images") proposed for attacking through compression: 8-bit pixels, RGB → YCbCr (JFIF),
4:2:0 chroma subsampling (2×2 averages), level shift, orthonormal 8×8 block DCT, division by the
IJG-scaled quantisation tables, rounding, and back (dequantisation, inverse DCT, triangle-filter chroma
upsampling, YCbCr → RGB, clipping, 8-bit rounding). The coefficient rounding uses the cubic surrogate
``round(x) + (x - round(x))**3``: its value is within 1/8 of the true rounding, and its derivative
``3 (x - round(x))**2`` is non-zero away from integers, unlike that of ``round``. The two 8-bit pixel
roundings are straight-through instead: an L∞ attack's iterates sit on the 8-bit grid (clean 8-bit
images plus multiples of its step), where the cubic surrogate's derivative is exactly zero.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# The example tables of the JPEG standard (ITU-T T.81, Annex K), natural (row-major) order.
LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
CHROMA_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    *((99,) * 8 for _ in range(4)),
)

Rounding = Callable[[torch.Tensor], torch.Tensor]


def quality_table(base: tuple[tuple[int, ...], ...], quality: int) -> torch.Tensor:
    """``base`` scaled to a JPEG quality (1–100) as the IJG library does (``jpeg_set_quality``), (8, 8)."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    table = torch.tensor(base, dtype=torch.float64)
    return ((table * scale + 50) // 100).clamp(1, 255).float()


def cubic_round(x: torch.Tensor) -> torch.Tensor:
    """Shin & Song's rounding surrogate: ``round(x) + (x - round(x))**3`` (differentiable, non-zero slope)."""
    r = torch.round(x).detach()
    return r + (x - r) ** 3


def straight_through_round(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, the identity backward (the 8-bit pixel roundings)."""
    return x + (torch.round(x) - x).detach()


def hard_round(x: torch.Tensor) -> torch.Tensor:
    """True rounding (zero gradient almost everywhere): the surrogate's reference."""
    return torch.round(x)


def pillow_jpeg(images: torch.Tensor, quality: int, subsampling: int = 2) -> torch.Tensor:
    """The real codec: each [0, 1] image (N, 3, H, W) saved as an 8-bit JPEG by Pillow at ``quality``
    (``subsampling`` 2 = 4:2:0, Pillow's default) and decoded again; returns [0, 1] floats, no graph."""
    arrays = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array, mode="RGB").save(buffer, format="JPEG", quality=quality, subsampling=subsampling)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            out.append(np.asarray(decoded.convert("RGB"), dtype=np.uint8).copy())
    stacked = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
    return stacked.to(device=images.device, dtype=images.dtype) / 255.0


def pillow_tables(quality: int) -> dict[int, list[int]]:
    """The quantisation tables Pillow writes at ``quality`` (natural order), read back from a file."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        tables: dict[int, list[int]] = {int(k): list(v) for k, v in decoded.quantization.items()}
    return tables


def dct_matrix(n: int = 8) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``D`` (n, n): block coefficients are ``D @ block @ D.T``."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    x = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    d = torch.cos((2 * x + 1) * k * math.pi / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.float()


def _to_blocks(plane: torch.Tensor) -> torch.Tensor:
    """(N, H, W) with H, W multiples of 8 → (N, H/8, W/8, 8, 8)."""
    n, h, w = plane.shape
    return plane.view(n, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)


def _from_blocks(blocks: torch.Tensor) -> torch.Tensor:
    n, bh, bw = blocks.shape[:3]
    return blocks.permute(0, 1, 3, 2, 4).reshape(n, bh * 8, bw * 8)


def _pad_to(plane: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate the last row and column up to a multiple of ``multiple`` (as libjpeg pads an edge block)."""
    h, w = plane.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return plane
    return F.pad(plane.unsqueeze(1), (0, pw, 0, ph), mode="replicate").squeeze(1)


def _rgb_to_ycbcr(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128.0
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128.0
    return torch.stack([y, cb, cr], dim=1)


def _ycbcr_to_rgb(x: torch.Tensor) -> torch.Tensor:
    y, cb, cr = x[:, 0], x[:, 1] - 128.0, x[:, 2] - 128.0
    r = y + 1.402 * cr
    g = y - 0.344136 * cb - 0.714136 * cr
    b = y + 1.772 * cb
    return torch.stack([r, g, b], dim=1)


class DifferentiableJPEG:
    """A differentiable stand-in for a JPEG round trip at ``quality`` (4:2:0, IJG tables).

    Args:
        quality: JPEG quality (1–100).
        rounding: the rounding of the quantised DCT coefficients (default: the cubic surrogate).
    """

    def __init__(self, quality: int, rounding: Rounding = cubic_round) -> None:
        self.quality = quality
        self.rounding = rounding
        self.tables = (quality_table(LUMA_TABLE, quality), quality_table(CHROMA_TABLE, quality))
        self.dct = dct_matrix()

    def _code_plane(self, plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Level shift, block DCT, quantise with ``rounding``, dequantise, inverse DCT (N, H, W → N, H, W)."""
        h, w = plane.shape[-2:]
        d = self.dct.to(plane)
        q = table.to(plane)
        coefficients = d @ _to_blocks(_pad_to(plane, 8) - 128.0) @ d.T
        restored = d.T @ (self.rounding(coefficients / q) * q) @ d
        return _from_blocks(restored)[:, :h, :w] + 128.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (N, 3, H, W) → their approximate JPEG round trip, [0, 1], differentiable."""
        h, w = images.shape[-2:]
        pixels = straight_through_round(images.clamp(0, 1) * 255.0)
        ycc = _rgb_to_ycbcr(pixels)
        luma = self._code_plane(ycc[:, 0], self.tables[0])
        chroma = []
        for c in (1, 2):
            plane = _pad_to(ycc[:, c], 2)
            small = F.avg_pool2d(plane.unsqueeze(1), 2).squeeze(1)
            coded = self._code_plane(small, self.tables[1])
            # libjpeg's default "fancy" 2x upsampling is the 3/4-1/4 triangle filter, i.e. bilinear
            up = F.interpolate(coded.unsqueeze(1), scale_factor=2, mode="bilinear", align_corners=False)
            chroma.append(up.squeeze(1)[:, :h, :w])
        rgb = _ycbcr_to_rgb(torch.stack([luma, *chroma], dim=1)).clamp(0, 255)
        return straight_through_round(rgb) / 255.0
