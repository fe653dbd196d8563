"""What a pseudo-unknown source may be built from, and the registry of sources.

A source is built from labelled source-domain features (training images for training, the
source-validation images for model selection) and then asked for ``n`` samples of one source
domain at a time, in the cache's feature format. They get label C ("unknown").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from seeclip.features import Features, PseudoSources, PseudoUnknownSource, draw
from seeclip.generate.feature_config import FeatureDiffusionConfig
from seeclip.registry import Registry


@dataclass(frozen=True)
class PseudoContext:
    """What a source may use: labelled source features and the frozen CLIP's text side."""

    features: Features  # source-domain features it is built from (never target data)
    labels: Tensor  # their known-class labels 0..C-1
    backbone: Any = None  # seeclip.backbone.Backbone, to encode class names / "unknown"
    class_texts: tuple[str, ...] = ()  # prompt text of each known class, in label order
    template: str = "a photo of a {}."  # the benchmark's prompt template
    seed: int = 0  # seeds generation
    diffusion: FeatureDiffusionConfig | None = None  # the feature generator's settings
    pool: str | None = None  # a generated pool on disk (manifest.csv or a feature pool folder)
    sd_model: str | None = None  # sd_images: text-to-image model (name, folder or repo id)
    sd_prompt: str = "a {domain} of an unknown object"  # sd_images: positive prompt
    sd_projection: str = "random"  # sd_images: tokens -> text conditioning (ImageDiffusionConfig)
    sd_strength: float = 1.0  # sd_images: below 1, SDEdit from the source images (image_paths)
    sd_image_size: int | None = None  # sd_images: generated side in px (None: the model's)
    sd_every: int = 1  # sd_online: draw every N steps (1: every step; 0: once per epoch)
    image_paths: tuple[str, ...] = ()  # the image file of each feature row (for SDEdit)
    cache_dir: Path | None = None  # feature cache and pool folder root (None: SEECLIP_HOME)
    progress: bool = True  # progress bars while a source generates


SourceFactory = Callable[[PseudoContext], PseudoUnknownSource | None]
PSEUDO_UNKNOWNS: Registry[SourceFactory] = Registry("pseudo-unknown source")


def by_domain(domains: tuple[str, ...]) -> dict[str, Tensor]:
    """Row indices of each domain, in sorted domain order."""
    return {
        d: torch.tensor([i for i, x in enumerate(domains) if x == d]) for d in sorted(set(domains))
    }


__all__ = [
    "PSEUDO_UNKNOWNS",
    "PseudoContext",
    "PseudoSources",
    "PseudoUnknownSource",
    "SourceFactory",
    "by_domain",
    "draw",
]
