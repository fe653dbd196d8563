"""Prompts with learned vectors spliced in: ``[SOS] [v_1] ... [v_n] <class text> . [EOS]``.

A :class:`PromptTemplate` tokenizes ``"X X ... X <class text>."`` once, with ``n`` placeholder
words, and keeps the frozen token embeddings around the placeholders (the [SOS] prefix and the
class-name suffix) as buffers. :meth:`PromptTemplate.assemble` replaces the placeholders by
context vectors (CoOp's ``[v_1..v_n]``, CoCoOp's ``v + pi(x)``, SeeCLIP's ``[dom][sem_1..sem_K]``)
and :func:`encode_prompts` runs any number of assembled prompt groups through the frozen text
encoder in one batched call (the full path). Per-image context shared by all P prompts of an
image (CoCoOp's, SeeCLIP's) can instead go through
:func:`~seeclip.methods.shared_prefix.encode_shared_prefix`, which runs each image's
``[SOS][ctx]`` once and the class texts against its cached keys and values
(:meth:`PromptTemplate.split`; exact, and what ``prompt.shared_prefix`` switches).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from seeclip.methods.shared_prefix import Suffixes, encode_shared_prefix, supports_shared_prefix

__all__ = ["PLACEHOLDER", "PromptTemplate", "encode_prompts"]

PLACEHOLDER = "X"  # one BPE token in CLIP's vocabulary, as in CoOp


class PromptTemplate(nn.Module):
    """Frozen token embeddings of P prompts with ``n_ctx`` slots for learned vectors.

    The buffers are derived from the backbone and the texts, so they are not saved in state
    dicts (``persistent=False``): checkpoints hold only learnable parameters.

    Args:
        backbone: the frozen :class:`~seeclip.backbone.Backbone` (used here only to tokenize
            and embed; it is not stored).
        texts: the P class texts (e.g. class names) that follow the context vectors.
        n_ctx: number of context vectors n.
        placeholder: the word standing in for each context vector while tokenizing.

    Attributes:
        texts: the literal prompt strings, ``"X X X X <text>."``.
        prefix: [P, 1, w] embedding of [SOS].
        suffix: [P, L - 1 - n, w] embeddings of ``<text> . [EOS]`` (and padding), cut at the
            longest prompt's end token: nothing after it can reach an end token under the
            causal mask, so the cut is exact.
        eot_index: [P] position of each prompt's end token.
    """

    prefix: Tensor
    suffix: Tensor
    eot_index: Tensor

    def __init__(
        self, backbone, texts: Sequence[str], n_ctx: int, *, placeholder: str = PLACEHOLDER
    ) -> None:
        super().__init__()
        if isinstance(texts, str) or len(texts) == 0:
            raise ValueError("texts must be a non-empty sequence of strings")
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
        self.n_ctx = n_ctx
        self.texts = tuple(f"{' '.join([placeholder] * n_ctx)} {t}." for t in texts)
        ids = backbone.tokenize(self.texts)
        slot = backbone.tokenize([placeholder])[0, 1]
        if not bool((ids[:, 1 : 1 + n_ctx] == slot).all()):
            raise ValueError(
                f"placeholder {placeholder!r} does not tokenize to one token per context vector "
                "right after [SOS] with this tokenizer"
            )
        eot = backbone.eot_index(ids)
        if int(eot.max()) >= ids.shape[1] - 1:
            raise ValueError(
                f"a prompt fills the whole context ({ids.shape[1]} tokens) and may be truncated; "
                "use fewer context vectors or shorter class texts"
            )
        length = int(eot.max()) + 1
        with torch.no_grad():
            embeds = backbone.embed_tokens(ids[:, :length]).detach()
        self.register_buffer("prefix", embeds[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", embeds[:, 1 + n_ctx :].clone(), persistent=False)
        self.register_buffer("eot_index", eot.to(embeds.device), persistent=False)

    @property
    def num_prompts(self) -> int:
        return self.prefix.shape[0]

    @property
    def length(self) -> int:
        """Token positions of an assembled prompt (up to the longest end token)."""
        return 1 + self.n_ctx + self.suffix.shape[1]

    def assemble(self, ctx: Tensor, *, per_image: bool = False) -> Tensor:
        """Prompt embeddings with ``ctx`` at the placeholder positions.

        Args:
            ctx: context vectors. Shared (``per_image=False``): [n, w] for every prompt or
                [P, n, w] one set per prompt. Per image (``per_image=True``): [B, n, w] the same
                for all P prompts of an image, or [B, P, n, w].
            per_image: whether the leading dimension of ``ctx`` indexes images.

        Returns:
            [P, L, w] when shared, [B, P, L, w] per image.
        """
        n, w = self.n_ctx, self.prefix.shape[-1]
        if ctx.shape[-2:] != (n, w):
            raise ValueError(f"context vectors must end in ({n}, {w}), got {tuple(ctx.shape)}")
        p = self.num_prompts
        if per_image:
            if ctx.dim() not in (3, 4) or (ctx.dim() == 4 and ctx.shape[1] != p):
                raise ValueError(f"per-image context must be [B, {n}, {w}] or [B, {p}, {n}, {w}]")
            lead = (ctx.shape[0], p)
            if ctx.dim() == 3:
                ctx = ctx.unsqueeze(1)
        else:
            if ctx.dim() not in (2, 3) or (ctx.dim() == 3 and ctx.shape[0] != p):
                raise ValueError(f"shared context must be [{n}, {w}] or [{p}, {n}, {w}]")
            lead = (p,)
        ctx = ctx.to(self.prefix.dtype).expand(*lead, n, w)
        return torch.cat(
            [self.prefix.expand(*lead, 1, w), ctx, self.suffix.expand(*lead, -1, w)], dim=-2
        )

    def split(self, ctx: Tensor) -> tuple[Tensor, Suffixes]:
        """The prompts of ``assemble(ctx, per_image=True)`` for per-image ``ctx`` [B, n, w],
        split at the end of the context for :func:`encode_shared_prefix`: each image's prefix
        ``[SOS][ctx]`` [B, 1 + n, w] and the class texts that follow it in every image."""
        n, w = self.n_ctx, self.prefix.shape[-1]
        if ctx.dim() != 3 or ctx.shape[-2:] != (n, w):
            raise ValueError(f"per-image context must be [B, {n}, {w}], got {tuple(ctx.shape)}")
        sos = self.prefix[0].expand(ctx.shape[0], 1, w)  # the same [SOS] in every prompt
        prefix = torch.cat([sos, ctx.to(self.prefix.dtype)], dim=1)
        return prefix, Suffixes(self.suffix, self.eot_index, 1 + n)

    def encode(
        self,
        backbone,
        ctx: Tensor,
        *,
        per_image: bool = False,
        shared_prefix: bool = False,
        autocast=None,
    ) -> Tensor:
        """Text features (not normalised): [P, d] shared, [B, P, d] per image.

        With ``shared_prefix``, per-image context [B, n, w] (the same for an image's P prompts)
        goes through :func:`encode_shared_prefix` where the backbone supports it: the same
        features up to rounding, each image's ``[SOS][ctx]`` computed once instead of P times.
        """
        if shared_prefix and per_image and ctx.dim() == 3 and supports_shared_prefix(backbone):
            prefix, suffixes = self.split(ctx)
            return encode_shared_prefix(backbone, prefix, [suffixes], autocast=autocast)
        return encode_prompts(
            backbone, [self.assemble(ctx, per_image=per_image)], [self.eot_index], autocast=autocast
        )


def encode_prompts(
    backbone,
    embeds: Sequence[Tensor],
    eot_index: Sequence[Tensor],
    *,
    autocast: torch.dtype | None = None,
) -> Tensor:
    """Encodes several groups of assembled prompts in ONE call to the frozen text encoder.

    Args:
        backbone: the frozen backbone.
        embeds: groups of prompt embeddings [*lead, P_i, L_i, w] with the same ``lead`` dims
            (none for shared prompts, [B] for per-image prompts); lengths L_i may differ.
        eot_index: [P_i] end-token position of each group's prompts.
        autocast: run the text tower under ``torch.autocast`` in this dtype (e.g. bfloat16);
            the features come back as float32 (float64 for float64 prompts, as in tests).

    Returns:
        Text features [*lead, sum_i P_i, d] in group order (not normalised).
    """
    lead = embeds[0].shape[:-3]
    if any(e.shape[:-3] != lead for e in embeds):
        raise ValueError("all prompt groups need the same leading (image) dimensions")
    length = max(e.shape[-2] for e in embeds)
    # Positions after an end token never reach it under the causal mask: pad with zeros.
    padded = [nn.functional.pad(e, (0, 0, 0, length - e.shape[-2])) for e in embeds]
    x = torch.cat(padded, dim=-3)
    eot = torch.cat([i.to(x.device) for i in eot_index]).expand(*lead, -1)
    with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=bool(autocast)):
        feats = backbone.encode_text_embeddings(
            x.reshape(-1, length, x.shape[-1]), eot.reshape(-1), truncate=True
        )
    out = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 prompts
    return feats.to(out).reshape(*lead, x.shape[-3], feats.shape[-1])
