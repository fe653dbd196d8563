"""The two-call interface every method implements: ``fit`` on source data, ``predict`` on images.

``predict`` never sees a label: it is the only path used on the target domain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from seeclip.features import Features, Prediction
from seeclip.registry import Registry


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
