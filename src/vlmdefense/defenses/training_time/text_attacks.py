"""Discrete attacks on captions, and the zero-shot accuracy of a model whose class prompts are attacked.

Two attacks, each the inner maximisation of a training-time defense that hardens the text tower, and the
attack the LEAF paper evaluates zero-shot text classification with:

* :func:`character_attack` — LEAF's batch-parallel character attack within Levenshtein distance ``k``:
  per edit, ``rho`` random slots are scored by putting a space there (a slot is either a gap between
  characters, where the edit inserts, or a character, which it replaces, or deletes when it already is
  a space), then ``rho`` random characters (or a deletion) at the best slot; the candidate farthest
  (squared L2) from the anchor embedding wins. ``dictionary`` enables LEAF's constraint: a candidate is
  kept only when it holds fewer distinct dictionary words than the sentence it edits, so an edit may
  break a word but never make a new one (the paper's English word list; here the caption vocabulary).
* :func:`word_substitution_attack` — MMCoA's BERT-Attack: words ranked by how far masking each one moves
  the text embedding (KL divergence between the softmax of the unit embeddings, as the official code),
  then the most important unprotected non-stop-word is replaced by the substitute that moves the
  embedding most, until ``n_words`` words changed. BERT's masked-LM proposals are replaced by a fixed pool
  of caption words (no language model at this scale).
* :func:`charmer_classification_attack` — Charmer as LEAF's evaluation runs it: every slot scored, the best
  ``rho`` slots tried with every character, maximising the classification margin of the sentence against
  class embeddings (the paper's zero-shot text classification with image-encoded labels).

Sentences are plain strings; an :data:`Encoder` maps a list of them to embeddings without gradients.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from vlmdefense.workbench.clip import LoadedClip
from vlmdefense.workbench.data import PromptSpec, seen_mask

Encoder = Callable[[list[str]], torch.Tensor]
"""Sentences → unnormalised text embeddings (no gradients)."""

CHARACTERS: tuple[str | None, ...] = (
    None,
    *(string.ascii_lowercase + " " + string.ascii_uppercase + string.digits + string.punctuation),
)
"""LEAF's character vocabulary; ``None`` deletes."""

STOP_WORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "this",
        "that",
        "these",
        "those",
        "is",
        "are",
        "was",
        "be",
        "of",
        "by",
        "for",
        "from",
        "in",
        "on",
        "at",
        "to",
        "with",
        "and",
        "or",
        "as",
        "it",
        "its",
        "some",
        "any",
        "no",
        "not",
    ]
)
"""Words the substitution attack never replaces (BERT-Attack keeps function words)."""

MASK = "[UNK]"


def words_of(sentence: str) -> set[str]:
    """The distinct lower-case words (runs of letters or digits) of a sentence."""
    return set(re.findall(r"[a-z0-9]+", sentence.lower()))


def caption_vocabulary(prompts: PromptSpec) -> frozenset[str]:
    """Every word of every prompt of every class: the dictionary of LEAF's constraint at this scale."""
    return frozenset(w for c in range(len(prompts.classnames)) for p in prompts.prompts(c) for w in words_of(p))


def protected_words(prompts: PromptSpec) -> frozenset[str]:
    """Class names and numerals: substituting them would change the caption's label."""
    return frozenset(w for c, name in enumerate(prompts.classnames) for w in (*words_of(name), str(c)))


def substitute_pool(prompts: PromptSpec) -> list[str]:
    """The templates' own content words (no class names, numerals or stop words), sorted."""
    vocabulary = {w for t in prompts.templates for w in words_of(re.sub(r"\{[a-z]+\}", " ", t))}
    return sorted(vocabulary - STOP_WORDS - protected_words(prompts))


def text_encoder(clip: LoadedClip, chunk: int = 1024) -> Encoder:
    """``clip``'s text tower as an :data:`Encoder` (unnormalised embeddings, in chunks)."""

    def encode(sentences: list[str]) -> torch.Tensor:
        with torch.no_grad():
            parts = [
                clip.model.encode_text(clip.tokenizer(sentences[i : i + chunk]).to(clip.device))
                for i in range(0, len(sentences), chunk)
            ]
        return torch.cat(parts)

    return encode


# ---- LEAF's character attack -----------------------------------------------------------------------


def edit(sentence: str, slot: int, char: str | None) -> str:
    """One character edit at ``slot`` (0 … 2·len): even slots insert before character slot/2 (the last
    appends), odd slots replace character slot//2; ``None`` deletes (a no-op on a gap), and writing a
    character over itself deletes it (LEAF's convention)."""
    index = slot // 2
    if slot % 2 == 0:
        return sentence if char is None else sentence[:index] + char + sentence[index:]
    if char is None or sentence[index] == char:
        return sentence[:index] + sentence[index + 1 :]
    return sentence[:index] + char + sentence[index + 1 :]


