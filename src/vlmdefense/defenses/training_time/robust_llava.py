"""Robust-LLaVA — a large-scale adversarially pre-trained image encoder under a language model
(Malik et al., 2025), reproduced at the level of the CLIP encoder with the paper's zero-shot check.

Robust-LLaVA adds no adversarial training of its own: it takes AdvXL's image encoders (adversarially
pre-trained from scratch on image-text data with a weak-to-strong attack schedule), freezes them and
trains the language side on clean data. Its zero-shot experiment aligns a frozen robust encoder to CLIP
with one linear layer and classifies through CLIP's text encoder. Here:

1. the AdvXL stage: a fresh small CLIP is pre-trained adversarially from scratch (the shared
   mechanism, ``adversarial_pretraining.py``) with PGD-1 for most epochs and a stronger PGD in the last
   ones (AdvXL's weak-to-strong schedule); only its image tower is kept;
2. the alignment stage: the image tower is frozen and a linear layer is trained on *clean* seen-class
   training images to map its embeddings onto the original small CLIP's image embeddings (cosine loss);
3. zero-shot through the original small CLIP's text embeddings and temperature.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from vlmdefense.defenses.training_time.adversarial_pretraining import AdversarialPretraining, PretrainConfig
from vlmdefense.workbench.evaluation import ZeroShotClassifier

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData


@dataclass
class RobustLLaVAConfig(PretrainConfig):
    """AdvXL's weak-to-strong pre-training plus the clean alignment.

    Attributes:
        align_epochs: full-batch steps of the linear alignment.
        align_lr: Adam learning rate of the linear alignment.
    """

    steps: int = 1
    strong_epochs: int = 8
    strong_steps: int = 3
    align_epochs: int = 300
    align_lr: float = 1e-2


class AlignedTower(nn.Module):
    """A frozen image tower followed by a trainable linear map into another CLIP's embedding space."""

    def __init__(self, tower: nn.Module, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.tower = tower
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(self.tower(images))
        return out


def align(tower: AlignedTower, inputs: torch.Tensor, targets: torch.Tensor, epochs: int, lr: float) -> list[float]:
    """Fit ``tower.linear`` (full batch, Adam) so that the frozen tower's embeddings of ``inputs`` (model
    space) point where ``targets`` do (cosine loss); returns the loss before and after."""
    with torch.no_grad():
        features = tower.tower(inputs)
    targets = F.normalize(targets, dim=-1)
    optimizer = torch.optim.Adam(tower.linear.parameters(), lr=lr)
    losses = []
    for _ in range(epochs):
        loss = 1 - F.cosine_similarity(tower.linear(features), targets, dim=-1).mean()
        losses.append(loss.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        losses.append((1 - F.cosine_similarity(tower.linear(features), targets, dim=-1).mean()).item())
    return [losses[0], losses[-1]]


class RobustLLaVA(AdversarialPretraining):
    """Robust-LLaVA at the CLIP level: an AdvXL-style adversarially pre-trained image tower, frozen,
    linearly aligned on clean seen-class images to the original CLIP, classified zero-shot through the
    original CLIP's text embeddings."""

    id = "robust-llava"
    config_class: ClassVar[type] = RobustLLaVAConfig
    config: RobustLLaVAConfig

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        return {**super().fast_overrides(), "align_epochs": 20}

    def build(self, data: FitData, model: open_clip.CLIP) -> tuple[ZeroShotClassifier, dict[str, Any]]:
        base = data.clip.model
        dim_in, dim_out = int(model.visual.output_dim), int(data.base.text_weights.shape[1])
        tower = AlignedTower(model.visual, dim_in, dim_out).to(data.device)
        for parameter in tower.tower.parameters():
            parameter.requires_grad_(False)
        images = data.seen_train.images
        with torch.no_grad():
            targets = base.encode_image(data.clip.normalize(images))
        before, after = align(
            tower, data.clip.normalize(images), targets, self.config.align_epochs, self.config.align_lr
        )
        tower.eval()
        combined = copy.deepcopy(base)  # the original text tower and temperature, the aligned image tower
        combined.visual = tower
        clip = dataclasses.replace(data.clip, model=combined, pretrained="robust-llava (aligned AdvXL-style tower)")
        classifier = ZeroShotClassifier(clip, data.prompts, text_weights=data.base.text_weights).to(data.device)
        return classifier, {
            "align_images": len(images),
            "align_cosine_loss": {"before": round(before, 4), "after": round(after, 4)},
        }
