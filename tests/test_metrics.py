"""Tests for seeclip.metrics: hand-computed values and comparisons with sklearn."""

from __future__ import annotations

import doctest
import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import seeclip.metrics as M
from seeclip.metrics import (
    acc_known,
    acc_unknown,
    auroc,
    closed_set_acc,
    h_score,
    open_set_report,
    oscr,
)

# C = 3 known classes; 4 known samples and 3 unknown ones.
Y_TRUE = [0, 1, 2, 2, -1, -1, -1]
# Known: 0 ok, 1 ok, 2 -> "unknown" (3), 2 -> 1 wrong  => acc_known 2/4
# Unknown: 3 ok, 0 wrong, 3 ok                          => acc_unknown 2/3
Y_PRED = [0, 1, 3, 1, 3, 0, 3]
# Closed-set: 0 ok, 1 ok, 2 ok, 1 wrong                 => closed_set_acc 3/4
Y_CLOSED = [0, 1, 2, 1, 0, 2, 1]
SCORES = [0.1, 0.2, 0.7, 0.3, 0.6, 0.4, 0.9]


def random_case(seed: int, n: int = 60, num_known: int = 4, decimals: int | None = None):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(-1, num_known, size=n)
    y_true[:2] = [0, -1]  # both groups always present
    score = rng.normal(size=n) + (y_true < 0)
    if decimals is not None:
        score = np.round(score, decimals)
    return y_true, score


# --- hand-computed values ---------------------------------------------------------------


def test_acc_known_hand():
    assert acc_known(Y_TRUE, Y_PRED, num_known=3) == pytest.approx(0.5)


def test_acc_unknown_hand():
    assert acc_unknown(Y_TRUE, Y_PRED, num_known=3) == pytest.approx(2 / 3)


def test_h_score_hand():
    a, b = 0.5, 2 / 3
    assert h_score(Y_TRUE, Y_PRED, num_known=3) == pytest.approx(2 * a * b / (a + b))
    assert h_score(Y_TRUE, Y_PRED, num_known=3) == pytest.approx(4 / 7)


def test_closed_set_acc_hand_ignores_unknowns():
    assert closed_set_acc(Y_TRUE, Y_CLOSED) == pytest.approx(0.75)


def test_auroc_hand():
    # unknown scores 0.6, 0.4, 0.9 vs known 0.1, 0.2, 0.7, 0.3: pairs won 3 + 3 + 4 = 10 of 12
    assert auroc(Y_TRUE, SCORES) == pytest.approx(10 / 12)
    assert auroc(Y_TRUE, SCORES) == pytest.approx(roc_auc_score(np.array(Y_TRUE) < 0, SCORES))


def test_oscr_hand():
    # Ascending score: 0.1 k-ok, 0.2 k-ok, 0.3 k-wrong, 0.4 u, 0.6 u, 0.7 k-ok, 0.9 u.
    # CCR reaches 2/4 before any unknown, then 3/4 after the second unknown:
    # area = 1/3 * 1/2 + 1/3 * 1/2 + 1/3 * 3/4 = 7/12
    assert oscr(Y_TRUE, Y_CLOSED, SCORES) == pytest.approx(7 / 12)


def test_open_set_report_hand():
    report = open_set_report(Y_TRUE, Y_PRED, Y_CLOSED, SCORES, num_known=3)
    assert list(report) == [
        "acc_known",
        "acc_unknown",
        "h_score",
        "closed_set_acc",
        "auroc",
        "oscr",
    ]
    assert all(type(v) is float for v in report.values())
    expected = [0.5, 2 / 3, 4 / 7, 0.75, 10 / 12, 7 / 12]
    assert list(report.values()) == pytest.approx(expected)


def test_perfect_predictions():
    y_true = [0, 1, -1, -1]
    assert acc_known(y_true, [0, 1, 2, 2], num_known=2) == 1.0
    assert acc_unknown(y_true, [0, 1, 2, 2], num_known=2) == 1.0
    assert h_score(y_true, [0, 1, 2, 2], num_known=2) == 1.0
    assert oscr(y_true, [0, 1, 0, 0], [0.0, 0.1, 0.8, 0.9]) == 1.0