def _valid(original: str, candidate: str, dictionary: frozenset[str] | None) -> bool:
    if dictionary is None:
        return True
    return len(words_of(candidate) & dictionary) < len(words_of(original) & dictionary)


def _farthest(encode: Encoder, candidates: list[list[str]], anchors: torch.Tensor) -> tuple[list[int], list[float]]:
    """Per sentence, the index of the candidate whose embedding is farthest (squared L2) from its anchor."""
    flat = [c for row in candidates for c in row]
    embeddings = encode(flat)
    out, scores, start = [], [], 0
    for i, row in enumerate(candidates):
        distance = (embeddings[start : start + len(row)] - anchors[i]).pow(2).sum(-1)
        out.append(int(distance.argmax()))
        scores.append(float(distance.max()))
        start += len(row)
    return out, scores


def character_attack(
    encode: Encoder,
    sentences: Sequence[str],
    anchors: torch.Tensor,
    rho: int,
    k: int,
    rng: random.Random,
    dictionary: frozenset[str] | None = None,
) -> list[str]:
    """LEAF's attack: ``k`` rounds of (best of ``rho`` slots, then best of ``rho`` characters there),
    maximising the squared L2 distance to ``anchors`` (one row per sentence)."""
    current = list(sentences)
    for _ in range(k):
        slots = [rng.sample(range(2 * len(s) + 1), min(rho, 2 * len(s) + 1)) for s in current]
        spaced = [
            [c if _valid(s, c := edit(s, z, " "), dictionary) else s for z in row]
            for s, row in zip(current, slots, strict=True)
        ]
        best, _ = _farthest(encode, spaced, anchors)
        chars = [
            rng.sample(CHARACTERS, rho) if rho <= len(CHARACTERS) else rng.choices(CHARACTERS, k=rho) for _ in current
        ]
        edited = [
            [c if _valid(s, c := edit(s, row[b], ch), dictionary) else s for ch in options]
            for s, row, b, options in zip(current, slots, best, chars, strict=True)
        ]
        pick, _ = _farthest(encode, edited, anchors)
        current = [row[p] for row, p in zip(edited, pick, strict=True)]
    return current


# ---- the LEAF paper's evaluation attack: Charmer against a zero-shot text classifier --------------------


