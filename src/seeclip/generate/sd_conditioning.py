"""Stable Diffusion conditioning on perturbed semantic tokens: the token projection and prompts.

How the tokens enter SD's text conditioning is described in docs/pseudo_unknowns.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from seeclip.generate.sd_pipeline import (
    ImageDiffusionConfig,
    encode_prompts,
    pipeline_name,
    prompt_lengths,
)

__all__ = [
    "build_conditioning",
    "conditioning_projection",
    "domain_prompt",
    "known_classes_prompt",
    "text_inverse_projection",
    "token_projection",
]


def token_projection(d: int, width: int, *, seed: int = 0) -> Tensor:
    """The fixed map P [d, width] from CLIP's joint space to SD's text-conditioning space.

    A seeded Gaussian matrix made semi-orthogonal by QR: P P^T = I when d <= width (norms and
    angles between tokens are preserved), P^T P = I otherwise. Float32, on CPU.
    """
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(max(d, width), min(d, width), generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))  # unique QR: signs fixed by R's positive diagonal
    return (q.T if d <= width else q).float().contiguous()


def text_inverse_projection(text_projection: Tensor) -> Tensor:
    """P = pinv(W) [d, D] for CLIP's text projection W [D, d] (final hidden state -> joint space).

    A joint-space token v maps to the hidden state u = v P whose projection u W is v's
    component in W's row space (all of v when W has full rank d): the state that CLIP's own text
    tower would project onto v. Float32, on CPU.
    """
    w = text_projection.detach().float().cpu()
    return torch.linalg.pinv(w.double()).float().contiguous()


def conditioning_projection(cfg: ImageDiffusionConfig, pipe, backbone=None) -> Tensor:
    """The map P [d, D] that :func:`build_conditioning` applies, as ``cfg.projection`` names it.

    ``"text_inverse"`` needs ``backbone`` (a :class:`seeclip.backbone.Backbone`) and a pipeline
    whose text encoder is that backbone's text tower (checked on the token embeddings).
    """
    width = pipe.text_encoder.config.hidden_size
    if cfg.projection == "random":
        if backbone is None:
            raise ValueError("the random projection needs the token width d: pass the backbone")
        return token_projection(backbone.embed_dim, width, seed=cfg.projection_seed)
    if backbone is None:
        raise ValueError(
            "projection=text_inverse needs the backbone whose text projection it inverts"
        )
    table = pipe.text_encoder.get_input_embeddings().weight.detach().float().cpu()
    own = backbone.token_table.detach().float().cpu()
    # shipped weights are fp16: a copy of the same tower agrees to fp16 rounding
    if table.shape != own.shape or not torch.allclose(table, own, atol=2e-3, rtol=1e-2):
        raise ValueError(
            f"projection=text_inverse: {pipeline_name(pipe)}'s text encoder is not "
            f"{backbone.name}'s text tower; use projection=random"
        )
    w = backbone.text_projection
    if w is None or tuple(w.shape) != (width, backbone.embed_dim):
        raise ValueError(f"{backbone.name} has no [{width}, {backbone.embed_dim}] text projection")
    return text_inverse_projection(w)


def build_conditioning(
    pipe,
    perturbed: Tensor,
    clean: Tensor,
    domains: Sequence[str],
    negative_prompt: str,
    *,
    cfg: ImageDiffusionConfig,
    projection: Tensor,
) -> tuple[Tensor, Tensor]:
    """(prompt_embeds, negative_prompt_embeds) [B, L, D] for B perturbed token sets [B, K, d].

    Each token is projected, u_ik = s_i * v~_ik @ P (P: :func:`token_projection`), with
    s_i = (mean per-token norm of the positive prompt's embedding, BOS excluded) /
    (mean_k ||v_ik @ P||) computed on the ``clean`` tokens [B, K, d], so the clean tokens have
    the norm of SD's own text tokens and the perturbation keeps its size relative to them.

    L = 77 + K with ``placement="append"`` (the negative is extended by K copies of its last
    position), L = 77 with ``"replace_padding"`` (the last K padding positions of the positive
    are replaced; the negative is SD's usual one).
    """
    b, k, _ = perturbed.shape
    prompts = [domain_prompt(cfg, d) for d in domains]
    unique = sorted(set(prompts))
    table = encode_prompts(pipe, unique)
    pos = table[[unique.index(p) for p in prompts]]  # [B, 77, D]
    neg = encode_prompts(pipe, [negative_prompt]).expand(b, -1, -1)
    # Norm matching: the clean tokens get the mean per-token norm of their prompt (BOS left out,
    # its hidden state is an outlier in SD's text encoder).
    target = pos[:, 1:].float().norm(dim=-1).mean(dim=1)  # [B]
    p = projection.to(pos.device)
    u = perturbed.to(pos.device).float() @ p  # [B, K, D]
    base = (clean.to(pos.device).float() @ p).norm(dim=-1).mean(dim=1)  # [B]
    u = u * (target / base.clamp_min(1e-12))[:, None, None]
    u = u.to(pos.dtype)
    if cfg.placement == "append":
        pos = torch.cat([pos, u], dim=1)
        neg = torch.cat([neg, neg[:, -1:].expand(-1, k, -1)], dim=1)
    else:
        room = pipe.tokenizer.model_max_length - max(prompt_lengths(pipe, unique))
        if k > room:
            raise ValueError(f"replace_padding: the prompt leaves {room} padding slots < K={k}")
        pos = torch.cat([pos[:, : pos.shape[1] - k], u], dim=1)
    return pos, neg.contiguous()


def domain_prompt(cfg: ImageDiffusionConfig, domain: str) -> str:
    """The positive prompt of a source domain: "a art painting of an unknown object"."""
    return cfg.prompt.format(domain=domain.replace("_", " "))


def known_classes_prompt(class_names: Sequence[str]) -> str:
    """The known class names as one negative prompt: "dog, elephant, giraffe"."""
    return ", ".join(c.replace("_", " ") for c in class_names)
