"""Open-set domain generalization metrics, computed on the target test set.

Functional, scikit-learn style: ``f(y_true, y_..., *, options) -> float``. Inputs may be
lists, numpy arrays or torch tensors (any device); they must be 1-D and of equal length.
All rates are fractions in [0, 1], not percentages.

Label conventions (shared across seeclip):

- ``y_true``: int labels; known classes are ``0..C-1``, unknown is ``-1`` (any negative
  value counts as unknown). With ``num_known`` given, a label ``>= C`` is an error: it
  usually means unknown images were labelled ``C`` or kept their original class index.
- ``y_pred``: open-set (C+1)-way prediction; ``0..C-1`` known classes, ``C`` = "unknown".
  ``C`` is passed as ``num_known``.
- ``y_pred_closed``: closed-set prediction, argmax over the ``C`` known classes only.
- ``unknown_score``: continuous score, HIGHER = more likely unknown.

Degenerate inputs return ``nan`` instead of raising, so a whole report can still be
written: with no unknown samples, ``acc_unknown``, ``h_score``, ``auroc`` and ``oscr`` are
``nan``; with no known samples, ``acc_known``, ``closed_set_acc``, ``h_score``, ``auroc``
and ``oscr`` are ``nan``. Empty inputs, mismatched lengths, non-integer labels,
predictions outside ``0..num_known`` and non-finite scores raise ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

__all__ = [
    "METRICS",
    "acc_known",
    "acc_unknown",
    "acc_unknown_by_group",
    "auroc",
    "closed_set_acc",
    "h_score",
    "open_set_report",
    "oracle_h_score",
    "oscr",
]

NAN = float("nan")
# the six metrics of every record and table, in table order (:func:`open_set_report`'s keys)
METRICS = ("acc_known", "acc_unknown", "h_score", "closed_set_acc", "auroc", "oscr")


def _to_1d(name: str, x: Any) -> np.ndarray:
    """Turn a list, array or (possibly CUDA / grad-tracking) tensor into a non-empty 1-D array."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    return arr


def _labels(name: str, x: Any) -> np.ndarray:
    """A 1-D int64 label array; floats are accepted only when integer-valued."""
    arr = _to_1d(name, x)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        return arr.astype(np.int64)
    raise ValueError(f"{name} must hold integer labels, got dtype {arr.dtype}")


def _scores(name: str, x: Any) -> np.ndarray:
    """A 1-D float64 array of finite scores."""
    arr = _to_1d(name, x)
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _check_lengths(**arrays: np.ndarray) -> None:
    (first, a), *rest = arrays.items()
    for name, b in rest:
        if len(b) != len(a):
            raise ValueError(f"{first} has {len(a)} elements but {name} has {len(b)}")


def _check_num_known(num_known: int) -> int:
    if isinstance(num_known, bool) or not isinstance(num_known, (int, np.integer)):
        raise ValueError(f"num_known must be an int, got {type(num_known).__name__}")
    if num_known < 1:
        raise ValueError(f"num_known must be >= 1, got {num_known}")
    return int(num_known)


def _check_true(y_true: np.ndarray, num_known: int) -> None:
    if y_true.max() >= num_known:
        raise ValueError(
            f"y_true has label {int(y_true.max())} >= num_known={num_known}; "
            "known classes are 0..num_known-1 and unknown samples must be labelled -1"
        )


def _check_range(name: str, y: np.ndarray, low: int, high: int, what: str) -> None:
    if y.min() < low or y.max() > high:
        raise ValueError(
            f"{name} values must lie in {low}..{high} ({what}), "
            f"got min {int(y.min())} and max {int(y.max())}"
        )


def _open_set_inputs(y_true: Any, y_pred: Any, num_known: int) -> tuple[np.ndarray, np.ndarray]:
    num_known = _check_num_known(num_known)
    t, p = _labels("y_true", y_true), _labels("y_pred", y_pred)
    _check_lengths(y_true=t, y_pred=p)
    _check_true(t, num_known)
    _check_range("y_pred", p, 0, num_known, f"{num_known} = unknown")
    return t, p