def text_margins(encode: Encoder, sentences: list[str], labels: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Margin of each sentence against unit class embeddings ``prototypes`` (highest other-class cosine minus
    the true class's; positive: misclassified), as the code's ``margin_loss_lm``."""
    sims = F.normalize(encode(sentences), dim=-1) @ prototypes.T
    rows = labels.view(-1, 1).to(sims.device)
    return sims.scatter(1, rows, float("-inf")).amax(1) - sims.gather(1, rows).squeeze(1)


def _unique_margins(encode: Encoder, texts: list[str], labels: list[int], prototypes: torch.Tensor) -> list[float]:
    """:func:`text_margins` with every distinct (sentence, label) pair encoded once."""
    keys = list(dict.fromkeys(zip(texts, labels, strict=True)))
    index = {key: i for i, key in enumerate(keys)}
    values = text_margins(encode, [t for t, _ in keys], torch.tensor([y for _, y in keys]), prototypes).tolist()
    return [values[index[key]] for key in zip(texts, labels, strict=True)]


def charmer_classification_attack(
    encode: Encoder,
    sentences: Sequence[str],
    labels: Sequence[int],
    prototypes: torch.Tensor,
    rho: int,
    k: int,
    dictionary: frozenset[str] | None = None,
) -> list[list[str]]:
    """Charmer, the LEAF paper's attack on zero-shot text classification (the code's
    ``attack_text_charmer_classification``), batched over sentences: per edit, *every* slot is scored by
    putting a space there, the ``rho`` slots of highest margin get every character of :data:`CHARACTERS`,
    and the candidate of highest margin wins; a sentence stops once misclassified. ``dictionary`` adds LEAF's
    constraint. Deterministic. Returns the sentences after each of the ``k`` edits (round r: distance ≤ r)."""
    current, ys = list(sentences), [int(y) for y in labels]
    open_rows, rounds = list(range(len(current))), []
    for _ in range(k):
        if not open_rows:
            rounds.append(list(current))
            continue
        spaced: list[tuple[int, int, str]] = []
        for r in open_rows:
            s = current[r]
            spaced += [(r, z, c if _valid(s, c := edit(s, z, " "), dictionary) else s) for z in range(2 * len(s) + 1)]
        scores = _unique_margins(encode, [c for _, _, c in spaced], [ys[r] for r, _, _ in spaced], prototypes)
        slots: dict[int, list[tuple[float, int]]] = {r: [] for r in open_rows}
        for (r, z, _), score in zip(spaced, scores, strict=True):
            slots[r].append((score, z))
        trials: list[tuple[int, str]] = []
        for r in open_rows:
            s = current[r]
            for _, z in sorted(slots[r], key=lambda t: -t[0])[:rho]:
                trials += [(r, c if _valid(s, c := edit(s, z, ch), dictionary) else s) for ch in CHARACTERS]
        scores = _unique_margins(encode, [c for _, c in trials], [ys[r] for r, _ in trials], prototypes)
        best: dict[int, tuple[float, str]] = {}
        for (r, c), score in zip(trials, scores, strict=True):
            if r not in best or score > best[r][0]:
                best[r] = (score, c)
        for r, (_, c) in best.items():
            current[r] = c
        open_rows = [r for r in open_rows if best[r][0] <= 0]
        rounds.append(list(current))
    return rounds


# ---- MMCoA's word-substitution attack ----------------------------------------------------------------


def _kl_from(origin: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """KL(softmax(origin) ‖ softmax(candidate)) over the dimensions of unit embeddings (the code's score)."""
    target = F.normalize(origin, dim=-1).softmax(-1)
    log_q = F.normalize(candidates, dim=-1).log_softmax(-1)
    return (target * (target.log() - log_q)).sum(-1)


def _replace_core(word: str, new: str) -> str:
    """``word`` with its letters/digits replaced by ``new``, surrounding punctuation kept."""
    match = re.search(r"[A-Za-z0-9]+", word)
    return new if match is None else word[: match.start()] + new + word[match.end() :]


def _candidates(words: list[str], protected: frozenset[str]) -> list[int]:
    """Indices of the words the substitution attack may replace."""
    return [
        i for i, w in enumerate(words) if words_of(w) and not words_of(w) <= STOP_WORDS and not words_of(w) & protected
    ]


def word_substitution_attack(
    encode: Encoder,
    sentences: Sequence[str],
    substitutes: Sequence[str],
    protected: frozenset[str] = frozenset(),
    n_words: int = 1,
) -> list[str]:
    """Replace up to ``n_words`` words per sentence, most important first, by the substitute that moves
    the embedding most (KL score; keeping the word is an option, as in the code); protected words and
    stop words are never replaced. Batched: one encoding per round over every sentence still open."""
    words = [s.split(" ") for s in sentences]
    origins = encode(list(sentences))
    masked = [" ".join([*w[:i], MASK, *w[i + 1 :]]) for w in words for i in range(len(w))]
    importance = _kl_from(
        origins.repeat_interleave(torch.tensor([len(w) for w in words], device=origins.device), dim=0), encode(masked)
    )
    queues, start = [], 0
    for w in words:
        order = importance[start : start + len(w)].argsort(descending=True).tolist()
        allowed = set(_candidates(w, protected))
        queues.append([i for i in order if i in allowed])
        start += len(w)
    final = [list(w) for w in words]
    changed = [0] * len(words)
    while True:
        open_rows = [r for r in range(len(words)) if queues[r] and changed[r] < n_words]
        if not open_rows:
            break
        trials: list[tuple[int, int, list[str]]] = []
        for r in open_rows:
            i = queues[r].pop(0)
            core = "".join(re.findall(r"[a-z0-9]+", words[r][i].lower()))
            options = [words[r][i]] + [_replace_core(words[r][i], s) for s in substitutes if s != core]
            trials.append((r, i, options))
        texts = [" ".join([*final[r][:i], o, *final[r][i + 1 :]]) for r, i, options in trials for o in options]
        rows = torch.tensor([r for r, _, options in trials for _ in options], device=origins.device)
        scores = _kl_from(origins[rows], encode(texts))
        start = 0
        for r, i, options in trials:
            choice = int(scores[start : start + len(options)].argmax())
            final[r][i] = options[choice]
            changed[r] += int(choice != 0)
            start += len(options)
    return [" ".join(w) for w in final]


# ---- zero-shot accuracy under attacked class prompts ------------------------------------------------


def attacked_prompt_accuracy(
    clip: LoadedClip,
    prompts: PromptSpec,
    images: torch.Tensor,
    labels: torch.Tensor,
    attack: Callable[[Encoder, list[str]], list[str]],
) -> dict[str, Any]:
    """Zero-shot accuracy (%) of ``clip`` on clean ``images`` when every class prompt is replaced by its
    attacked version (``attack(encoder, prompts)``, white-box on ``clip``'s text tower), beside the clean
    prompts' accuracy, and the mean cosine between each clean and attacked prompt embedding."""
    encode = text_encoder(clip)
    sentences = [p for c in range(len(prompts.classnames)) for p in prompts.prompts(c)]
    attacked = attack(encode, sentences)
    per_class = len(prompts.templates)
    with torch.no_grad():
        image_embeddings = clip.encode_images(images)
        scale = float(clip.model.logit_scale.exp().item())
    mask = seen_mask(labels.cpu(), prompts.seen_classes).to(labels.device)

    def accuracies(texts: list[str]) -> dict[str, float]:
        units = F.normalize(encode(texts), dim=-1).view(len(prompts.classnames), per_class, -1)
        weights = F.normalize(units.mean(1), dim=-1)
        correct = ((scale * image_embeddings @ weights.T).argmax(-1) == labels).float()
        return {
            "all": round(100 * correct.mean().item(), 2),
            "seen": round(100 * correct[mask].mean().item(), 2),
            "unseen": round(100 * correct[~mask].mean().item(), 2),
        }

    cosine = F.cosine_similarity(encode(sentences), encode(attacked), dim=-1)
    return {
        "clean_prompts": accuracies(sentences),
        "attacked_prompts": accuracies(attacked),
        "prompt_cosine_clean_vs_attacked": round(cosine.mean().item(), 4),
        "changed_prompts": sum(a != s for a, s in zip(attacked, sentences, strict=True)),
        "examples": [[s, a] for s, a in list(zip(sentences, attacked, strict=True))[:: per_class + 1][:4]],
    }


def _fixed(sentences: list[str]) -> Callable[[Encoder, list[str]], list[str]]:
    """An "attack" that returns sentences attacked beforehand."""

    def attack(_encode: Encoder, _sentences: list[str]) -> list[str]:
        return sentences

    return attack


def attacked_text_classification(
    clip: LoadedClip,
    prompts: PromptSpec,
    images: torch.Tensor,
    labels: torch.Tensor,
    rho: int,
    k: int,
    dictionary: frozenset[str] | None = None,
) -> dict[str, Any]:
    """The LEAF paper's zero-shot text classification at this scale: every class prompt (all classes ×
    templates) is classified by the nearest class prototype, the unit mean of ``clip``'s embeddings of the
    ``images`` of that class (the paper encodes each label by one image), clean and under Charmer with
    1 … ``k`` edits (white-box on ``clip``'s text tower). Per k: text accuracy (%, all / seen / unseen
    classes), and the zero-shot *image* accuracy when the attacked prompts serve as the class prompts."""
    encode = text_encoder(clip)
    n = len(prompts.classnames)
    sentences = [p for c in range(n) for p in prompts.prompts(c)]
    ys = torch.tensor([c for c in range(n) for _ in prompts.templates])
    with torch.no_grad():
        embeddings = clip.encode_images(images)
    present = [int((labels == c).sum()) for c in range(n)]
    if min(present) == 0:
        raise ValueError(f"every class needs an image for its prototype; counts per class: {present}")
    prototypes = F.normalize(torch.stack([embeddings[labels == c].mean(0) for c in range(n)]), dim=-1)
    mask = seen_mask(ys, prompts.seen_classes)

    def accuracy(texts: list[str]) -> dict[str, float]:
        correct = (text_margins(encode, texts, ys, prototypes).cpu() < 0).float()
        return {
            "all": round(100 * correct.mean().item(), 2),
            "seen": round(100 * correct[mask].mean().item(), 2),
            "unseen": round(100 * correct[~mask].mean().item(), 2),
        }

    clean = accuracy(sentences)
    out: dict[str, Any] = {}
    rounds = charmer_classification_attack(encode, sentences, ys.tolist(), prototypes, rho, k, dictionary)
    for r, attacked in enumerate(rounds, 1):
        image_side = attacked_prompt_accuracy(clip, prompts, images, labels, _fixed(attacked))
        out[f"k={r}"] = {
            "clean": clean,
            "attacked": accuracy(attacked),
            "changed_prompts": image_side["changed_prompts"],
            "examples": image_side["examples"],
            "image_accuracy_clean_prompts": image_side["clean_prompts"],
            "image_accuracy_attacked_prompts": image_side["attacked_prompts"],
        }
    return out
