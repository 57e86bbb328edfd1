"""TTP — test-time padding for adversarial detection and robust adaptation (Li, Pang, Wang, Sun and Li,
CVPR 2026). No code is released; this follows the paper's description (see the catalog entry).

Detection: the image is shrunk into the centre of a zero border (a fixed padding) and the cosine
similarity between the frozen image embeddings of the image and of its padded copy is compared with a
threshold; a low similarity (a large shift) flags the input as adversarial. Inputs judged clean are
classified by the zero-shot classifier unchanged. Flagged inputs: the border becomes learnable pixels
(one border per image, starting from the zero padding), ``steps`` AdamW steps minimise TPT's marginal
entropy of the most confident padded views (the image and random resized crops, each padded with that
border), and the prediction is an ensemble of all padded views weighted by a softmax over their
*dissimilarity* to the unpadded image's embedding (views that moved away from the suspect embedding
count more). The paper's threshold is a universal constant for CLIP at 224 pixels; here it is the
``detection_fpr`` quantile of the similarities of clean seen-class training images (no labels).

Adaptive attack: the gate is hard in the forward pass and a sigmoid of the similarity margin in the
backward pass (straight-through), so the attacker's gradient reaches both branches and the detector;
BPDA through the padding update (a constant border); EOT over the random views.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vlmdefense.defenses.base import Predictor
from vlmdefense.defenses.test_time_adaptation.views import (
    TestTimeDefense,
    gather_views,
    marginal_entropy,
    most_confident,
    random_views,
)

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData
    from vlmdefense.workbench.evaluation import ZeroShotClassifier


@dataclass
class TTPConfig:
    """TTP's hyperparameters. The paper's values could not be read (no code, the method section was not
    reachable): every default here is an assumption listed in the catalog entry's deviations.

    Attributes:
        pad: border width in pixels of the padded image (the image is resized to fit inside).
        detection_fpr: share of clean training images flagged; sets the similarity threshold.
        threshold: a fixed similarity threshold instead (``None``: calibrate).
        n_views: padded inputs per flagged image (the image and random resized crops).
        selection: fraction of lowest-entropy padded views in the entropy.
        steps, lr, weight_decay: AdamW on the border pixels.
        temperature: softmax temperature of the ensemble weights over ``1 - cos`` to the image.
        crop_scale_min: smallest area of a random crop.
        gate_temperature: the adaptive attack's sigmoid width around the threshold (0: a hard gate,
            no gradient to the detector).
    """

    pad: int = 2
    detection_fpr: float = 0.05
    threshold: float | None = None
    n_views: int = 8
    selection: float = 0.25
    steps: int = 1
    lr: float = 0.1
    weight_decay: float = 0.0
    temperature: float = 0.01
    crop_scale_min: float = 0.5
    gate_temperature: float = 0.01


def pad_into(images: torch.Tensor, border: torch.Tensor, pad: int) -> torch.Tensor:
    """``images`` (N, C, H, W) shrunk (bilinear) into the centre, surrounded by the ``pad``-pixel ring
    of ``border`` (N, C, H, W); differentiable in both."""
    h, w = images.shape[-2:]
    inner = F.interpolate(images, size=(h - 2 * pad, w - 2 * pad), mode="bilinear", align_corners=False)
    ring = torch.ones(1, 1, h, w, device=images.device, dtype=images.dtype)
    ring[..., pad : h - pad, pad : w - pad] = 0
    return F.pad(inner, (pad, pad, pad, pad)) + ring * border.clamp(0, 1)


@dataclass
class TTPOutput:
    """One TTP pass over a batch."""

    logits: torch.Tensor
    similarity: torch.Tensor
    flagged: torch.Tensor
    weights: torch.Tensor | None = None


class TTP(TestTimeDefense):
    """TTP (Li et al., CVPR 2026): detect by the embedding shift under padding, then adapt a learnable
    border on flagged inputs with a similarity-aware view ensemble."""

    id = "ttp"
    config_class = TTPConfig
    config: TTPConfig

    def __init__(self, config: TTPConfig | None = None) -> None:
        super().__init__(config)
        self.threshold: float | None = None

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        return {"n_views": 4, "selection": 0.5}

    def bind(self, classifier: ZeroShotClassifier) -> None:
        super().bind(classifier)
        self.threshold = self.config.threshold

    def fit(self, data: FitData) -> dict[str, Any]:
        """Bind the frozen classifier and set the threshold from clean training images' similarities."""
        self.bind(data.base)
        clean = torch.cat([self.similarity(x) for x in data.seen_train.images.split(256)])
        if self.config.threshold is None:
            self.threshold = float(torch.quantile(clean, self.config.detection_fpr))
        assert self.threshold is not None
        quantiles = torch.quantile(clean, torch.tensor([0.01, 0.05, 0.5, 0.95]))
        return {
            "hyperparameters": self.hyperparameters(),
            "threshold": round(self.threshold, 5),
            "train_images": len(clean),
            "clean_train_similarity_quantiles": dict(
                zip(("q01", "q05", "q50", "q95"), [round(float(q), 5) for q in quantiles], strict=True)
            ),
        }

    # ---- the mechanism ---------------------------------------------------------------------------

    def similarity(self, images: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of the embeddings of ``images`` and of their zero-padded copies."""
        base = self._base()
        zero = torch.zeros_like(images)
        return (base.embed(images) * base.embed(pad_into(images, zero, self.config.pad))).sum(-1)

    def adapt(self, images: torch.Tensor, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tune each image's border on its views (no graph to ``images``), then the weighted ensemble
        (graph kept when grad is enabled, the border a constant); returns logits and weights."""
        cfg, base = self.config, self._base()
        views = random_views(images, cfg.n_views, scale=(cfg.crop_scale_min, 1.0))
        b, v = views.shape[:2]
        flat = views.flatten(0, 1)
        border = torch.nn.Parameter(torch.zeros(b, *images.shape[1:], device=images.device, dtype=images.dtype))
        optimizer = torch.optim.AdamW([border], lr=cfg.lr, weight_decay=cfg.weight_decay)
        selected = None
        with torch.enable_grad():
            for _ in range(cfg.steps):
                padded = pad_into(flat.detach(), border.repeat_interleave(v, dim=0), cfg.pad)
                logits = base(padded).view(b, v, -1)
                if selected is None:
                    selected = most_confident(logits.detach(), cfg.selection)
                loss = marginal_entropy(gather_views(logits, selected))
                optimizer.zero_grad(set_to_none=True)
                loss.sum().backward()
                optimizer.step()
        padded = pad_into(flat, border.detach().repeat_interleave(v, dim=0), cfg.pad)
        features = base.embed(padded).view(b, v, -1)
        moved = 1 - (features * embedding.unsqueeze(1)).sum(-1)  # (B, V)
        weights = torch.softmax(moved / cfg.temperature, dim=-1)
        logits = base.logits_from_embeddings(features)
        return (weights.unsqueeze(-1) * logits).sum(dim=1), weights

    def run(self, images: torch.Tensor, with_graph: bool = False) -> TTPOutput:
        """Detect, then adapt the flagged images; ``with_graph`` keeps the graph to ``images`` with the
        straight-through gate (adaptive attack) and adapts every image."""
        if self.threshold is None:
            raise RuntimeError("TTP: call fit first (the detection threshold is missing)")
        base = self._base()
        with torch.set_grad_enabled(with_graph):
            embedding = base.embed(images)
            padded = base.embed(pad_into(images, torch.zeros_like(images), self.config.pad))
            similarity = (embedding * padded).sum(-1)
            plain = base.logits_from_embeddings(embedding)
            flagged = similarity.detach() < self.threshold
            logits = plain.clone()
            weights = None
            if with_graph:
                adapted, weights = self.adapt(images, embedding)
                gate = flagged.to(plain.dtype)
                if self.config.gate_temperature > 0:  # straight-through: the detector's gradient too
                    soft = torch.sigmoid((self.threshold - similarity) / self.config.gate_temperature)
                    gate = gate + soft - soft.detach()
                gate = gate.unsqueeze(-1)
                logits = gate * adapted + (1 - gate) * plain
            elif flagged.any():
                adapted, weights = self.adapt(images[flagged], embedding[flagged])
                logits[flagged] = adapted
        return TTPOutput(logits, similarity.detach(), flagged, weights)

    # ---- the harness' interface ------------------------------------------------------------------

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        out = self.run(images)
        n, k = len(images), int(out.flagged.sum())
        cfg = self.config
        self.counter.images += n
        self.counter.forward += 2 * n + k * cfg.n_views * (cfg.steps + 1)  # detection; flagged: tuning, ensemble
        self.counter.backward += k * cfg.steps  # through the image tower
        return out.logits

    def attack_surface(self) -> Predictor:
        """The straight-through-gated pipeline with fresh views; the tuned border is a constant (BPDA)."""

        def surface(images: torch.Tensor) -> torch.Tensor:
            return self.run(images, with_graph=True).logits

        return surface


def detection_report(data: FitData, defense: TTP, adversarial: dict[str, torch.Tensor]) -> dict[str, Any]:
    """How often TTP flags clean test images and non-adaptive adversarial ones (crafted on the
    undefended classifier), the AUC of the similarity as a detector, and TTP's accuracy on each set."""
    from vlmdefense.defenses.test_time_adaptation.views import accuracy
    from vlmdefense.defenses.training_free.common import auc
    from vlmdefense.workbench.models import set_seed

    x, y = data.sets.test.images, data.sets.test.labels
    rows: dict[str, dict[str, float]] = {}
    clean_similarity = None
    for key, images in {"clean": x, **adversarial}.items():
        set_seed(data.seed)
        out = defense.run(images)
        row = {"flagged %": round(100.0 * float(out.flagged.float().mean()), 2), "accuracy %": accuracy(out.logits, y)}
        if clean_similarity is None:
            clean_similarity = out.similarity
        else:  # adversarial images are the positives: a lower similarity flags them
            row["auc"] = auc(-clean_similarity, -out.similarity)
        row["similarity mean"] = round(float(out.similarity.mean()), 5)
        rows[key] = row
    return {"threshold": defense.threshold, "sets": rows}
