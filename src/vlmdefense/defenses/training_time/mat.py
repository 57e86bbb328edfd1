"""MAT — multimodal adversarial training with one-to-many image-text pairs (Waseda et al., WACV 2026).

Both towers of a copy of CLIP are fine-tuned on image-caption pairs of the seen classes. Every batch
pairs each image with ``captions_per_image`` captions drawn from its class's templates (the one-to-many,
1:N, text augmentation; 1 is plain MAT). The pairs are then attacked in both modalities, text first as
in the multimodal attacks the paper defends against: each caption gets up to ``text_budget`` word
substitutions that maximise its caption-to-image contrastive loss (a first-order HotFlip ranking of the
substitutions, the best ``text_candidates`` checked exactly), then the images get L∞ PGD against the
adversarial captions. The model minimises the symmetric contrastive loss of the adversarial pairs. With
class-level captions every caption of a class describes every image of that class, so the contrastive
targets treat all same-class pairs of the batch as positives. Inference is zero-shot CLIP with the class
embeddings re-computed by the fine-tuned text tower.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from vlmdefense.defenses.training_loop import training_classes
from vlmdefense.defenses.training_time.finetuning import AdversarialFineTuning, Batch, FineTuneConfig
from vlmdefense.workbench.evaluation import ZeroShotClassifier, text_classifier_weights
from vlmdefense.workbench.models import set_seed

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData
    from vlmdefense.workbench.clip import LoadedClip
    from vlmdefense.workbench.data import PromptSpec


@dataclass
class MATConfig(FineTuneConfig):
    """The fine-tuning budget plus MAT's multimodal attack and one-to-many augmentation.

    Attributes:
        captions_per_image: captions drawn per image and step from its class's templates (1:N text
            augmentation; 1 is MAT on one-to-one pairs).
        text_budget: words substituted per caption by the text attack (0: image-only adversarial training).
        text_candidates: substitutions per caption, ranked by the first-order estimate, whose loss is
            evaluated exactly before the best is kept.
        train_text_tower: fine-tune the text tower as well as the image tower (MAT fine-tunes CLIP).
        class_negatives: add one caption of every class of the training softmax (``train_text``) that the
            batch lacks as an extra negative of the image-to-text loss and the image attack (``False``: the
            batch's own captions only, so a class never in the batch is never pushed away).
    """

    captions_per_image: int = 2
    text_budget: int = 1
    text_candidates: int = 8
    train_text_tower: bool = True
    class_negatives: bool = True


def positive_mask(image_labels: torch.Tensor, text_labels: torch.Tensor) -> torch.Tensor:
    """``(images, texts)`` boolean: which pairs describe the same class."""
    return image_labels[:, None] == text_labels[None, :]


def multi_positive_ce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Per row: ``-log`` of the softmax mass on the row's positives."""
    return torch.logsumexp(logits, dim=1) - torch.logsumexp(logits.masked_fill(~positives, float("-inf")), dim=1)


def caption_loss(
    scale: float, images: torch.Tensor, image_classes: torch.Tensor, text_classes: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-caption caption-to-image contrastive loss against unit ``images``, as a function of the unit
    caption embeddings."""

    def loss_of(texts: torch.Tensor) -> torch.Tensor:
        return multi_positive_ce(scale * texts @ images.T, positive_mask(text_classes, image_classes))

    return loss_of


class Vocabulary:
    """The token ids of a prompt set: the ids that name a class (never substituted) and the candidates
    for substitution (every other word of the templates)."""

    def __init__(self, clip: LoadedClip, prompts: PromptSpec) -> None:
        per_class = [set(clip.tokenizer(prompts.prompts(c)).flatten().tolist()) for c in range(len(prompts.classnames))]
        shared = set.intersection(*per_class)
        self.special = {0, int(clip.tokenizer.sot_token_id), int(clip.tokenizer.eot_token_id)}
        self.protected = set.union(*per_class) - shared
        self.candidates = torch.tensor(sorted(shared - self.special), dtype=torch.long)


def encode_tokens(clip: LoadedClip, tokens: torch.Tensor, embeddings: torch.Tensor | None = None) -> torch.Tensor:
    """Unit text embeddings of token ids, optionally with the token embeddings given (for their gradient)."""
    model = clip.model
    if embeddings is None:
        return F.normalize(model.encode_text(tokens), dim=-1)
    handle = model.token_embedding.register_forward_hook(lambda _m, _i, _o: embeddings)
    try:
        return F.normalize(model.encode_text(tokens), dim=-1)
    finally:
        handle.remove()


def substitute_words(
    clip: LoadedClip,
    tokens: torch.Tensor,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    vocabulary: Vocabulary,
    budget: int,
    candidates: int,
) -> torch.Tensor:
    """Greedy word substitution: ``budget`` rounds, each replacing in every caption the one word (not a
    class name) whose substitution most increases ``loss_of(text_embeddings) -> per-caption loss``; the
    ``candidates`` best first-order (HotFlip) estimates are evaluated exactly. A caption keeps its words
    when no substitution increases its loss."""
    vocab = vocabulary.candidates.to(tokens.device)
    table = clip.model.token_embedding.weight.detach()
    editable = torch.ones_like(tokens, dtype=torch.bool)
    for token in vocabulary.special | vocabulary.protected:
        editable &= tokens != token
    tokens = tokens.clone()
    for _ in range(budget):
        with torch.enable_grad():
            embedded = table[tokens].clone().requires_grad_(True)
            loss = loss_of(encode_tokens(clip, tokens, embedded))
            (grad,) = torch.autograd.grad(loss.sum(), embedded)
        with torch.no_grad():
            current = loss.detach()
            # first-order gain of putting candidate v at position p: (E[v] - E[tokens_p]) . grad_p
            gain = torch.einsum("npd,vd->npv", grad, table[vocab]) - (grad * table[tokens]).sum(-1, keepdim=True)
            gain = gain.masked_fill(~editable[..., None], float("-inf"))
            gain = gain.masked_fill(vocab[None, None, :] == tokens[..., None], float("-inf"))
            top = gain.flatten(1).topk(min(candidates, gain[0].numel()), dim=1).indices
            best, best_loss = tokens.clone(), current.clone()
            for k in range(top.shape[1]):
                position, word = top[:, k] // len(vocab), vocab[top[:, k] % len(vocab)]
                trial = tokens.clone()
                trial[torch.arange(len(tokens)), position] = word
                trial_loss = loss_of(encode_tokens(clip, trial))
                better = (trial_loss > best_loss) & editable[torch.arange(len(tokens)), position]
                best[better], best_loss[better] = trial[better], trial_loss[better]
            changed = (best != tokens).any(dim=1)
            editable[changed] &= best[changed] == tokens[changed]  # a substituted word stays substituted
            tokens = best
    return tokens


class MAT(AdversarialFineTuning):
    """MAT: adversarial fine-tuning of both CLIP towers on image and text perturbations, with 1:N captions."""

    id = "mat"
    config_class: ClassVar[type] = MATConfig
    config: MATConfig

    def __init__(self, config: MATConfig | None = None) -> None:
        super().__init__(config)
        if self.config.captions_per_image < 1:
            raise ValueError("captions_per_image must be at least 1")
        self.vocabulary: Vocabulary | None = None
        self.captions: torch.Tensor | None = None  # (classes, templates, context) token ids
        self.prompts: PromptSpec | None = None
        self._generator = torch.Generator()

    # ---- the pairs and the contrastive loss ------------------------------------------------------

    def _pairs(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``captions_per_image`` distinct templates per image: token ids and their class labels."""
        assert self.captions is not None
        n, templates = len(labels), self.captions.shape[1]
        k = min(self.config.captions_per_image, templates)
        choice = torch.rand(n, templates, generator=self._generator).argsort(dim=1)[:, :k].to(labels.device)
        classes = torch.tensor(self.train_classes, device=labels.device)[labels]
        tokens = self.captions[classes[:, None], choice].flatten(0, 1)
        return tokens, classes.repeat_interleave(k)

    def _scale(self) -> float:
        assert self.classifier is not None
        return self.classifier.logit_scale

    def reference(self, batch: Batch) -> Batch:
        """The captions of the batch and their adversarial word substitutions against the clean images."""
        assert self.classifier is not None and self.vocabulary is not None
        tokens, text_classes = self._pairs(batch["labels"])
        classes = torch.tensor(self.train_classes, device=tokens.device)[batch["labels"]]
        if self.config.text_budget > 0:
            clip = self.classifier.clip
            loss_of = caption_loss(self._scale(), clip.encode_images(batch["images"]), classes, text_classes)
            tokens = substitute_words(
                clip, tokens, loss_of, self.vocabulary, self.config.text_budget, self.config.text_candidates
            )
        negatives = self._negative_tokens(classes)
        texts = encode_tokens(self.classifier.clip, torch.cat([tokens, negatives]))
        return {
            **batch,
            "tokens": tokens,
            "negatives": negatives,
            "text_classes": text_classes,
            "classes": classes,
            "texts": texts,
        }

    def _negative_tokens(self, classes: torch.Tensor) -> torch.Tensor:
        """One caption (a random template) of each training class absent from the batch, if ``class_negatives``."""
        assert self.captions is not None
        absent = sorted(set(self.train_classes) - set(classes.tolist())) if self.config.class_negatives else []
        template = torch.randint(0, self.captions.shape[1], (len(absent),), generator=self._generator)
        rows = torch.tensor(absent, dtype=torch.long, device=classes.device)
        return self.captions[rows, template.to(classes.device)]

    def _image_to_text_positives(self, batch: Batch) -> torch.Tensor:
        """``(images, captions + negatives)``: the batch's same-class pairs; the negatives are never positive."""
        positives = positive_mask(batch["classes"], batch["text_classes"])
        return torch.cat([positives, positives.new_zeros(len(positives), len(batch["negatives"]))], dim=1)

    def attack_objective(self, batch: Batch, x_adv: torch.Tensor) -> torch.Tensor:
        assert self.classifier is not None
        logits = self._scale() * self.classifier.embed(x_adv) @ batch["texts"].T
        return multi_positive_ce(logits, self._image_to_text_positives(batch)).mean()

    def training_loss(self, batch: Batch, x_adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        assert self.classifier is not None
        images = self.classifier.embed(x_adv)
        texts = encode_tokens(self.classifier.clip, torch.cat([batch["tokens"], batch["negatives"]]))
        logits = self._scale() * images @ texts.T
        positives = self._image_to_text_positives(batch)
        captions = len(batch["tokens"])
        image_to_text = multi_positive_ce(logits, positives).mean()
        text_to_image = multi_positive_ce(logits[:, :captions].T, positives[:, :captions].T).mean()
        loss = (image_to_text + text_to_image) / 2
        return loss, {"i2t_adv": image_to_text.item(), "t2i_adv": text_to_image.item()}

    # ---- fitting: both towers, class embeddings from the tuned text tower ------------------------

    def _tuned_copy(self, data: FitData) -> ZeroShotClassifier:
        classifier = super()._tuned_copy(data)
        if self.config.train_text_tower:
            for name, parameter in classifier.model.named_parameters():
                if not name.startswith("visual.") and name != "logit_scale":
                    parameter.requires_grad_(True)
        return classifier

    def _optimizer(self, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        assert self.classifier is not None
        return super()._optimizer([p for p in self.classifier.model.parameters() if p.requires_grad])

    def _refresh_text_weights(self) -> None:
        """Class embeddings of the fine-tuned text tower (the prompt ensemble)."""
        assert self.classifier is not None and self.prompts is not None
        self.classifier.text_weights = text_classifier_weights(self.classifier.clip, self.prompts).detach()

    def _logits(self, images: torch.Tensor, classifier: ZeroShotClassifier | None = None) -> torch.Tensor:
        """Zero-shot logits of the tuned model with class embeddings from its current text tower (the
        logged training accuracy follows the text tower as it trains)."""
        if classifier is None and self.config.train_text_tower:
            self._refresh_text_weights()
        return super()._logits(images, classifier)

    def fit(self, data: FitData) -> dict[str, Any]:
        """Multimodal adversarial fine-tuning of both towers on the seen classes' image-caption pairs."""
        self.prompts = data.prompts
        self.vocabulary = Vocabulary(data.clip, data.prompts)
        self.captions = torch.stack(
            [data.clip.tokenizer(data.prompts.prompts(c)) for c in range(len(data.prompts.classnames))]
        ).to(data.device)
        self._generator.manual_seed(self.config.seed)
        set_seed(self.config.seed)
        return super().fit(data)

    def summary(self, data: FitData, seconds: float) -> dict[str, Any]:
        """Refresh the class embeddings from the tuned text tower, then the shared findings and the
        robustness of caption-to-image retrieval to the word-substitution attack."""
        self._refresh_text_weights()
        out = super().summary(data, seconds)
        out["caption_retrieval_under_word_attack"] = {
            name: self.caption_retrieval(model, data)
            for name, model in (("original", data.base), ("fine_tuned", self.classifier))
        }
        return out

    def caption_retrieval(self, model: ZeroShotClassifier | None, data: FitData) -> dict[str, float]:
        """Caption-to-image retrieval on the test digits for every template of every class: R-precision (%,
        the share of the caption's class among its R best-ranked images, R the number of test images of
        that class), clean and after ``text_budget`` word substitutions (at least one) chosen against
        ``model``."""
        assert model is not None and self.vocabulary is not None and self.captions is not None
        test = data.sets.test
        tokens = self.captions.flatten(0, 1)
        classes = torch.arange(self.captions.shape[0], device=tokens.device).repeat_interleave(self.captions.shape[1])
        with torch.no_grad():
            images = model.embed(test.images)
        loss_of = caption_loss(model.logit_scale, images, test.labels, classes)
        adversarial = substitute_words(
            model.clip, tokens, loss_of, self.vocabulary, max(1, self.config.text_budget), self.config.text_candidates
        )
        relevant = (test.labels[None, :] == classes[:, None]).sum(dim=1)  # R: test images of the caption's class
        out = {}
        for name, ids in (("clean", tokens), ("attacked", adversarial)):
            with torch.no_grad():
                ranking = (encode_tokens(model.clip, ids) @ images.T).argsort(dim=1, descending=True)
            hits = (test.labels[ranking] == classes[:, None]).float()
            within = torch.arange(len(test.labels), device=hits.device)[None, :] < relevant[:, None]
            precision = (hits * within).sum(dim=1) / relevant.clamp_min(1)
            out[name] = round(100.0 * precision.mean().item(), 2)
        return out

    # ---- checkpoints: the whole tuned model ------------------------------------------------------

    def tuned_state(self) -> dict[str, torch.Tensor]:
        """The fine-tuned weights of both towers."""
        if self.classifier is None:
            raise RuntimeError(f"{self.id}: call fit first")
        return {k: v.detach().cpu() for k, v in self.classifier.model.state_dict().items()}

    def restore(self, data: FitData, state: dict[str, torch.Tensor]) -> None:
        """Take both towers of an earlier :meth:`fit` and re-compute the class embeddings."""
        self.prompts = data.prompts
        self.original = data.base
        self.train_classes = training_classes(data.prompts, self.config.train_text)
        self.classifier = self._tuned_copy(data)
        self.classifier.model.load_state_dict(state)
        self.classifier.model.eval()
        for parameter in self.classifier.model.parameters():
            parameter.requires_grad_(False)
        self._refresh_text_weights()