def test_any_negative_label_is_unknown():
    assert acc_unknown([0, -1, -5], [0, 2, 2], num_known=2) == 1.0
    assert auroc([0, -1, -7], [0.1, 0.5, 0.9]) == 1.0


def test_accepts_numpy_and_torch():
    torch = pytest.importorskip("torch")
    t = torch.tensor(Y_TRUE)
    p = torch.tensor(Y_PRED)
    s = torch.tensor(SCORES, requires_grad=True)
    assert acc_known(t, p, num_known=3) == pytest.approx(0.5)
    assert auroc(t, s) == pytest.approx(10 / 12)
    assert oscr(np.array(Y_TRUE), np.array(Y_CLOSED), s) == pytest.approx(7 / 12)
    assert acc_known(np.array(Y_TRUE, dtype=float), Y_PRED, num_known=3) == pytest.approx(0.5)


# --- h-score and degenerate inputs ---------------------------------------------------------


def test_h_score_zero_when_both_zero():
    # known predicted unknown, unknown predicted known
    assert h_score([0, 1, -1], [2, 2, 0], num_known=2) == 0.0


def test_h_score_zero_when_one_zero():
    assert h_score([0, 1, -1], [0, 1, 0], num_known=2) == 0.0


def test_no_unknowns_gives_nan_without_warnings():
    y_true, y_pred, scores = [0, 1, 1], [0, 1, 2], [0.1, 0.2, 0.3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = open_set_report(y_true, y_pred, [0, 1, 0], scores, num_known=2)
    assert report["acc_known"] == pytest.approx(2 / 3)
    assert report["closed_set_acc"] == pytest.approx(2 / 3)
    for key in ("acc_unknown", "h_score", "auroc", "oscr"):
        assert math.isnan(report[key]), key


def test_no_knowns_gives_nan_without_warnings():
    y_true, y_pred, scores = [-1, -1, -1], [2, 0, 2], [0.1, 0.2, 0.3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = open_set_report(y_true, y_pred, [0, 1, 0], scores, num_known=2)
    assert report["acc_unknown"] == pytest.approx(2 / 3)
    for key in ("acc_known", "closed_set_acc", "h_score", "auroc", "oscr"):
        assert math.isnan(report[key]), key


# --- validation -------------------------------------------------------------------------------


def test_empty_raises():
    with pytest.raises(ValueError, match="y_true is empty"):
        acc_known([], [], num_known=2)
    with pytest.raises(ValueError, match="empty"):
        auroc([], [])
    with pytest.raises(ValueError, match="empty"):
        oscr([], [], [])


def test_length_mismatch_names_both_lengths():
    with pytest.raises(ValueError, match="y_true has 3 elements but y_pred has 2"):
        acc_known([0, 1, -1], [0, 1], num_known=2)
    with pytest.raises(ValueError, match="y_true has 2 elements but unknown_score has 3"):
        auroc([0, -1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="y_true has 2 elements but y_pred_closed has 1"):
        oscr([0, -1], [0], [0.1, 0.2])
    with pytest.raises(ValueError, match="y_true has 2 elements but unknown_score has 1"):
        oscr([0, -1], [0, 0], [0.1])
    with pytest.raises(ValueError, match="y_true has 2 elements but y_pred_closed has 3"):
        closed_set_acc([0, -1], [0, 0, 0])


def test_y_pred_out_of_range_raises():
    with pytest.raises(ValueError, match=r"y_pred values must lie in 0\.\.2.*max 3"):
        acc_known([0, 1, -1], [0, 1, 3], num_known=2)
    with pytest.raises(ValueError, match=r"y_pred values must lie in 0\.\.2.*min -1"):
        acc_unknown([0, 1, -1], [0, 1, -1], num_known=2)
    with pytest.raises(ValueError, match=r"y_pred_closed values must lie in 0\.\.1"):
        open_set_report([0, -1], [0, 2], [0, 2], [0.1, 0.2], num_known=2)
    with pytest.raises(ValueError, match="y_pred_closed values must be >= 0"):
        closed_set_acc([0, -1], [0, -1])


def test_y_true_label_at_num_known_raises():
    # A common mistake: unknowns labelled C instead of -1.
    with pytest.raises(ValueError, match="must be labelled -1"):
        acc_known([0, 1, 2], [0, 1, 2], num_known=2)


def test_other_invalid_inputs_raise():
    with pytest.raises(ValueError, match="num_known must be >= 1"):
        acc_known([0], [0], num_known=0)
    with pytest.raises(ValueError, match="must be 1-D"):
        auroc([[0, -1]], [[0.1, 0.2]])
    with pytest.raises(ValueError, match="integer labels"):
        closed_set_acc([0.5, 1.0], [0, 1])
    with pytest.raises(ValueError, match="NaN or infinite"):
        auroc([0, -1], [0.1, float("nan")])


# --- comparisons with sklearn and OSCR properties ------------------------------------------


@pytest.mark.parametrize("decimals", [None, 1, 0])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_auroc_matches_sklearn_with_ties(seed, decimals):
    y_true, score = random_case(seed, decimals=decimals)
    expected = roc_auc_score(y_true < 0, score)
    assert auroc(y_true, score) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("decimals", [None, 1, 0])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_oscr_equals_auroc_when_all_known_correct(seed, decimals):
    y_true, score = random_case(seed, decimals=decimals)
    y_closed = np.where(y_true >= 0, y_true, 0)
    expected = roc_auc_score(y_true < 0, score)
    assert oscr(y_true, y_closed, score) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_oscr_zero_when_all_known_wrong(seed):
    y_true, score = random_case(seed, num_known=4, decimals=1)
    y_closed = np.where(y_true >= 0, (y_true + 1) % 4, 0)
    assert oscr(y_true, y_closed, score) == 0.0


def test_oscr_tie_is_a_diagonal_segment():
    # A correct known and an unknown with the same score: one step from (0, 0) to (1, 1).
    # Tie-unaware sweeps would give 1.0 (known first) or 0.0 (unknown first).
    assert oscr([0, -1], [0, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert oscr([-1, 0], [0, 0], [0.5, 0.5]) == pytest.approx(0.5)
    # Curve (0,0) -> (0,1/2) -> tie group -> (1/2,1) -> (1,1): 1/2 * 3/4 + 1/2 * 1 = 7/8.
    assert oscr([0, 0, -1, -1], [0, 0, 0, 0], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(7 / 8)
    assert oscr([-1, 0, -1, 0], [0, 0, 0, 0], [0.5, 0.5, 0.9, 0.1]) == pytest.approx(7 / 8)


def test_oscr_invariant_to_order():
    y_true, score = random_case(5, decimals=1)
    y_closed = np.where(np.arange(len(y_true)) % 3 == 0, 0, np.maximum(y_true, 0))
    perm = np.random.default_rng(0).permutation(len(y_true))
    assert oscr(y_true[perm], y_closed[perm], score[perm]) == pytest.approx(
        oscr(y_true, y_closed, score), abs=1e-12
    )


def test_oscr_monotone_in_correctness():
    y_true, score = random_case(7, decimals=1)
    y_closed = np.where(y_true >= 0, (y_true + 1) % 4, 0)  # all known wrong
    values = [oscr(y_true, y_closed, score)]
    for i in np.random.default_rng(1).permutation(np.flatnonzero(y_true >= 0)):
        y_closed[i] = y_true[i]
        values.append(oscr(y_true, y_closed, score))
    assert values[0] == 0.0
    assert np.all(np.diff(values) >= -1e-12)
    assert values[-1] == pytest.approx(roc_auc_score(y_true < 0, score), abs=1e-12)


def test_oscr_bounded_by_closed_set_acc():
    y_true, score = random_case(3, decimals=1)
    y_closed = np.where(np.arange(len(y_true)) % 2 == 0, np.maximum(y_true, 0), 1)
    assert 0.0 <= oscr(y_true, y_closed, score) <= closed_set_acc(y_true, y_closed) + 1e-12


def test_doctests():
    result = doctest.testmod(M, verbose=False)
    assert result.attempted >= 3
    assert result.failed == 0
