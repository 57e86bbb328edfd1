"""TIMA — text-image mutual awareness for zero-shot adversarial robustness (Ma et al., AAAI 2026).

Two tuning stages on a copy of CLIP (the original stays frozen), as the paper's two modules:

1. **Image-aware text tuning (IAT).** The text tower is tuned so that the prompt-ensembled class text
   embeddings spread apart — a minimum hyperspherical energy term ``mean_{i≠j} ‖t_i − t_j‖^(−s)`` over
   the training label space — while a cross-modal distillation term keeps the class distribution that
   the *fixed pre-trained* image embeddings of the seen-class training images assign to the tuned text
   embeddings close to the one they assign to the original text embeddings (KL, original first).
2. **Text-aware image tuning (TAI).** The image tower is adversarially fine-tuned on the shared loop
   (TeCoA's inner attack against the tuned class embeddings) with an additive cosine margin on every
   wrong class that adapts to text semantics: ``m_yj = margin · s̃_yj`` with ``s̃`` the original text
   embeddings' cosine similarity of classes y and j, min-max scaled to [0, 1] over the class pairs, so
   that semantically close classes are pushed furthest apart; plus a text-aware distillation term
   ``KL(p₀(x) ‖ p(x_adv))`` between the frozen original image tower's class distribution on the clean
   image and the fine-tuned one's on the adversarial image, both over the tuned class embeddings.

No code has been released; the loss forms, weights and the order of the two stages are assumptions
listed in the catalog entry. Inference: plain zero-shot CLIP with both tuned towers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from vlmdefense.defenses.training_loop import training_classes
from vlmdefense.defenses.training_time.finetuning import AdversarialFineTuning, Batch, FineTuneConfig
from vlmdefense.workbench.evaluation import ZeroShotClassifier

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData
    from vlmdefense.workbench.clip import LoadedClip
    from vlmdefense.workbench.data import PromptSpec


@dataclass
class TIMAConfig(FineTuneConfig):
    """The image tower's fine-tuning budget plus TIMA's text stage, margin and distillation.

    Attributes:
        text_steps: Adam steps of the image-aware text tuning (``0``: the text tower is not tuned).
        text_lr: learning rate of the text tuning.
        text_batch_size: pre-trained image embeddings per distillation step.
        mhe_power: ``s`` of the hyperspherical energy ``‖t_i − t_j‖^(−s)`` (``0``: the log energy).
        lambda_mhe: weight of the energy term.
        lambda_text_kd: weight of the cross-modal distillation term of the text stage.
        margin: the largest additive cosine margin (the most similar pair of classes).
        lambda_image_kd: weight of the text-aware distillation term of the image stage.
    """

    text_steps: int = 50
    text_lr: float = 1e-4
    text_batch_size: int = 128
    mhe_power: float = 2.0
    lambda_mhe: float = 1.0
    lambda_text_kd: float = 1.0
    margin: float = 0.1
    lambda_image_kd: float = 1.0


def hyperspherical_energy(embeddings: torch.Tensor, power: float = 2.0) -> torch.Tensor:
    """Mean pairwise energy ``‖t_i − t_j‖^(−power)`` (``power = 0``: ``−log‖t_i − t_j‖``) of unit rows."""
    n = len(embeddings)
    off = ~torch.eye(n, dtype=torch.bool, device=embeddings.device)
    distance = (embeddings[:, None, :] - embeddings[None, :, :]).norm(dim=-1)[off].clamp_min(1e-6)
    return (-distance.log()).mean() if power == 0 else distance.pow(-power).mean()


def adaptive_margins(text: torch.Tensor, scale: float) -> torch.Tensor:
    """``(C, C)`` margins: ``scale`` times the cosine similarity of the class text embeddings, min-max
    scaled over distinct pairs to [0, 1]; zero on the diagonal (the true class)."""
    similarity = text @ text.T
    off = ~torch.eye(len(text), dtype=torch.bool, device=text.device)
    low, high = similarity[off].min(), similarity[off].max()
    scaled = (similarity - low) / (high - low).clamp_min(1e-8)
    return scale * scaled * off


def margin_cross_entropy(
    cosines: torch.Tensor, labels: torch.Tensor, margins: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """Cross-entropy of ``logit_scale · (cos + m_y·)``: every wrong class's cosine raised by its margin
    to the true class."""
    return F.cross_entropy(logit_scale * (cosines + margins[labels]), labels)


def mean_pairwise_cosine(embeddings: torch.Tensor) -> float:
    """Mean cosine similarity over distinct pairs of unit rows."""
    n = len(embeddings)
    gram = embeddings @ embeddings.T
    return float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))


def ensemble_text_weights(clip: LoadedClip, tokens: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Prompt-ensembled unit class embeddings from ``tokens`` ``(classes · templates, length)`` (class
    major): the mean of the unit text embeddings of each class, renormalised; differentiable."""
    embeddings = F.normalize(clip.model.encode_text(tokens), dim=-1)
    return F.normalize(embeddings.view(n_classes, -1, embeddings.shape[-1]).mean(dim=1), dim=-1)


