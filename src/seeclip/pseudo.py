"""Pluggable sources of pseudo-unknowns: label-C samples in the cache's feature format.

A source is built from the labelled source-domain training features and then asked for ``n``
samples of one source domain at a time. Training mixes them into each batch with label C
("unknown"); the held-out rejection criterion of model selection draws them from source val.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from seeclip.features import Features
from seeclip.registry import Registry


class PseudoUnknownSource(Protocol):
    def sample(self, domain: str, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` pseudo-unknowns of ``domain``: (global [n, d] normalised, tokens [n, N, d])."""


@dataclass(frozen=True)
class PseudoContext:
    """What a source may use: labelled source features and the frozen CLIP's text side."""

    features: Features  # source-domain training features (never target data)
    labels: Tensor  # their known-class labels 0..C-1
    backbone: Any = None  # seeclip.backbone.Backbone, to encode class names / "unknown"
    class_texts: tuple[str, ...] = ()  # prompt text of each known class, in label order
    template: str = "a photo of a {}."  # the benchmark's prompt template
    seed: int = 0  # seeds generation
    options: Any = None  # the run config's generator section (e.g. sigma, guidance)
    pool: str | None = None  # a generated pool on disk (train.pseudo_pool)
    progress: bool = True  # progress bars while a source generates


SourceFactory = Callable[[PseudoContext], PseudoUnknownSource | None]
PSEUDO_UNKNOWNS: Registry[SourceFactory] = Registry("pseudo-unknown source")


@PSEUDO_UNKNOWNS.register("none")
def no_pseudo_unknowns(ctx: PseudoContext) -> None:
    """No pseudo-unknowns: the unknown prompt only sees what the losses do to it."""
    return None


class MixupUnknowns:
    """Interpolations of two images of *different* known classes from the same domain.

    The mix lies between two known classes and belongs to neither (Zhou et al., PROSER,
    CVPR'21, "data placeholders"): a cheap CPU stand-in for semantic-guided diffusion.
    Global features are re-normalised; patch tokens are mixed position by position.
    """

    def __init__(
        self, features: Features, labels: Tensor, *, lam: tuple[float, float] = (0.3, 0.7)
    ):
        self.features = features
        self.labels = labels
        self.lam = lam
        self.by_domain: dict[str, Tensor] = {}
        for d in sorted(set(features.domains)):
            idx = torch.tensor([i for i, x in enumerate(features.domains) if x == d])
            if labels[idx].unique().numel() < 2:
                raise ValueError(f"mixup pseudo-unknowns need two classes in domain {d!r}")
            self.by_domain[d] = idx

    def sample(self, domain: str, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = self.by_domain[domain]
        a = idx[torch.randint(len(idx), (n,), generator=generator)]
        b = idx[torch.randint(len(idx), (n,), generator=generator)]
        same = self.labels[a] == self.labels[b]
        while same.any():  # redraw partners of the same class
            b[same] = idx[torch.randint(len(idx), (int(same.sum()),), generator=generator)]
            same = self.labels[a] == self.labels[b]
        lo, hi = self.lam
        lam = lo + (hi - lo) * torch.rand(n, generator=generator)
        g = self.features.global_[a].float(), self.features.global_[b].float()
        t = self.features.tokens[a].float(), self.features.tokens[b].float()
        glob = F.normalize(lam[:, None] * g[0] + (1 - lam[:, None]) * g[1], dim=-1)
        tokens = lam[:, None, None] * t[0] + (1 - lam[:, None, None]) * t[1]
        return glob, tokens


@PSEUDO_UNKNOWNS.register("mixup")
def mixup_unknowns(ctx: PseudoContext) -> MixupUnknowns:
    """Feature-space mixes of two known classes of one source domain (label: unknown)."""
    return MixupUnknowns(ctx.features, ctx.labels)


class DomainPool:
    """Pseudo-unknowns already computed (e.g. generated images through the feature cache)."""

    def __init__(self, features: Features) -> None:
        self.features = features
        self.by_domain = {
            d: torch.tensor([i for i, x in enumerate(features.domains) if x == d])
            for d in sorted(set(features.domains))
        }

    def sample(self, domain: str, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if domain not in self.by_domain:
            raise KeyError(f"the pseudo-unknown pool has no images of source domain {domain!r}")
        idx = self.by_domain[domain]
        pick = idx[torch.randint(len(idx), (n,), generator=generator)]
        return self.features.global_[pick].float(), self.features.tokens[pick].float()


def image_pool_features(backbone: Any, manifest: str | Path, *, progress: bool = True) -> Features:
    """Encode a generated image pool once through the feature cache (like any dataset)."""
    from seeclip.cache import encode_cached
    from seeclip.generate.image_diffusion import load_image_pool
    from seeclip.paths import seeclip_home

    pool = load_image_pool(manifest)
    tag = hashlib.sha1(str(pool.root.resolve()).encode()).hexdigest()[:10]
    feats = encode_cached(
        backbone,
        pool.root,
        list(pool.paths),
        cache_dir=seeclip_home() / "features",
        name=f"pools-{tag}/{backbone.name.replace('/', '_').replace(':', '_')}",
        progress=progress,
    )
    g, t = feats.torch(np.arange(len(pool.paths)))
    return Features(g, t, pool.domains)


@PSEUDO_UNKNOWNS.register("images")
def image_pool_unknowns(ctx: PseudoContext) -> DomainPool:
    """Generated images (``seeclip generate --backend image``) through the feature cache."""
    if not ctx.pool:
        raise ValueError("train.pseudo_unknowns=images needs train.pseudo_pool=<manifest.csv>")
    if ctx.backbone is None:
        raise ValueError("image pseudo-unknowns need the backbone to encode the images")
    return DomainPool(image_pool_features(ctx.backbone, ctx.pool, progress=ctx.progress))
