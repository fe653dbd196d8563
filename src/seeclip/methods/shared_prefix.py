"""Shared-prefix text encoding: each image's prompt prefix runs once, its classes reuse it.

SeeCLIP builds, for every image and known class c, the prompt
``[SOS][dom][sem_1..sem_K] <class c> . [EOS]``: the first 2 + K positions (the *prefix*) depend
on the image, not on the class. CoCoOp's ``[SOS][ctx(x)] <class c> . [EOS]`` is the same shape.
The full path (:func:`seeclip.methods.prompts.encode_prompts`) runs all B x C prompts through
the text transformer, so every image's prefix is computed C times.

The text transformer is causal: position i attends to positions <= i only. So the prefix
positions' hidden states, and the keys and values that later positions read from them at every
block, do not depend on the class tokens after them. :func:`encode_shared_prefix` therefore:

1. **Prefix pass.** Runs each image's prefix [B, Lp, w] through the blocks once and keeps, per
   block, the keys and values of the prefix positions: the *cache*, one (k, v) pair of
   [B, 1, heads, Lp, head_width] per block.
2. **Suffix pass.** Runs the suffixes (``<class c> . [EOS]``: token embeddings that every image
   shares) through the same blocks. At block l a suffix position attends to block l's cached
   prefix keys and values, then to the suffix positions up to its own: exactly the causal mask
   of the whole prompt, with the positional embeddings of the whole prompt. Suffixes are
   bucketed by length and cut at their end token, so no padding position is computed; a bucket
   is one batched call per block.
3. **Readout.** As the full path: the end token's state (a bucket's last position) ->
   ``ln_final`` -> text projection.

Both passes go through one function, :func:`_block`, written from open_clip's
``ResidualAttentionBlock`` (ln_1, the packed in-projection of ``nn.MultiheadAttention``,
scaled dot-product attention, out-projection, layer scales ls_1/ls_2, ln_2, MLP); the last block
computes queries only where they are read (none for the prefix, the end token for suffixes), as
the full path's end-token-only last block does. The result equals the full path up to
floating-point summation order (within 1e-12 in float64, tests/test_shared_prefix.py), and
gradients flow through the cache into the prefix's learned tokens.

:func:`supports_shared_prefix` says whether a text tower has that block structure; models fall
back to the full path where it does not (and with ``prompt.shared_prefix=false``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import Tensor, nn

__all__ = ["Suffixes", "encode_shared_prefix", "supports_shared_prefix"]

KV = tuple[Tensor, Tensor]  # keys, values: [G, M, heads, positions, head_width]


@dataclass(frozen=True)
class Suffixes:
    """P prompts that continue every image's prefix with the same tokens.

    Attributes:
        embeds: [P, S, w] token embeddings after the prefix (padded at the end: only the
            positions up to each prompt's end token are used).
        eot_index: [P] each prompt's end-token position in the whole prompt (prefix included).
        prefix_len: how many leading prefix positions these prompts continue. SeeCLIP's
            unknown prompt ``[SOS][dom][v_1..v_m] unknown .`` continues the first 2 positions
            of the known prompts' prefix ``[SOS][dom][sem_1..sem_K]``; a cached position does
            not depend on the positions after it, so the shorter prefix is a slice of the cache.
    """

    embeds: Tensor
    eot_index: Tensor
    prefix_len: int


def supports_shared_prefix(backbone) -> bool:
    """Whether ``backbone``'s text tower is open_clip's batch-first stack of plain
    ``ResidualAttentionBlock`` s (self-attention with a packed in-projection), which
    :func:`_block` reproduces; gradient checkpointing also sends models to the full path."""
    transformer = backbone.text_tower.transformer
    blocks = getattr(transformer, "resblocks", None)
    return (
        blocks is not None
        and len(blocks) > 0
        and getattr(transformer, "batch_first", False)
        and not getattr(transformer, "grad_checkpointing", False)
        and all(
            type(b) is ResidualAttentionBlock
            and not hasattr(b, "ln_1_kv")
            and isinstance(b.attn, nn.MultiheadAttention)
            and b.attn.batch_first
            and b.attn._qkv_same_embed_dim
            and b.attn.in_proj_weight is not None
            and b.attn.bias_k is None
            for b in blocks
        )
    )


def encode_shared_prefix(
    backbone,
    prefix: Tensor,
    groups: Sequence[Suffixes],
    *,
    autocast: torch.dtype | None = None,
) -> Tensor:
    """Text features of every image's prompts ``prefix[b] + suffix`` (module docstring).

    Args:
        backbone: the frozen backbone (:func:`supports_shared_prefix` must hold).
        prefix: [B, Lp, w] each image's prefix token embeddings (``[SOS]`` first).
        groups: suffix groups; each continues the first ``prefix_len`` prefix positions.
        autocast: run the text tower under ``torch.autocast`` in this dtype (e.g. bfloat16);
            the features come back as float32 (float64 for a float64 prefix).

    Returns:
        [B, sum_i P_i, d] text features (not normalised), groups in order: what
        :func:`~seeclip.methods.prompts.encode_prompts` returns for the assembled prompts.
    """
    text = backbone.text_tower
    blocks = text.transformer.resblocks
    cast = text.transformer.get_cast_dtype()
    pos = text.positional_embedding
    b, lp, _ = prefix.shape
    for g in groups:
        if not 1 <= g.prefix_len <= lp:
            raise ValueError(f"a suffix group continues {g.prefix_len} of {lp} prefix positions")
        ends = g.eot_index.tolist()
        if min(ends) < g.prefix_len or max(ends) >= pos.shape[0]:
            raise ValueError(
                f"end tokens must lie after the prefix and inside the context ({pos.shape[0]}), "
                f"got {min(ends)}..{max(ends)}"
            )
        if g.embeds.shape[-2] < max(ends) + 1 - g.prefix_len:
            raise ValueError("suffix embeddings end before their end token")
    last = len(blocks) - 1
    with torch.autocast(
        prefix.device.type, dtype=autocast or torch.float32, enabled=bool(autocast)
    ):
        # 1. prefix pass: the cache of keys and values, one pair per block
        x = (prefix.to(cast) + pos[:lp].to(cast)).unsqueeze(1)  # [B, 1, Lp, w]
        cache: list[KV] = []
        for i, block in enumerate(blocks):
            x, kv = _block(block, x, None, queries="none" if i == last else "all")
            cache.append(kv)

        # 2. suffix pass, one bucket of equal end positions at a time
        feats, order, offset = [], [], 0
        for g in groups:
            n = g.prefix_len
            ends = g.eot_index.tolist()
            for end in sorted(set(ends)):
                rows = [p for p, e in enumerate(ends) if e == end]
                idx = torch.tensor(rows, device=g.embeds.device)
                # [1, P_end, S, w]: shared by the images; broadcasting makes it [B, ...] at the
                # first attention, so block 0's ln_1 and keys/values run once per suffix
                y = g.embeds[idx, : end + 1 - n].to(cast) + pos[n : end + 1].to(cast)
                y = y.unsqueeze(0)
                for i, (block, (k, v)) in enumerate(zip(blocks, cache, strict=True)):
                    past = (k[..., :n, :], v[..., :n, :])
                    y, _ = _block(block, y, past, queries="last" if i == last else "all")
                feats.append(y[:, :, -1])  # the end token: [B, P_end, w]
                order.extend(offset + p for p in rows)
            offset += len(ends)

        # 3. readout at the end tokens, back in group order
        x = torch.cat([f.expand(b, -1, -1) for f in feats], dim=1)  # prompts in bucket order
        x = text.ln_final(x[:, torch.tensor(order, device=x.device).argsort()])
        proj = text.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x.to(torch.promote_types(prefix.dtype, torch.float32))


def _block(
    block: ResidualAttentionBlock, x: Tensor, past: KV | None, *, queries: str
) -> tuple[Tensor | None, KV]:
    """One open_clip ``ResidualAttentionBlock`` on new positions that follow cached ones.

    Args:
        block: the block (ln_1, attn, ls_1, ln_2, mlp, ls_2).
        x: [G, M, S, w] hidden states of S new positions (for the suffix pass: G images or 1,
            M prompts per image; for the prefix pass: B images, M = 1).
        past: keys and values [G', 1, heads, Lp, hw] of the Lp positions before them, from this
            block's prefix pass (broadcast over the M prompts), or None when x starts the
            sequence.
        queries: which new positions get an output: ``"all"``, ``"last"`` (the end token, in
            the last block) or ``"none"`` (only keys and values are needed).

    Returns:
        The block's output at the query positions ([G'', M, S or 1, w], G'' broadcast from G
        and G'; None for ``"none"``) and the new positions' keys and values [G, M, heads, S, hw].
    """
    attn = block.attn
    w = x.shape[-1]
    heads = attn.num_heads
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    h = block.ln_1(x)
    kv = F.linear(h, weight[w:], None if bias is None else bias[w:])
    k, v = (_split_heads(t, heads) for t in kv.chunk(2, dim=-1))
    if queries == "none":
        return None, (k, v)
    if queries == "last":
        x, h = x[..., -1:, :], h[..., -1:, :]
    q = _split_heads(F.linear(h, weight[:w], None if bias is None else bias[:w]), heads)
    keys, values = (k, v) if past is None else (_with_past(past[0], k), _with_past(past[1], v))
    # causal mask of the whole sequence: the query at position p sees the keys at <= p
    length, s = keys.shape[-2], k.shape[-2]
    q_pos = torch.arange(length - s, length, device=x.device)[-q.shape[-2] :]
    mask = torch.arange(length, device=x.device)[None, :] <= q_pos[:, None]
    lead = torch.broadcast_shapes(q.shape[:2], keys.shape[:2])
    q = q.expand(*lead, *q.shape[2:])
    out = F.scaled_dot_product_attention(
        q.flatten(0, 1), keys.flatten(0, 1), values.flatten(0, 1), attn_mask=mask
    )
    out = out.unflatten(0, lead).transpose(-3, -2).flatten(-2)  # [G'', M, S', w]
    x = x + block.ls_1(F.linear(out, attn.out_proj.weight, attn.out_proj.bias))
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, (k, v)


def _split_heads(t: Tensor, heads: int) -> Tensor:
    """[..., S, heads * hw] -> [..., heads, S, hw], as nn.MultiheadAttention splits heads."""
    return t.unflatten(-1, (heads, -1)).transpose(-3, -2)


def _with_past(past: Tensor, new: Tensor) -> Tensor:
    """Cached prefix keys (or values) [G', 1, h, Lp, hw] followed by the new positions'
    [G, M, h, S, hw], broadcast to [max(G, G'), M, h, Lp + S, hw]."""
    lead = torch.broadcast_shapes(past.shape[:2], new.shape[:2])
    return torch.cat([past.expand(*lead, -1, -1, -1), new.expand(*lead, -1, -1, -1)], dim=-2)
