"""CBA-FAPT — few-shot adversarial prompt tuning with cross-modal bidirectional attribution alignment
(Feng et al., AAAI 2026). No code is released: this follows the paper's text, every choice it leaves
open is an assumption listed in the catalog entry and the notebook.

The prompts are FAP's coupled prompts on both frozen towers
(:class:`~vlmdefense.defenses.training_time.adversarial_prompts.CoupledPrompts`). Each batch is
perturbed by PGD (cross-entropy of the current prompted model, assumed), and the prompts minimise

``CE(clean) + α · CE(adv) + β · ‖M_v(clean) − M_v(adv)‖² + γ · KL(M_t(clean) ‖ M_t(adv))``

where ``M_v`` is the *bidirectional attribution* over image patches and ``M_t`` over text tokens, both
read in the last block of their tower:

* forward part — the cosine similarity between the pooled token's query (class token / EOT token)
  and every other token's key, per head;
* backward part — the gradient of the image-text matching score ``s_y = scale · cos(f, t_y)`` of the
  true class with respect to the pooled token's attention output, applied to every token's value
  features (``⟨∂s_y/∂o_pool, v_j⟩``, i.e. the gradient of ``s_y`` with respect to the attention weight
  on token ``j``);
* the map is their product averaged over heads, rectified and normalised to sum 1 (assumed).

The gradient is taken with ``create_graph=True``, so the alignment terms train the prompts through it.
The text map of an image is that of its true class's prompt: its forward part is the same for the
clean and the adversarial image, the backward part differs through the image features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmdefense.defenses.training_loop import AdversarialTask
from vlmdefense.defenses.training_time.adversarial_prompts import (
    CoupledPrompts,
    PromptTuningConfig,
    PromptTuningDefense,
)


@dataclass
class CBAFAPTConfig(PromptTuningConfig):
    """CBA-FAPT's hyperparameters (:class:`PromptTuningConfig` plus the paper's loss weights).

    Attributes:
        alpha: weight of the adversarial cross-entropy (paper 5.0).
        beta: weight of the visual attribution L2 alignment (paper 0.05).
        gamma: weight of the textual attribution KL alignment (paper 0.03).
    """

    alpha: float = 5.0
    beta: float = 0.05
    gamma: float = 0.03


@dataclass
class BlockParts:
    """The last block's output and the pooled token's attention pieces (heads first)."""

    output: torch.Tensor  # (N, T, width)
    pooled_out: torch.Tensor  # (N, H, d): attention output of the pooled token
    pooled_query: torch.Tensor  # (N, H, d)
    keys: torch.Tensor  # (N, H, T, d)
    values: torch.Tensor  # (N, H, T, d)


def run_block(block: Any, x: torch.Tensor, pooled: torch.Tensor, mask: torch.Tensor | None = None) -> BlockParts:
    """An open_clip residual attention block on batch-first ``x``, written out so that the attention
    output of token ``pooled[n]`` of every sequence can be differentiated (same output as ``block``)."""
    attn = block.attn
    assert isinstance(attn, nn.MultiheadAttention)
    n, t, width = x.shape
    heads = attn.num_heads
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (z.view(n, t, heads, width // heads).transpose(1, 2) for z in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
    if mask is not None:
        scores = scores + mask.to(scores.dtype)
    rows = torch.arange(n, device=x.device)
    probs = scores.softmax(dim=-1)
    out = probs @ v  # (N, H, T, d)
    pooled_out = out[rows, :, pooled]  # (N, H, d)
    # the pooled token's output is rebuilt from pooled_out, so gradients with respect to it are exact
    out = out.clone()
    out[rows, :, pooled] = pooled_out
    y = x + block.ls_1(attn.out_proj(out.transpose(1, 2).reshape(n, t, width)))
    y = y + block.ls_2(block.mlp(block.ln_2(y)))
    return BlockParts(y, pooled_out, q[rows, :, pooled], k, v)


def attribution_map(
    parts: BlockParts, grad: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Bidirectional attribution over the tokens ``tokens[n]`` (``(N, K)`` indices) of each sequence:
    ``relu(mean_h cos(q_pool, k_j) · ⟨grad_pool, v_j⟩)``, normalised to sum 1 (``grad``: ``(N, H, d)``;
    entries where ``valid`` is false count as zero attribution)."""
    rows = torch.arange(len(tokens), device=tokens.device).unsqueeze(1)
    keys = parts.keys.transpose(1, 2)[rows, tokens]  # (N, K, H, d)
    values = parts.values.transpose(1, 2)[rows, tokens]
    forward = F.cosine_similarity(parts.pooled_query.unsqueeze(1), keys, dim=-1)  # (N, K, H)
    backward = (grad.unsqueeze(1) * values).sum(-1)  # (N, K, H)
    raw = F.relu((forward * backward).mean(-1))
    if valid is not None:
        raw = raw * valid
    return (raw + 1e-8) / (raw + 1e-8).sum(-1, keepdim=True)


