"""Semantic-guided feature diffusion as a pseudo-unknown source (docs/method.md)."""

from __future__ import annotations

from pathlib import Path

import torch

from seeclip import distributed
from seeclip.generate.feature_config import FeatureDiffusionConfig
from seeclip.generate.feature_diffusion import UNKNOWN_WORD, FeaturePool, build_pool
from seeclip.pseudo.base import PseudoContext


def diffusion_unknowns(ctx: PseudoContext) -> FeaturePool:
    """Semantic-guided feature diffusion: a seeded pool, generated once per source set."""
    config = ctx.diffusion if ctx.diffusion is not None else FeatureDiffusionConfig()
    if ctx.backbone is None or not ctx.class_texts:
        raise ValueError("diffusion pseudo-unknowns need the backbone and the class texts")
    with torch.no_grad():
        class_text = ctx.backbone.encode_text([ctx.template.format(c) for c in ctx.class_texts])
        unknown = ctx.backbone.encode_text([ctx.template.format(UNKNOWN_WORD)])[0]
    with distributed.main_first():  # torchrun: rank 0 trains and samples, the others load
        return build_pool(
            ctx.features,
            ctx.labels,
            class_text=class_text.cpu(),
            unknown_text=unknown.cpu(),
            config=config,
            seed=ctx.seed,
            root=Path(ctx.cache_dir) / "pools" if ctx.cache_dir else None,
            progress=ctx.progress,
        )
