"""Prompt-learning methods: SeeCLIP and the CoOp family, trained by :class:`PromptTrainer`."""

from __future__ import annotations

from functools import partial

import torch

from seeclip.losses import alignment_loss, seeclip_loss
from seeclip.methods.base import METHODS, MethodContext
from seeclip.methods.models import CoCoOpModel, CoOpModel, PromptModel, SeeCLIPModel
from seeclip.trainer import PromptTrainer


def _ce_only(out, labels):
    ali = alignment_loss(out.logits, labels)
    return {"total": ali, "ali": ali}


def _seeclip_terms(out, labels, *, model: PromptModel, loss):
    return seeclip_loss(
        out,
        labels,
        alpha=loss.alpha,
        beta=loss.beta,
        gamma=loss.gamma,
        margin=loss.margin,
        f_key_weights=model.f_key_weights(),
    )


def _seeded(seed: int, build):
    """Build a model with its initial weights drawn from ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _trainer(ctx: MethodContext, model: PromptModel, loss_fn) -> PromptTrainer:
    cfg = ctx.config
    return PromptTrainer(
        model,
        loss_fn,
        train=cfg.train,
        threshold_quantile=cfg.prompt.threshold_quantile,
        seed=cfg.seed,
        progress=ctx.progress,
        pseudo_context={
            "backbone": ctx.backbone,
            "class_texts": ctx.class_texts,
            "template": ctx.template,
            "options": cfg.diffusion,
            "pool": cfg.train.pseudo_pool,
        },
    )


@METHODS.register("seeclip")
def build_seeclip(ctx: MethodContext) -> PromptTrainer:
    """SeeCLIP: semantic tokens + domain token in known prompts, learned unknown prompt."""
    p = ctx.config.prompt
    model = _seeded(
        ctx.config.seed,
        lambda: SeeCLIPModel(
            ctx.backbone, ctx.class_texts, k=p.k, m=p.m, semantic_tokens=p.semantic_tokens
        ),
    )
    return _trainer(ctx, model, partial(_seeclip_terms, model=model, loss=ctx.config.loss))


@METHODS.register("coop")
def build_coop(ctx: MethodContext) -> PromptTrainer:
    """CoOp: shared learned context, unknown by max-softmax threshold on source val."""
    model = _seeded(
        ctx.config.seed,
        lambda: CoOpModel(ctx.backbone, ctx.class_texts, n_ctx=ctx.config.prompt.n_ctx),
    )
    return _trainer(ctx, model, _ce_only)


@METHODS.register("coop_unknown")
def build_coop_unknown(ctx: MethodContext) -> PromptTrainer:
    """CoOp plus a learned (C+1)-th "unknown" prompt trained on pseudo-unknowns."""
    p = ctx.config.prompt
    model = _seeded(
        ctx.config.seed,
        lambda: CoOpModel(ctx.backbone, ctx.class_texts, n_ctx=p.n_ctx, unknown_prompt=True, m=p.m),
    )
    return _trainer(ctx, model, _ce_only)


@METHODS.register("cocoop")
def build_cocoop(ctx: MethodContext) -> PromptTrainer:
    """CoCoOp: instance-conditional context, unknown by max-softmax threshold on source val."""
    model = _seeded(
        ctx.config.seed,
        lambda: CoCoOpModel(ctx.backbone, ctx.class_texts, n_ctx=ctx.config.prompt.n_ctx),
    )
    return _trainer(ctx, model, _ce_only)