def acc_known(y_true: Any, y_pred: Any, *, num_known: int) -> float:
    """Accuracy of the (C+1)-way prediction on known samples; predicting "unknown" is wrong.

    Example:
        >>> acc_known([0, 1, 2, 2, -1], [0, 1, 3, 3, 3], num_known=3)
        0.5
    """
    t, p = _open_set_inputs(y_true, y_pred, num_known)
    known = t >= 0
    if not known.any():
        return NAN
    return float(np.mean(p[known] == t[known]))


def acc_unknown(y_true: Any, y_pred: Any, *, num_known: int) -> float:
    """Fraction of unknown samples (``y_true < 0``) predicted as "unknown" (``num_known``)."""
    t, p = _open_set_inputs(y_true, y_pred, num_known)
    unknown = t < 0
    if not unknown.any():
        return NAN
    return float(np.mean(p[unknown] == num_known))


def acc_unknown_by_group(
    y_pred: Any,
    class_names: Sequence[str],
    groups: Mapping[str, Sequence[str]],
    *,
    num_known: int,
) -> dict[str, float]:
    """:func:`acc_unknown` within each named group of unknown classes (by class name).

    Args:
        y_pred: open-set predictions (``num_known`` = "unknown").
        class_names: the true class name of every sample.
        groups: group name -> its unknown class names, e.g. ``{"hard": ("Q", "F")}``.
        num_known: C.

    Returns:
        ``{"acc_unknown_<group>": rate}``; ``nan`` for a group without samples.

    Example:
        >>> acc_unknown_by_group([2, 0, 2, 1], ["Q", "Q", "two", "B"],
        ...                      {"hard": ["Q"], "easy": ["two"]}, num_known=2)
        {'acc_unknown_hard': 0.5, 'acc_unknown_easy': 1.0}
    """
    num_known = _check_num_known(num_known)
    p = _labels("y_pred", y_pred)
    names = np.asarray(list(class_names), dtype=object)
    _check_lengths(y_pred=p, class_names=names)
    _check_range("y_pred", p, 0, num_known, f"{num_known} = unknown")
    out = {}
    for group, members in groups.items():
        mask = np.isin(names, list(members))
        out[f"acc_unknown_{group}"] = float(np.mean(p[mask] == num_known)) if mask.any() else NAN
    return out


def h_score(y_true: Any, y_pred: Any, *, num_known: int) -> float:
    """Harmonic mean of :func:`acc_known` and :func:`acc_unknown`; 0.0 when both are 0."""
    a = acc_known(y_true, y_pred, num_known=num_known)
    b = acc_unknown(y_true, y_pred, num_known=num_known)
    if math.isnan(a) or math.isnan(b):
        return NAN
    if a + b == 0:
        return 0.0
    return 2 * a * b / (a + b)


def closed_set_acc(y_true: Any, y_pred_closed: Any) -> float:
    """Accuracy of the closed-set (C-way argmax) prediction over known samples only."""
    t, p = _labels("y_true", y_true), _labels("y_pred_closed", y_pred_closed)
    _check_lengths(y_true=t, y_pred_closed=p)
    if p.min() < 0:
        raise ValueError(f"y_pred_closed values must be >= 0, got min {int(p.min())}")
    known = t >= 0
    if not known.any():
        return NAN
    return float(np.mean(p[known] == t[known]))


def auroc(y_true: Any, unknown_score: Any) -> float:
    """Known-vs-unknown AUROC, unknown as the positive class (sklearn ``roc_auc_score``)."""
    t, s = _labels("y_true", y_true), _scores("unknown_score", unknown_score)
    _check_lengths(y_true=t, unknown_score=s)
    unknown = t < 0
    if unknown.all() or not unknown.any():
        return NAN
    return float(roc_auc_score(unknown, s))


def _ranking_inputs(y_true: Any, y_pred_closed: Any, unknown_score: Any):
    """(scores, unknown mask, correct-known mask) checked, or None without knowns or unknowns."""
    t = _labels("y_true", y_true)
    p = _labels("y_pred_closed", y_pred_closed)
    s = _scores("unknown_score", unknown_score)
    _check_lengths(y_true=t, y_pred_closed=p, unknown_score=s)
    unknown = t < 0
    if unknown.all() or not unknown.any():
        return None
    return s, unknown, (~unknown) & (p == t)


