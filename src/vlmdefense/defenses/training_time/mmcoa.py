"""MMCoA — multimodal contrastive adversarial training of both CLIP towers (Zhou et al., 2024).

Every batch pairs each seen-class training image with a caption (a prompt template drawn at random,
filled with the image's class name) and builds two adversarial pairs, as the official ``MMCoA.py``
(``attack_domain=both1``):

* an adversarial image — L∞ PGD maximising the zero-shot cross-entropy against the class prompts of the
  model being trained (TeCoA's inner attack) — paired with the clean caption;
* an adversarial caption — the word-substitution attack (BERT-Attack in the paper, here
  :func:`~.text_attacks.word_substitution_attack`, one word, class names and numerals protected) run on
  the text tower being trained — paired with the clean image.

The loss is ``λ_img·(CE(adv img → clean txt) + CE(clean txt → adv img)) + λ_txt·(CE(clean img → adv txt)
+ CE(adv txt → clean img))``: CLIP's symmetric in-batch contrastive loss (the i-th image matches the i-th
caption) on each adversarial pair. Both towers are fine-tuned (``full_tuning``); the logit scale stays
the original's. At inference the class embeddings come from the tuned text tower.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from vlmdefense.defenses.training_time.finetuning import AdversarialFineTuning, Batch, FineTuneConfig
from vlmdefense.defenses.training_time.text_attacks import (
    attacked_prompt_accuracy,
    protected_words,
    substitute_pool,
    text_encoder,
    word_substitution_attack,
)
from vlmdefense.workbench.evaluation import ZeroShotClassifier, text_classifier_weights

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData


@dataclass
class MMCoAConfig(FineTuneConfig):
    """The fine-tuning budget plus MMCoA's loss weights and text attack.

    Attributes:
        lambda_image: weight of the adversarial-image / clean-caption contrastive pair (code: 0.5).
        lambda_text: weight of the clean-image / adversarial-caption contrastive pair (code: 0.5).
        n_words: words the text attack substitutes per caption (code: 1).
    """

    lambda_image: float = 0.5
    lambda_text: float = 0.5
    n_words: int = 1


def symmetric_contrastive(images: torch.Tensor, texts: torch.Tensor, scale: float) -> torch.Tensor:
    """CE(image→text) + CE(text→image) over the batch, the i-th image matching the i-th text."""
    logits = scale * F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T
    truth = torch.arange(len(images), device=images.device)
    return F.cross_entropy(logits, truth) + F.cross_entropy(logits.T, truth)


class MMCoA(AdversarialFineTuning):
    """MMCoA: adversarial images and adversarial captions, contrastive losses on both, both towers tuned."""

    id = "mmcoa"
    config_class: ClassVar[type] = MMCoAConfig
    config: MMCoAConfig

    def __init__(self, config: MMCoAConfig | None = None) -> None:
        super().__init__(config)
        self._rng = random.Random(self.config.seed)
        self._substitutes: list[str] = []
        self._protected: frozenset[str] = frozenset()

    @classmethod
    def default_config(cls) -> Any:
        """AdamW (the code: Adam) over both towers, a learning rate ten times below FARE's at this scale."""
        return MMCoAConfig(optimizer="adamw", lr=1e-4, weight_decay=1e-4)

    # ---- both towers trainable -------------------------------------------------------------------

    def _tuned_copy(self, data: FitData) -> ZeroShotClassifier:
        classifier = super()._tuned_copy(data)
        for name, parameter in classifier.model.named_parameters():
            parameter.requires_grad_(not name.startswith("logit_"))
        return classifier

    def _optimizer(self, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """Every trainable parameter of the copy (the shared loop passes the image tower's only)."""
        assert self.classifier is not None
        return super()._optimizer([p for p in self.classifier.model.parameters() if p.requires_grad])

    def _refresh_text_weights(self) -> None:
        assert self.classifier is not None
        self.classifier.text_weights = text_classifier_weights(self.classifier.clip, self.classifier.prompts)

    def fit(self, data: FitData) -> dict[str, Any]:
        """Fine-tune both towers of a copy; the class embeddings are then the tuned text tower's."""
        self._rng = random.Random(self.config.seed)
        self._substitutes = substitute_pool(data.prompts)
        self._protected = protected_words(data.prompts)
        return super().fit(data)

    def tuned_state(self) -> dict[str, torch.Tensor]:
        """All weights of the tuned copy (both towers)."""
        if self.classifier is None:
            raise RuntimeError(f"{self.id}: call fit first")
        return {k: v.detach().cpu() for k, v in self.classifier.model.state_dict().items()}

    def restore(self, data: FitData, state: dict[str, torch.Tensor]) -> None:
        """Take both towers of an earlier :meth:`fit`."""
        super().restore(data, {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")})
        assert self.classifier is not None
        self.classifier.model.load_state_dict(state)
        self._refresh_text_weights()

    # ---- the objectives --------------------------------------------------------------------------

    def reference(self, batch: Batch) -> Batch:
        """Captions, their adversarial versions and the current class embeddings (no gradients)."""
        assert self.classifier is not None
        clip, prompts = self.classifier.clip, self.classifier.prompts
        classes = [self.train_classes[int(label)] for label in batch["labels"]]
        captions = [self._rng.choice(prompts.prompts(c)) for c in classes]
        adversarial = word_substitution_attack(
            text_encoder(clip), captions, self._substitutes, self._protected, self.config.n_words
        )
        self._refresh_text_weights()
        changed = sum(a != c for a, c in zip(adversarial, captions, strict=True))
        return {
            **batch,
            "captions": clip.tokenizer(captions).to(clip.device),
            "adversarial_captions": clip.tokenizer(adversarial).to(clip.device),
            "changed": torch.tensor(float(changed)),
        }

    def attack_objective(self, batch: Batch, x_adv: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self._logits(x_adv), batch["labels"])

    def training_loss(self, batch: Batch, x_adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        assert self.classifier is not None
        model, scale = self.classifier.model, self.classifier.logit_scale
        clean_text = model.encode_text(batch["captions"])
        adversarial_text = model.encode_text(batch["adversarial_captions"])
        image_pair = symmetric_contrastive(self._features(x_adv), clean_text, scale)
        text_pair = symmetric_contrastive(self._features(batch["images"]), adversarial_text, scale)
        loss = self.config.lambda_image * image_pair + self.config.lambda_text * text_pair
        parts = {
            "contrastive_adv_image": image_pair.item(),
            "contrastive_adv_text": text_pair.item(),
            "captions_changed": batch["changed"].item() / len(batch["images"]),
        }
        return loss, parts

    # ---- findings --------------------------------------------------------------------------------

    def summary(self, data: FitData, seconds: float) -> dict[str, Any]:
        """The shared findings (with the tuned class embeddings) plus the text side: zero-shot accuracy
        when every class prompt is attacked by the training's word substitution, original vs tuned."""
        self._refresh_text_weights()
        out = super().summary(data, seconds)
        assert self.classifier is not None
        test = data.sets.test

        def attack(encode: Any, sentences: list[str]) -> list[str]:
            return word_substitution_attack(encode, sentences, self._substitutes, self._protected, self.config.n_words)

        out["text_attack"] = {
            name: attacked_prompt_accuracy(clip, data.prompts, test.images, test.labels, attack)
            for name, clip in (("original", data.clip), ("tuned", self.classifier.clip))
        }
        original = data.clip.model.state_dict()
        out["text_tower_moved"] = any(
            not torch.equal(value, original[key])
            for key, value in self.classifier.model.state_dict().items()
            if not key.startswith(("visual.", "logit_"))
        )
        return out
