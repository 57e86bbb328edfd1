"""A loaded CLIP model: the model, its tokenizer and the normalisation its image tower expects.

Its own module so that evaluation code can take a model without importing the loading and training code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import open_clip
import torch
import torch.nn.functional as F


@dataclass
class LoadedClip:
    """A CLIP model with its tokenizer and the normalisation its image tower expects."""

    name: str
    pretrained: str
    model: open_clip.CLIP
    tokenizer: Any
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    device: str

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels → the model's input space."""
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        return (images - mean) / std

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings of [0, 1] images."""
        return F.normalize(self.model.encode_image(self.normalize(images)), dim=-1)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings."""
        tokens = self.tokenizer(texts).to(self.device)
        return F.normalize(self.model.encode_text(tokens), dim=-1)
