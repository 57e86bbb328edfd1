"""Learnable prompts for open_clip's ``CLIP``: text context vectors and (deep) visual prompt tokens.

:class:`PromptLearner` rebuilds ``CLIP.encode_text`` from the token embeddings so that some of the
prompt's word embeddings can be replaced by learnable *context vectors* (CoOp): the sequence
``<SOT> ctx_1 … ctx_M <class name> . <EOT>`` goes through the positional embedding, the (batch-first)
text transformer with its causal mask, ``ln_final``, the pooling at the EOT token (the argmax of the
token ids) and ``text_projection``. Initialised from a template's own words (``"a photo of the digit
{name}."`` → the embeddings of ``a photo of the digit``), it reproduces ``model.encode_text`` of the
filled-in template exactly (checked with ``allclose`` in the tests). Options:

* a context shared by all classes ``(M, dim)``, class-specific ``(C, M, dim)`` or one per input
  image ``(B, M, dim)`` (test-time tuning of a whole batch at once: every image has its own prompt,
  and a summed loss keeps their gradients independent);
* *deep* prompts (IVLP / MaPLe-style, as in TAPT): at the input of text layers ``1 … depth-1`` the
  context positions are overwritten by further learnable vectors.

:class:`VisualPromptEncoder` does the same for the image tower of a ``VisionTransformer``: learnable
tokens appended after the class and patch tokens (VPT), replaced at the input of every prompted layer
(deep VPT), with the input of each block recorded for TAPT's token-statistics alignment. Without
prompt tokens it reproduces ``model.encode_image``.

:class:`Prompts` holds TAPT's bimodal prompts (text, deep text and visual tensors), shared or per image.

Nothing here modifies the CLIP weights; gradients reach only the prompt tensors passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlmdefense.workbench.data import PromptSpec
from vlmdefense.workbench.models import LoadedClip


def _resblocks(transformer: nn.Module) -> list[nn.Module]:
    blocks = transformer.resblocks
    assert isinstance(blocks, nn.Sequential | nn.ModuleList), type(blocks)
    return list(blocks)


def _run_block(block: nn.Module, x: torch.Tensor, batch_first: bool, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """One residual attention block on batch-first ``x`` (transposed for sequence-first transformers)."""
    if batch_first:
        return block(x, attn_mask=attn_mask)
    return block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)


@dataclass(frozen=True)
class ContextInit:
    """How the context vectors start.

    Attributes:
        template: a template with ``{name}`` or ``{digit}``; its words before the class name become the
            context and are initialised from their own token embeddings (``random`` ignores it).
        n_ctx: the number of context vectors for a ``random`` start (CoOp's generic ``X X … X`` prompt).
        random: start from N(0, ``std``²) instead of the template's words.
        std: standard deviation of the random start (CoOp: 0.02).
        learn_first: learn only the first ``learn_first`` words of the template's prefix; the rest of
            the prefix stays fixed text (TAPT's code: 2 learnable tokens of "a photo of a").
    """

    template: str = "a photo of the digit {name}."
    n_ctx: int = 4
    random: bool = False
    std: float = 0.02
    learn_first: int | None = None


class PromptLearner(nn.Module):
    """Class text embeddings from learnable context vectors, through the frozen text tower of ``clip``.

    Args:
        clip: the model (open_clip ``CLIP``; its weights are used, never changed).
        prompts: the class names (and the numerals ``{digit}`` templates refer to).
        init: the template or random start of the context.

    Attributes:
        ctx_init: the initial context ``(n_ctx, width)`` (a buffer; copy it to start a learnable one).
        tokens: the token ids of the per-class prompts ``(classes, context_length)``.
    """

    ctx_init: torch.Tensor
    tokens: torch.Tensor
    token_prefix: torch.Tensor
    token_suffix: torch.Tensor

    def __init__(self, clip: LoadedClip, prompts: PromptSpec, init: ContextInit | None = None) -> None:
        super().__init__()
        init = init or ContextInit()
        model = clip.model
        if getattr(model, "text_pool_type", "argmax") != "argmax":
            raise ValueError("PromptLearner supports CLIP text towers that pool at the EOT (argmax) token")
        self.clip = clip
        self.init = init
        self.classnames = prompts.classnames
        if init.random:
            prefix_text = " ".join(["X"] * init.n_ctx)
            fill = [f"{prefix_text} {name}." for name in prompts.classnames]
        else:
            prefix_text, fill = self._split_template(init.template, prompts)
        prefix_tokens = clip.tokenizer([prefix_text])[0]
        n_ctx = int(prefix_tokens.argmax()) - 1  # between <SOT> and <EOT>
        if n_ctx < 1:
            raise ValueError(f"template {init.template!r} has no words before the class name")
        if init.learn_first is not None and not init.random:
            if not 1 <= init.learn_first <= n_ctx:
                raise ValueError(f"learn_first={init.learn_first}: the prefix of {init.template!r} has {n_ctx} tokens")
            n_ctx = init.learn_first
        tokens = clip.tokenizer(fill).to(clip.device)
        if not torch.equal(tokens[:, 1 : 1 + n_ctx], prefix_tokens[1 : 1 + n_ctx].to(tokens).expand(len(fill), -1)):
            raise ValueError(f"the context words of {init.template!r} do not tokenize alike in every prompt")
        if int(tokens.argmax(dim=-1).max()) >= tokens.shape[1] - 1:
            raise ValueError(f"the prompts of {init.template!r} fill the whole text context (truncated?)")
        self.n_ctx = n_ctx
        self.prefix_text = prefix_text
        self.prompt_texts = fill
        self.register_buffer("tokens", tokens, persistent=False)
        with torch.no_grad():
            embedding = model.token_embedding(tokens).detach()
        self.register_buffer("token_prefix", embedding[:, :1], persistent=False)  # <SOT>
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx :], persistent=False)  # class, '.', <EOT>, pad
        if init.random:
            generator = torch.Generator().manual_seed(0)
            ctx = torch.randn(n_ctx, embedding.shape[-1], generator=generator) * init.std
        else:
            ctx = embedding[0, 1 : 1 + n_ctx].clone()
        self.register_buffer("ctx_init", ctx.to(embedding), persistent=False)

    @staticmethod
    def _split_template(template: str, prompts: PromptSpec) -> tuple[str, list[str]]:
        for key in ("{name}", "{digit}"):
            if key in template:
                prefix = template.split(key)[0].strip()
                fill = [template.format(name=n, digit=i) for i, n in enumerate(prompts.classnames)]
                return prefix, fill
        raise ValueError(f"template {template!r} has no {{name}} or {{digit}} placeholder")

    @property
    def width(self) -> int:
        """Dimension of a context vector (the text transformer's width)."""
        return int(self.token_prefix.shape[-1])

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return int(self.tokens.shape[0])

    def template_text(self) -> list[str]:
        """The filled-in prompts this learner was built from."""
        return list(self.prompt_texts)

    def embeddings(self, ctx: torch.Tensor) -> torch.Tensor:
        """The prompt token embeddings: ``ctx`` (M, d) shared or (C, M, d) class-specific → (C, L, d);
        (B, C, M, d) → (B, C, L, d)."""
        c = self.n_classes
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(c, -1, -1)
        if ctx.dim() == 3:
            return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)
        b = ctx.shape[0]
        prefix = self.token_prefix.unsqueeze(0).expand(b, -1, -1, -1)
        suffix = self.token_suffix.unsqueeze(0).expand(b, -1, -1, -1)
        return torch.cat([prefix, ctx, suffix], dim=2)

    def forward(
        self,
        ctx: torch.Tensor | None = None,
        deep: torch.Tensor | None = None,
        normalize: bool = True,
        per_image: bool = False,
    ) -> torch.Tensor:
        """Class text embeddings.

        Args:
            ctx: the context, ``(M, d)`` shared, ``(C, M, d)`` class-specific, or with ``per_image``
                ``(B, M, d)`` — one context per image; default: the initial context.
            deep: deeper context vectors replacing the context positions at the input of text layers
                ``1 … k``: ``(k, M, d)`` or per image ``(B, k, M, d)``.
            normalize: return unit vectors.
            per_image: ``ctx`` (3-D) holds one context per image (not one per class).

        Returns:
            ``(C, D)``, or ``(B, C, D)`` per image.
        """
        model = self.clip.model
        ctx = self.ctx_init if ctx is None else ctx
        if ctx.dim() == 3 and not per_image:
            if ctx.shape[0] != self.n_classes:
                raise ValueError("a 3-D context is class-specific (C, M, d) unless per_image=True")
            x = self.embeddings(ctx)  # (C, L, d)
        elif ctx.dim() == 3:
            x = self.embeddings(ctx.unsqueeze(1).expand(-1, self.n_classes, -1, -1))
        else:
            x = self.embeddings(ctx)
        batched = x.dim() == 4
        b = x.shape[0] if batched else 1
        # The causal mask makes every position up to the EOT token independent of the padding after
        # it: the sequence is cut after the last EOT (same result, fewer tokens).
        length = int(self.tokens.argmax(dim=-1).max()) + 1
        c, _, width = x.shape[-3:]
        x = x[..., :length, :].reshape(b * c, length, width)
        cast = model.transformer.get_cast_dtype()
        x = x.to(cast) + model.positional_embedding[:length].to(cast)
        mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
        blocks = _resblocks(model.transformer)
        if deep is not None:
            k = deep.shape[-3]
            if k >= len(blocks):
                raise ValueError(f"{k} deep text prompts for {len(blocks)} layers: at most {len(blocks) - 1}")
        for i, block in enumerate(blocks):
            if deep is not None and 1 <= i <= deep.shape[-3]:
                layer_ctx = deep[..., i - 1, :, :]
                if layer_ctx.dim() == 2:
                    layer_ctx = layer_ctx.unsqueeze(0).expand(b * c, -1, -1)
                else:  # (B, M, d) per image → every class of that image
                    layer_ctx = layer_ctx.unsqueeze(1).expand(-1, c, -1, -1).reshape(b * c, self.n_ctx, width)
                x = torch.cat([x[:, :1], layer_ctx.to(x.dtype), x[:, 1 + self.n_ctx :]], dim=1)
            x = _run_block(block, x, model.transformer.batch_first, mask)
        x = model.ln_final(x)
        eot = self.tokens.argmax(dim=-1).repeat(b)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        projection = model.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
        x = x.reshape(b, c, -1) if batched else x
        return F.normalize(x, dim=-1) if normalize else x


@dataclass
class VisualOutput:
    """Image embeddings with the input tokens of every recorded block ``(N, T, width)``."""

    features: torch.Tensor
    block_inputs: list[torch.Tensor]


class VisualPromptEncoder(nn.Module):
    """The image tower of an open_clip ``VisionTransformer`` with (deep) learnable prompt tokens.

    Prompt tokens ``(n, width)`` are appended after the class and patch tokens (after the positional
    embedding, before ``ln_pre``, as in VPT / IVLP); at the input of blocks ``1 … k`` they are replaced
    by the next layer's prompts (deep prompts). Pooling takes the class token, as the tower does.
    """

    def __init__(self, clip: LoadedClip) -> None:
        super().__init__()
        visual = clip.model.visual
        for attribute, expected in (("attn_pool", None),):
            if getattr(visual, attribute, None) is not expected:
                raise ValueError("VisualPromptEncoder supports ViTs without attentional pooling")
        if getattr(visual, "pool_type", "tok") != "tok" or getattr(visual, "final_ln_after_pool", False):
            raise ValueError("VisualPromptEncoder supports class-token pooling with ln_post before pooling")
        self.clip = clip
        self.visual = visual

    @property
    def width(self) -> int:
        """Token width of the image transformer."""
        return int(self.visual.class_embedding.shape[-1])

    @property
    def layers(self) -> int:
        """Number of transformer blocks."""
        return len(_resblocks(self.visual.transformer))

    def forward(
        self,
        images: torch.Tensor,
        prompts: torch.Tensor | None = None,
        record: bool = False,
        normalize: bool = True,
        views_per_prompt: int = 1,
    ) -> VisualOutput:
        """Embed [0, 1] images.

        Args:
            images: ``(N, 3, H, W)`` in [0, 1] (normalised here).
            prompts: ``(depth, n, width)`` shared, or ``(P, depth, n, width)`` per image, where image
                ``i`` uses prompt ``i // views_per_prompt``; layer 0's tokens are appended to the input,
                layer ``j`` replaces them at the input of block ``j``. ``None``: the plain tower.
            record: keep the input of every block (for token statistics).
            normalize: return unit embeddings.
            views_per_prompt: consecutive images sharing one per-image prompt.
        """
        v = self.visual
        x = v.conv1(self.clip.normalize(images))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        n_prompt = 0
        layer_prompts: list[torch.Tensor] = []
        if prompts is not None:
            if prompts.dim() == 3:
                layer_prompts = [p.unsqueeze(0).expand(x.shape[0], -1, -1) for p in prompts]
            else:
                expanded = prompts.repeat_interleave(views_per_prompt, dim=0)
                if expanded.shape[0] != x.shape[0]:
                    raise ValueError(f"{prompts.shape[0]} prompts x {views_per_prompt} views != {x.shape[0]} images")
                layer_prompts = [expanded[:, j] for j in range(expanded.shape[1])]
            n_prompt = layer_prompts[0].shape[1]
            if len(layer_prompts) > self.layers:
                raise ValueError(f"{len(layer_prompts)} prompt layers for a {self.layers}-layer tower")
            x = torch.cat([x, layer_prompts[0].to(x.dtype)], dim=1)
        x = v.patch_dropout(x)
        x = v.ln_pre(x)
        recorded = []
        for j, block in enumerate(_resblocks(v.transformer)):
            if 1 <= j < len(layer_prompts):
                x = torch.cat([x[:, : x.shape[1] - n_prompt], layer_prompts[j].to(x.dtype)], dim=1)
            if record:
                recorded.append(x)
            x = _run_block(block, x, v.transformer.batch_first, None)
        x = v.ln_post(x)
        pooled = x[:, 0]
        if v.proj is not None:
            pooled = pooled @ v.proj
        return VisualOutput(F.normalize(pooled, dim=-1) if normalize else pooled, recorded)


@dataclass
class Prompts:
    """TAPT's bimodal prompts, shared ``(…)`` or per image ``(B, …)``."""

    text: torch.Tensor  # (n_t, d)
    text_deep: torch.Tensor | None  # (depth_text - 1, n_t, d)
    vision: torch.Tensor  # (depth_vision, n_v, w)

    def per_image(self, b: int) -> Prompts:
        """Copies for ``b`` images."""
        rep = lambda t: None if t is None else t.unsqueeze(0).repeat(b, *([1] * t.dim()))  # noqa: E731
        return Prompts(rep(self.text), rep(self.text_deep), rep(self.vision))  # type: ignore[arg-type]

    def tensors(self) -> list[torch.Tensor]:
        """The tensors (for optimisers)."""
        return [t for t in (self.text, self.text_deep, self.vision) if t is not None]

    def detach(self) -> Prompts:
        """Detached copies."""
        d = lambda t: None if t is None else t.detach().clone()  # noqa: E731
        return Prompts(d(self.text), d(self.text_deep), d(self.vision))  # type: ignore[arg-type]