def oscr(y_true: Any, y_pred_closed: Any, unknown_score: Any) -> float:
    """Open-Set Classification Rate: area under CCR vs FPR as the rejection threshold sweeps.

    Confidence is ``-unknown_score``. At threshold ``t``, CCR is the fraction of known
    samples that are correctly classified *and* accepted (confidence >= t); FPR is the
    fraction of unknown samples accepted. Samples with equal scores enter the curve in one
    step (a straight segment), as sklearn's ROC does, so the result does not depend on
    input order; with every known sample correct it equals :func:`auroc`. (ARPL's
    reference code walks samples one at a time, which can differ when scores tie.)

    Example:
        >>> y_true = [0, 1, -1, -1]
        >>> scores = [0.1, 0.5, 0.3, 0.9]
        >>> oscr(y_true, [0, 1, 0, 0], scores)  # all known correct: equals auroc
        0.75
        >>> oscr(y_true, [0, 0, 0, 0], scores)  # the known sample at 0.5 misclassified
        0.5
    """
    inputs = _ranking_inputs(y_true, y_pred_closed, unknown_score)
    if inputs is None:
        return NAN
    s, unknown, correct = inputs
    n_unknown, n_known = int(unknown.sum()), int((~unknown).sum())
    # Lowering the confidence threshold accepts samples in ascending unknown_score; each
    # distinct score value is one step of the curve, so ties move together.
    _, group = np.unique(s, return_inverse=True)
    ccr = np.concatenate([[0.0], np.cumsum(np.bincount(group, weights=correct))]) / n_known
    fpr = np.concatenate([[0.0], np.cumsum(np.bincount(group, weights=unknown))]) / n_unknown
    return float(np.sum(np.diff(fpr) * (ccr[1:] + ccr[:-1]) / 2))


def oracle_h_score(y_true: Any, y_pred_closed: Any, unknown_score: Any) -> float:
    """ORACLE: the best :func:`h_score` over every threshold on ``unknown_score``, chosen
    with the target labels. Not a valid result; it is what DAML's and MEDIC's published H
    computes (docs/protocols.md), offered so users can compare like with like.

    A sample is called unknown when its score is above the threshold, otherwise it keeps its
    closed-set prediction; tied scores move together, and "reject none" and "reject all" are
    candidates.

    Example:
        >>> oracle_h_score([0, 1, -1, -1], [0, 1, 0, 0], [0.1, 0.5, 0.3, 0.9])
        0.6666666666666666
    """
    inputs = _ranking_inputs(y_true, y_pred_closed, unknown_score)
    if inputs is None:
        return NAN
    s, unknown, correct = inputs
    n_unknown, n_known = int(unknown.sum()), int((~unknown).sum())
    # rejecting every score above a threshold: walk distinct scores from the highest down
    values, group = np.unique(-s, return_inverse=True)
    rejected_unknown = np.concatenate([[0.0], np.cumsum(np.bincount(group, weights=unknown))])
    rejected_correct = np.concatenate([[0.0], np.cumsum(np.bincount(group, weights=correct))])
    acc_k = (correct.sum() - rejected_correct) / n_known
    acc_u = rejected_unknown / n_unknown
    with np.errstate(invalid="ignore", divide="ignore"):
        h = np.where(acc_k + acc_u > 0, 2 * acc_k * acc_u / (acc_k + acc_u), 0.0)
    return float(h.max())


def open_set_report(
    y_true: Any,
    y_pred: Any,
    y_pred_closed: Any,
    unknown_score: Any,
    *,
    num_known: int,
) -> dict[str, float]:
    """All six OSDG metrics in one dict, the record the evaluator writes to results.jsonl."""
    num_known = _check_num_known(num_known)
    p_closed = _labels("y_pred_closed", y_pred_closed)
    _check_range("y_pred_closed", p_closed, 0, num_known - 1, "closed-set known classes")
    return {
        "acc_known": acc_known(y_true, y_pred, num_known=num_known),
        "acc_unknown": acc_unknown(y_true, y_pred, num_known=num_known),
        "h_score": h_score(y_true, y_pred, num_known=num_known),
        "closed_set_acc": closed_set_acc(y_true, p_closed),
        "auroc": auroc(y_true, unknown_score),
        "oscr": oscr(y_true, p_closed, unknown_score),
    }
