"""The two-call interface every method implements: ``fit`` on source data, ``predict`` on images.

``predict`` never sees a label: it is the only path used on the target domain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from seeclip.registry import Registry


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


class Method(Protocol):
    num_known: int

    def fit(
        self, train: Features, train_labels: torch.Tensor, val: Features, val_labels: torch.Tensor
    ) -> None:
        """Learn from labelled source images; calibrate on source validation only."""

    def predict(self, images: Features) -> Prediction:
        """Classify images into C known classes or unknown (index C). Takes no label."""

    def state(self) -> dict[str, torch.Tensor]:
        """What fitting produced (learnable parameters, thresholds): saved as safetensors."""

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state` returned."""


@dataclass(frozen=True)
class MethodContext:
    """What a method factory may use: the backbone, the class texts and the run config."""

    backbone: Any  # seeclip.backbone.Backbone
    class_texts: tuple[str, ...]  # prompt text of each known class, in label order
    template: str  # the benchmark's default prompt template with one {}
    config: Any  # seeclip.config.RunConfig
    progress: bool = True  # show progress bars while fitting


MethodFactory = Callable[[MethodContext], Method]
METHODS: Registry[MethodFactory] = Registry("method")