class Attributions:
    """Features, logits and both attribution maps of a batch under the current prompts."""

    def __init__(self, prompts: CoupledPrompts, classes: list[int]) -> None:
        self.prompts = prompts
        self.classes = classes
        text = prompts.text
        model = text.clip.model
        self.model = model
        blocks = list(model.transformer.resblocks)
        captured: list[torch.Tensor] = []
        hook = blocks[-1].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            self.weights = prompts.text_weights()
        finally:
            hook.remove()
        self.text_input = captured[-1] if model.transformer.batch_first else captured[-1].transpose(0, 1)
        self.text_block = blocks[-1]
        self.vision_block = list(prompts.vision.visual.transformer.resblocks)[-1]

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits over the training classes, visual map (N, patches), text map (N, tokens))``."""
        prompts, model = self.prompts, self.model
        visual = prompts.vision.visual
        block_input = prompts.encode(images, record=True).block_inputs[-1]
        zeros = torch.zeros(len(images), dtype=torch.long, device=images.device)
        vis = run_block(self.vision_block, block_input, zeros)
        features = F.normalize(visual.ln_post(vis.output)[:, 0] @ visual.proj, dim=-1)
        # the true class's prompt, one copy per image; the EOT token is pooled
        class_index = torch.as_tensor(self.classes, device=labels.device)[labels]
        eot = prompts.text.tokens.argmax(dim=-1)[class_index]
        length = self.text_input.shape[1]
        mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
        txt = run_block(self.text_block, self.text_input[class_index], eot, mask)
        rows = torch.arange(len(images), device=images.device)
        pooled_text = model.ln_final(txt.output)[rows, eot] @ model.text_projection
        score = prompts.scale * (features * F.normalize(pooled_text, dim=-1)).sum()
        grad_vis, grad_txt = torch.autograd.grad(score, [vis.pooled_out, txt.pooled_out], create_graph=True)
        n_patches = block_input.shape[1] - 1 - prompts.visual_prompts().shape[1]
        patches = torch.arange(1, 1 + n_patches, device=images.device).expand(len(images), -1)
        visual_map = attribution_map(vis, grad_vis, patches)
        words = torch.arange(1, int(eot.max()), device=images.device).expand(len(images), -1)
        text_map = attribution_map(txt, grad_txt, words, valid=words < eot.unsqueeze(1))  # between <SOT> and <EOT>
        logits = prompts.scale * features @ self.weights[self.classes].T
        return logits, visual_map, text_map


CBABatch = tuple[torch.Tensor, torch.Tensor]


class CBAFAPTTask(AdversarialTask[CBABatch]):
    """CBA-FAPT in the adversarial loop: PGD on the cross-entropy, then the four-term loss."""

    def __init__(self, prompts: CoupledPrompts, classes: list[int], config: CBAFAPTConfig) -> None:
        self.prompts = prompts
        self.classes = classes
        self.config = config

    def prepare(self, images: torch.Tensor, labels: torch.Tensor) -> CBABatch:
        return images, labels

    def attack_objective(self, state: CBABatch, x: torch.Tensor) -> torch.Tensor:
        _, labels = state
        with torch.no_grad():
            weights = self.prompts.text_weights()[self.classes]
        return F.cross_entropy(self.prompts(x, weights), labels, reduction="sum")

    def training_loss(self, state: CBABatch, x_adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        images, labels = state
        c = self.config
        attributions = Attributions(self.prompts, self.classes)
        clean_logits, clean_visual, clean_text = attributions(images, labels)
        adv_logits, adv_visual, adv_text = attributions(x_adv, labels)
        natural = F.cross_entropy(clean_logits, labels)
        adversarial = F.cross_entropy(adv_logits, labels)
        visual = (clean_visual - adv_visual).pow(2).sum(-1).mean()
        textual = (clean_text * (clean_text.log() - adv_text.log())).sum(-1).mean()
        n = len(labels)
        metrics = {
            "natural_ce": natural.item() * n,
            "adversarial_ce": adversarial.item() * n,
            "visual_l2": visual.item() * n,
            "textual_kl": textual.item() * n,
            "train_adv_acc": 100.0 * (adv_logits.argmax(-1) == labels).float().sum().item(),
        }
        return natural + c.alpha * adversarial + c.beta * visual + c.gamma * textual, metrics


class CBAFAPT(PromptTuningDefense):
    """Cross-modal bidirectional attribution guided few-shot adversarial prompt tuning (Feng et al., AAAI 2026)."""

    id = "cba-fapt"
    config_class = CBAFAPTConfig
    config: CBAFAPTConfig

    def make_task(self, prompts: CoupledPrompts, classes: list[int]) -> AdversarialTask[Any]:
        return CBAFAPTTask(prompts, classes, self.config)
