"""Settings of the feature-space pseudo-unknown generator (the run config's ``diffusion`` section).

It lives with its generator and has no seeclip imports, so :mod:`seeclip.config` can include it
as a section without pulling in the generator's code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

NEGATIVES = ("all", "own")  # negative text condition of the feature-space generator


@dataclass(frozen=True)
class FeatureDiffusionConfig:
    """Settings of the feature-space generator (the run config's ``diffusion`` section)."""

    # sampling (a change re-samples the pool from the same trained generator)
    sigma: float = 0.2  # std of the noise on the semantic summaries, in source-std units
    guidance: float = 15.0  # classifier-free guidance scale g
    # negative text condition: all = mean of the known classes' texts | own = the sample's class
    negative: Literal["all", "own"] = "all"
    sample_steps: int = 20  # DDIM steps (eta = 0)
    clip_x0: float = 4.0  # bound on the x0 estimate while sampling, in source-std units
    detail: bool = True  # pooled grid only: add back the source image's within-cell token detail
    pool_per_domain: int = 256  # pseudo-unknowns generated per source domain
    # training (a change retrains the generator)
    k: int = 4  # semantic summaries K (fixed queries: spherical k-means of source tokens)
    grid: int | None = None  # token cells G x G; 0 = all tokens; None: 0 if (N+1)d <= 4096, else 2
    width: int = 512  # hidden width of the denoiser MLP
    depth: int = 3  # FiLM residual blocks
    timesteps: int = 100  # DDPM steps T (cosine schedule)
    train_steps: int = 1000  # AdamW steps (cosine learning-rate decay)
    batch_size: int = 128  # source samples per training step
    lr: float = 1e-3  # AdamW learning rate
    cond_dropout: float = 0.1  # probability the text condition is replaced by the learned null
    seed: int | None = None  # seeds training and sampling; None = the run's seed

    def __post_init__(self) -> None:
        if self.negative not in NEGATIVES:
            raise ValueError(f"negative must be one of {NEGATIVES}, got {self.negative!r}")
        if self.sigma < 0 or not 0 <= self.cond_dropout < 1:
            raise ValueError("sigma must be >= 0 and cond_dropout in [0, 1)")
        for name in (
            "sample_steps",
            "pool_per_domain",
            "k",
            "width",
            "depth",
            "timesteps",
            "train_steps",
            "batch_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"diffusion.{name} must be >= 1, got {getattr(self, name)}")
