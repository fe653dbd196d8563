"""What the frozen encoder gives a method, what a method gives back, and pseudo-unknown sources.

Leaf module (no seeclip imports), so that methods, trainers and pseudo-unknown sources can all
use these types without import cycles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Features:
    """Cached image features of some samples, as the frozen encoder produced them."""

    global_: torch.Tensor  # [n, d] L2-normalised global image features
    tokens: torch.Tensor  # [n, N, d] spatial tokens in the joint space
    domains: tuple[str, ...]  # source/target domain of each sample

    def __len__(self) -> int:
        return self.global_.shape[0]


@dataclass(frozen=True)
class Prediction:
    """Open-set output for n images; label conventions as in :mod:`seeclip.metrics`."""

    y_pred: np.ndarray  # [n] 0..C-1 known class, C = unknown
    y_pred_closed: np.ndarray  # [n] argmax over the C known classes only
    unknown_score: np.ndarray  # [n] higher = more likely unknown


@dataclass(frozen=True)
class PromptOutput:
    """What a prompt model returns for B images and P prompts (P = C, or C + 1 with unknown)."""

    logits: Tensor  # [B, P] tau * cos(global image feature, t_c(x)); column C = unknown
    text: Tensor  # [B, P, d] L2-normalised text features t_c(x) (a broadcast view if shared)


class PseudoUnknownSource(Protocol):
    def sample(self, domain: str, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` pseudo-unknowns of ``domain``: (global [n, d] normalised, tokens [n, N, d])."""


@runtime_checkable
class ModelFollowingSource(Protocol):
    """A source whose samples follow the model in training (the online image generator): the
    trainer hands it the model once, and each step's pseudo-unknown counts before sampling."""

    def follow(self, model) -> None: ...

    def prepare(self, step: int, counts: dict[str, int], generator: torch.Generator) -> None:
        """Step ``step`` (0-based, within the epoch) will sample ``counts`` per domain."""


class PseudoSources:
    """A run's pseudo-unknowns, built on first use: a training source and a validation one.

    The training source is built from the training features; the validation source from the
    source-*validation* features only, so the held-out pseudo-unknowns that model selection
    scores never derive from an image the model trained on.
    """

    def __init__(
        self,
        name: str,
        train: Callable[[], PseudoUnknownSource | None],
        val: Callable[[], PseudoUnknownSource | None],
    ) -> None:
        self.name = name
        self._build = {"train": train, "val": val}
        self._built: dict[str, PseudoUnknownSource | None] = {}

    def _get(self, which: str) -> PseudoUnknownSource | None:
        if which not in self._built:
            self._built[which] = self._build[which]()
        return self._built[which]

    def train(self) -> PseudoUnknownSource | None:
        return self._get("train")

    def val(self) -> PseudoUnknownSource | None:
        return self._get("val")

    def built(self, which: str) -> PseudoUnknownSource | None:
        """The ``which`` ("train" or "val") source if something already built it, else None
        (never builds one: a method that used no pseudo-unknowns costs nothing here)."""
        return self._built.get(which)


def draw(
    source: PseudoUnknownSource, domains: tuple[str, ...], n: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``n`` samples of each of ``domains`` (sorted) from ``source``, concatenated."""
    parts = [source.sample(d, n, generator) for d in sorted(set(domains))]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
