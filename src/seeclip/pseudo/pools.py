"""Pseudo-unknowns that were generated ahead of time and stored: image pools and feature pools."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from seeclip.features import Features
from seeclip.pseudo.base import PseudoContext, by_domain


class DomainPool:
    """Pseudo-unknowns already computed, drawn with replacement within one source domain."""

    def __init__(self, features: Features) -> None:
        self.features = features
        self.by_domain = by_domain(features.domains)

    def sample(self, domain: str, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if domain not in self.by_domain:
            raise KeyError(f"the pseudo-unknown pool has no images of source domain {domain!r}")
        idx = self.by_domain[domain]
        pick = idx[torch.randint(len(idx), (n,), generator=generator)]
        return self.features.global_[pick].float(), self.features.tokens[pick].float()


def image_pool_features(
    backbone: Any,
    manifest: str | Path,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Features:
    """Encode a generated image pool once through the feature cache (like any dataset).

    ``cache_dir`` is the cache root (None: SEECLIP_HOME); the features go to its ``features/``
    as every dataset's do, whoever asks (training, ``seeclip generate``)."""
    from seeclip.cache import encode_cached
    from seeclip.generate.image_pool import load_image_pool
    from seeclip.paths import seeclip_home

    pool = load_image_pool(manifest)
    tag = hashlib.sha1(str(pool.root.resolve()).encode()).hexdigest()[:10]
    feats = encode_cached(
        backbone,
        pool.root,
        list(pool.paths),
        cache_dir=(Path(cache_dir) if cache_dir else seeclip_home()) / "features",
        name=f"pools-{tag}/{backbone.name.replace('/', '_').replace(':', '_')}",
        progress=progress,
    )
    g, t = feats.torch(np.arange(len(pool.paths)))
    return Features(g, t, pool.domains)


def image_pool_unknowns(ctx: PseudoContext) -> DomainPool:
    """Generated images (``seeclip generate --backend image``) through the feature cache."""
    if not ctx.pool:
        raise ValueError("train.pseudo_unknowns=images needs train.pseudo_pool=<manifest.csv>")
    if ctx.backbone is None:
        raise ValueError("image pseudo-unknowns need the backbone to encode the images")
    feats = image_pool_features(
        ctx.backbone, ctx.pool, cache_dir=ctx.cache_dir, progress=ctx.progress
    )
    return DomainPool(feats)


def feature_pool_unknowns(ctx: PseudoContext) -> DomainPool:
    """A stored feature pool (a folder written by ``seeclip generate --backend feature``)."""
    from seeclip.generate.feature_diffusion import load_pool

    if not ctx.pool:
        raise ValueError("train.pseudo_unknowns=pool needs train.pseudo_pool=<pool folder>")
    folder = Path(ctx.pool)
    if not (folder / "manifest.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a feature pool (no manifest.json); pass a folder that "
            f"`seeclip generate --backend feature` printed"
        )
    return DomainPool(load_pool(folder).features())
