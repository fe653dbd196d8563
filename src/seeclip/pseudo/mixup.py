"""Mixup pseudo-unknowns: interpolations of two known classes of one source domain."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from seeclip.features import Features
from seeclip.pseudo.base import PseudoContext, by_domain


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
        self.by_domain = by_domain(features.domains)
        for d, idx in self.by_domain.items():
            if labels[idx].unique().numel() < 2:
                raise ValueError(f"mixup pseudo-unknowns need two classes in domain {d!r}")

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


def mixup_unknowns(ctx: PseudoContext) -> MixupUnknowns:
    """Feature-space mixes of two known classes of one source domain (label: unknown)."""
    return MixupUnknowns(ctx.features, ctx.labels)
