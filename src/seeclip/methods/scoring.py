"""What decides "unknown": the decision rules methods share, in one place.

Every method scores each image (its *unknown score*, higher = more likely unknown) and then
applies one operating rule. A method module names its rule; nothing else chooses it.

- :class:`UnknownPromptArgmax` (``seeclip``, ``coop_unknown``): the argmax over the C known
  logits and the learned (C+1)-th "unknown" prompt; the unknown score is the softmax mass of
  the unknown prompt. No threshold: the paper's rule.
- :class:`MaxSoftmaxThreshold` (``zeroshot``, ``coop``, ``cocoop``): the argmax over the C
  known classes, "unknown" when the maximum softmax probability (the confidence) falls below a
  threshold, the ``quantile`` of the source-validation confidences of known images.
- :func:`apply_threshold` / :func:`fit_threshold`: the *calibrated* rule for any method, a
  threshold on its unknown score chosen on leave-one-source-out folds (``--validate lodo``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import Tensor

from seeclip import metrics
from seeclip.features import Prediction

__all__ = [
    "DecisionRule",
    "MaxSoftmaxThreshold",
    "UnknownPromptArgmax",
    "apply_threshold",
    "confidence_threshold",
    "fit_threshold",
    "held_out_thresholds",
]

Scored = tuple[np.ndarray, np.ndarray, np.ndarray]  # (open-set pred, closed pred, unknown score)


class DecisionRule(Protocol):
    """How logits become a prediction: scores, and (for a thresholded rule) its threshold."""

    name: ClassVar[str]
    needs_threshold: ClassVar[bool]  # True: fit a threshold on source validation first
    needs_unknown_prompt: ClassVar[bool]  # True: logits have a (C+1)-th "unknown" column

    def scores(self, logits: Tensor, num_known: int) -> Scored: ...

    def threshold(self, confidence: Any) -> float: ...

    def decide(
        self, scored: Scored, confidence: np.ndarray, threshold: float | None, num_known: int
    ) -> np.ndarray: ...


class UnknownPromptArgmax:
    """Argmax over C + 1 logits; unknown score = softmax probability of the unknown prompt."""

    name: ClassVar[str] = "unknown_prompt_argmax"
    needs_threshold: ClassVar[bool] = False
    needs_unknown_prompt: ClassVar[bool] = True

    def scores(self, logits: Tensor, num_known: int) -> Scored:
        closed = logits[:, :num_known].argmax(-1)
        prob = logits.softmax(-1)
        return logits.argmax(-1).numpy(), closed.numpy(), prob[:, num_known].numpy()

    def threshold(self, confidence: Any) -> float:
        raise TypeError("the C+1 argmax has no threshold to fit")

    def decide(self, scored, confidence, threshold, num_known) -> np.ndarray:
        return scored[0]


class MaxSoftmaxThreshold:
    """ "Unknown" when the max softmax probability over the C known classes is below a
    threshold: the ``quantile`` of source-validation confidences (about that share of known
    source images is rejected). Unknown score = 1 - confidence."""

    name: ClassVar[str] = "max_softmax_threshold"
    needs_threshold: ClassVar[bool] = True
    needs_unknown_prompt: ClassVar[bool] = False

    def __init__(self, quantile: float = 0.05) -> None:
        confidence_threshold([1.0], quantile)  # checks the quantile
        self.quantile = quantile

    def scores(self, logits: Tensor, num_known: int) -> Scored:
        closed = logits[:, :num_known].argmax(-1)
        prob = logits.softmax(-1)
        return closed.numpy(), closed.numpy(), (1.0 - prob.max(-1).values).numpy()

    def threshold(self, confidence: Any) -> float:
        return confidence_threshold(confidence, self.quantile)

    def decide(self, scored, confidence, threshold, num_known) -> np.ndarray:
        if threshold is None:
            raise RuntimeError("call fit() or load_state() first: the threshold is missing")
        return np.where(np.asarray(confidence) < threshold, num_known, scored[1])


def confidence_threshold(confidence: Any, quantile: float) -> float:
    """The max-softmax rejection threshold: the ``quantile`` of source-val known confidences."""
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"threshold_quantile must be in [0, 1), got {quantile}")
    conf = np.asarray(confidence.detach().cpu() if torch.is_tensor(confidence) else confidence)
    if conf.size == 0:
        raise ValueError("the threshold needs source-validation images; the split has none")
    return float(np.quantile(conf.astype(np.float64), quantile))


# ---------------------------------------------------------------- the calibrated rule (LODO)


def apply_threshold(pred: Prediction, threshold: float, num_known: int) -> Prediction:
    """The calibrated decision: "unknown" (index C) when the unknown score exceeds
    ``threshold``, else the closed-set prediction."""
    y = np.where(np.asarray(pred.unknown_score) > threshold, num_known, pred.y_pred_closed)
    return Prediction(y.astype(np.int64), pred.y_pred_closed, pred.unknown_score)


def fit_threshold(folds: list[tuple[np.ndarray, Prediction, int]], *, points: int = 99) -> float:
    """The unknown-score threshold with the best mean fold H (the first of equals).

    Args:
        folds: per fold (y_true with -1 for unknown, its prediction, its number of known
            classes).
        points: candidates are the 1..99% quantiles of the folds' pooled scores.
    """
    pooled = np.concatenate([np.asarray(p.unknown_score, dtype=np.float64) for _, p, _ in folds])
    candidates = np.unique(np.quantile(pooled, np.linspace(0.01, 0.99, points)))
    best, best_h = float(candidates[0]), -1.0
    for thr in candidates:
        h = np.mean(
            [
                metrics.h_score(y, apply_threshold(p, thr, c).y_pred, num_known=c)
                for y, p, c in folds
            ]
        )
        if h > best_h:
            best, best_h = float(thr), float(h)
    return best


def held_out_thresholds(folds: list[tuple[np.ndarray, Prediction, int]]) -> list[float]:
    """Per fold, :func:`fit_threshold` on all the *other* folds (all of them if there is one)."""
    return [
        fit_threshold([f for i, f in enumerate(folds) if i != k] or folds)
        for k in range(len(folds))
    ]
