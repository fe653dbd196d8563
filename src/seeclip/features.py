"""What the frozen encoder gives a method, and what a method gives back.

Leaf module (no seeclip imports), so that methods, trainers and pseudo-unknown sources can all
use these types without import cycles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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