def prompt_tokens(clip: LoadedClip, prompts: PromptSpec) -> torch.Tensor:
    """Token ids of every class's filled-in templates, class major."""
    texts = [text for index in range(len(prompts.classnames)) for text in prompts.prompts(index)]
    return clip.tokenizer(texts).to(clip.device)


class TIMA(AdversarialFineTuning):
    """TIMA: hyperspherical-energy text tuning with cross-modal distillation, then adversarial image
    tuning with a semantics-adaptive margin and text-aware distillation."""

    id = "tima"
    config_class: ClassVar[type] = TIMAConfig
    config: TIMAConfig

    def __init__(self, config: TIMAConfig | None = None) -> None:
        super().__init__(config)
        self.margins: torch.Tensor | None = None
        self.text_history: list[dict[str, float]] = []
        self.text_seconds = 0.0

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        """The quick profile's budget: the fine-tuning's plus five text steps."""
        return {**super().fast_overrides(), "text_steps": 5}

    # ---- stage 1: image-aware text tuning ---------------------------------------------------------

    def tune_text(self, data: FitData, classifier: ZeroShotClassifier) -> torch.Tensor:
        """Tune the text tower of ``classifier``'s copy; returns the tuned class embeddings."""
        c = self.config
        clip = classifier.clip
        classes = self.train_classes
        tokens = prompt_tokens(clip, data.prompts)
        n = len(data.prompts.classnames)
        text_parameters = [p for name, p in clip.model.named_parameters() if not name.startswith(("visual.", "logit_"))]
        for parameter in text_parameters:
            parameter.requires_grad_(True)
        original_text = data.base.text_weights[classes]
        with torch.no_grad():
            features = data.base.embed(data.seen_train.images)
            target = F.log_softmax(data.base.logit_scale * features @ original_text.T, dim=-1)
        optimizer = torch.optim.Adam(text_parameters, lr=c.text_lr)
        generator = torch.Generator().manual_seed(c.seed)
        self.text_history = []
        start = time.perf_counter()
        for step in range(c.text_steps):
            index = torch.randperm(len(features), generator=generator)[: c.text_batch_size].to(features.device)
            text = ensemble_text_weights(clip, tokens, n)[classes]
            energy = hyperspherical_energy(text, c.mhe_power)
            tuned = F.log_softmax(data.base.logit_scale * features[index] @ text.T, dim=-1)
            kd = F.kl_div(tuned, target[index], reduction="batchmean", log_target=True)
            loss = c.lambda_mhe * energy + c.lambda_text_kd * kd
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            self.text_history.append(
                {"step": step + 1, "energy": round(energy.item(), 4), "text_kd": round(kd.item(), 5)}
            )
        self.text_seconds = time.perf_counter() - start
        for parameter in text_parameters:
            parameter.requires_grad_(False)
        with torch.no_grad():
            return ensemble_text_weights(clip, tokens, n)

    def _tuned_copy(self, data: FitData) -> ZeroShotClassifier:
        classifier = super()._tuned_copy(data)
        if self.margins is None:  # fit: tune the text tower once (restore loads it instead)
            self.margins = adaptive_margins(data.base.text_weights[self.train_classes], self.config.margin)
            classifier.text_weights = self.tune_text(data, classifier).detach()
        return classifier

    def fit(self, data: FitData) -> dict[str, Any]:
        """Tune the text tower (IAT), then adversarially fine-tune the image tower (TAI)."""
        self.margins = None
        out = super().fit(data)
        return {**out, **self.text_findings(data)}

    def tuned_state(self) -> dict[str, torch.Tensor]:
        """All weights of the tuned copy (both towers)."""
        if self.classifier is None:
            raise RuntimeError(f"{self.id}: call fit first")
        return {k: v.detach().cpu() for k, v in self.classifier.model.state_dict().items()}

    def restore(self, data: FitData, state: dict[str, torch.Tensor]) -> None:
        """Take both towers of an earlier :meth:`fit`."""
        self.train_classes = training_classes(data.prompts, self.config.train_text)
        self.margins = adaptive_margins(data.base.text_weights[self.train_classes], self.config.margin)
        super().restore(data, {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")})
        assert self.classifier is not None
        self.classifier.model.load_state_dict(state)
        tokens = prompt_tokens(self.classifier.clip, data.prompts)
        with torch.no_grad():
            weights = ensemble_text_weights(self.classifier.clip, tokens, len(data.prompts.classnames))
        self.classifier.text_weights = weights

    # ---- stage 2: text-aware image tuning ---------------------------------------------------------

    def reference(self, batch: Batch) -> Batch:
        """The frozen original image tower's class distribution on the clean images (tuned text)."""
        assert self.original is not None and self.classifier is not None
        text = self.classifier.text_weights[self.train_classes]
        original = self.original.embed(batch["images"])
        return {**batch, "original_log_p": F.log_softmax(self.classifier.logit_scale * original @ text.T, dim=-1)}

    def attack_objective(self, batch: Batch, x_adv: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self._logits(x_adv), batch["labels"])

    def training_loss(self, batch: Batch, x_adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        assert self.classifier is not None and self.margins is not None
        scale = self.classifier.logit_scale
        cosines = self.classifier.embed(x_adv) @ self.classifier.text_weights[self.train_classes].T
        margin_ce = margin_cross_entropy(cosines, batch["labels"], self.margins, scale)
        kd = F.kl_div(
            F.log_softmax(scale * cosines, dim=-1), batch["original_log_p"], reduction="batchmean", log_target=True
        )
        loss = margin_ce + self.config.lambda_image_kd * kd
        return loss, {"margin_ce_adv": margin_ce.item(), "image_kd": kd.item()}

    # ---- findings --------------------------------------------------------------------------------

    def text_findings(self, data: FitData) -> dict[str, Any]:
        """How the text stage moved the class embeddings: pairwise cosines, energy, cosine to the originals."""
        assert self.classifier is not None and self.margins is not None
        seen = list(data.prompts.seen_classes)
        unseen = [i for i in range(len(data.prompts.classnames)) if i not in seen]
        tuned, original = self.classifier.text_weights, data.base.text_weights

        def spread(weights: torch.Tensor) -> dict[str, float | None]:
            return {
                "seen": round(mean_pairwise_cosine(weights[seen]), 4),
                "unseen": round(mean_pairwise_cosine(weights[unseen]), 4) if len(unseen) > 1 else None,
                "all": round(mean_pairwise_cosine(weights), 4),
            }

        power = self.config.mhe_power
        off = self.margins[~torch.eye(len(self.margins), dtype=torch.bool, device=self.margins.device)]
        return {
            "text_steps": self.text_history,
            "text_tuning_seconds": round(self.text_seconds, 2),
            "class_text_mean_pairwise_cosine": {"original": spread(original), "tuned": spread(tuned)},
            "class_text_energy": {
                "original": round(hyperspherical_energy(original[self.train_classes], power).item(), 4),
                "tuned": round(hyperspherical_energy(tuned[self.train_classes], power).item(), 4),
            },
            "class_text_cosine_to_original": [round(float(v), 4) for v in (tuned * original).sum(dim=-1)],
            "margin_range": [
                round(float(off.min()), 4),
                round(float(off.max()), 4),
            ],
        }
