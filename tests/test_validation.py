"""LODO validation on the sources: folds by class name, the calibrated threshold, and a run that
never touches the target domain."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from seeclip.cli import main
from seeclip.config import apply_overrides
from seeclip.datasets import get_benchmark, make_split
from seeclip.features import Prediction
from seeclip.run_config import RunConfig
from seeclip.validation import (
    LodoSettings,
    apply_threshold,
    fit_threshold,
    held_out_thresholds,
    lodo_folds,
    run_lodo,
)


def test_full_folds_hold_out_known_classes_by_name_and_never_use_the_target():
    split = make_split(get_benchmark("glyphs"), "full", "handwritten")
    folds = lodo_folds(split, LodoSettings(held_out=0.25, class_splits=2, seed=0))
    assert [(f.pseudo_target, f.class_split) for f in folds] == [
        (d, j) for d in ("printed", "outline", "textured") for j in (0, 1)
    ]
    for f in folds:
        s = f.split
        assert s.target == f.pseudo_target and f.pseudo_target not in s.source_domains
        assert "handwritten" not in (*s.source_domains, s.target)
        assert len(f.held_out) == 3 and set(f.held_out) <= set(split.known)  # 12 known x 0.25
        assert s.unknown == f.held_out and set(s.known) == set(split.known) - set(f.held_out)
        assert list(s.known) == [c for c in split.known if c in s.known]  # label order kept
        assert all(set(v) == set(s.known) for v in s.source_classes.values())
        assert not set(s.unknown) & set(split.unknown)  # the real unknowns stay unseen
    assert folds[0].held_out != folds[1].held_out
    again = lodo_folds(split, LodoSettings(held_out=0.25, class_splits=2, seed=0))
    assert [f.held_out for f in again] == [f.held_out for f in folds]
    other = lodo_folds(split, LodoSettings(held_out=0.25, class_splits=2, seed=1))
    assert [f.held_out for f in other] != [f.held_out for f in folds]


def test_daml_folds_count_a_pseudo_targets_untrained_classes_as_unknown():
    split = make_split(get_benchmark("digits"), "daml", "outline")
    folds = lodo_folds(split, LodoSettings(held_out=0.3, class_splits=3))
    by_target = {}
    for f in folds:
        by_target.setdefault(f.pseudo_target, []).append(f)
    # handwritten {zero, one, two} vs the others' {two..six}: zero and one are unknown anyway,
    # two is its only shared class and stays known; the three class splits are one fold
    (hw,) = by_target["handwritten"]
    assert hw.held_out == () and hw.split.unknown == ("zero", "one")
    assert hw.split.target_known == ("two",) and hw.split.known == (
        "two",
        "three",
        "four",
        "five",
        "six",
    )
    # printed {two, three, four}: three is untrained (unknown anyway), and one of the shared
    # two and four (round(0.3 x 2) = 1) is held out per split; both splits occur
    for f in by_target["printed"]:
        assert len(f.held_out) == 1 and f.held_out[0] in ("two", "four")
        assert set(f.split.unknown) == {"three", *f.held_out}
        assert set(f.split.target_known) == {"two", "four"} - set(f.held_out)
        assert "three" not in f.split.known
    assert {f.held_out for f in by_target["printed"]} == {("two",), ("four",)}


def test_fit_threshold_picks_the_best_mean_fold_h_and_apply_uses_the_closed_prediction():
    y = np.array([0, 1, 0, -1, -1])
    closed = np.array([0, 1, 0, 0, 1])
    score = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    pred = Prediction(closed, closed, score)
    # any threshold in [0.3, 0.8) gives H = 1; 0.2 rejects a known (H 0.8); the first is kept
    thr = fit_threshold([(y, pred, 2), (y, pred, 2)])
    assert 0.3 <= thr < 0.8
    out = apply_threshold(pred, thr, 2)
    np.testing.assert_array_equal(out.y_pred, [0, 1, 0, 2, 2])
    np.testing.assert_array_equal(out.y_pred_closed, closed)
    with pytest.raises(ValueError, match="held_out"):
        LodoSettings(held_out=1.0)


def _hand_h(y, closed, score, thr, c) -> float:
    """H by hand: harmonic mean of the known accuracy and the unknown rejection rate, when
    every score above ``thr`` is called unknown (class c)."""
    called = [c if s > thr else int(p) for p, s in zip(closed, score, strict=True)]
    known = [called[i] == y[i] for i in range(len(y)) if y[i] >= 0]
    unknown = [called[i] == c for i in range(len(y)) if y[i] < 0]
    a, b = sum(known) / len(known), sum(unknown) / len(unknown)
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def _best_interval(folds) -> tuple[float, float]:
    """Brute force: every threshold between two pooled scores gives the same decisions, so
    scan the pooled scores; the lowest interval [s_i, s_i+1) with the best mean fold H."""
    pooled = sorted({float(s) for _, p, _ in folds for s in p.unknown_score})
    mean_h = [
        np.mean([_hand_h(y, p.y_pred_closed, p.unknown_score, thr, c) for y, p, c in folds])
        for thr in pooled
    ]
    i = int(np.argmax(mean_h))  # the first of equals
    return pooled[i], pooled[i + 1] if i + 1 < len(pooled) else np.inf


def test_held_out_thresholds_are_fitted_on_the_other_folds_only():
    y = np.array([0, 1, 0, -1, -1])
    closed = np.array([0, 1, 0, 0, 1])
    score = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    a = (y, Prediction(closed, closed, score), 2)  # H = 1 for thresholds in [0.3, 0.8)
    b = (y, Prediction(closed, closed, score + 10), 2)  # H = 1 in [10.3, 10.8)
    # fold 0 is fitted on b, b; folds 1 and 2 on a, b, a tie (mean H 1/2) whose lower
    # interval wins. Fitted on all three folds, every threshold would be in b's interval.
    folds = [a, b, b]
    expected = [(10.3, 10.8), (0.3, 0.8), (0.3, 0.8)]
    for k, (thr, (low, high)) in enumerate(zip(held_out_thresholds(folds), expected, strict=True)):
        others = [f for i, f in enumerate(folds) if i != k]
        assert _best_interval(others) == pytest.approx((low, high))
        assert low <= thr < high, (k, thr)
        best = np.mean(
            [_hand_h(y_, p.y_pred_closed, p.unknown_score, low, c) for y_, p, c in others]
        )
        got = np.mean(
            [_hand_h(y_, p.y_pred_closed, p.unknown_score, thr, c) for y_, p, c in others]
        )
        assert got == best
    assert _best_interval(folds) == pytest.approx((10.3, 10.8))  # what leaking would give
    # two folds: each is fitted on the other alone; one fold: on itself
    for k, thr in enumerate(held_out_thresholds([a, b])):
        low, high = _best_interval([[a, b][1 - k]])
        assert low <= thr < high
    (thr,) = held_out_thresholds([b])
    assert 10.3 <= thr < 10.8


def _metrics_by_hand(y, y_pred, closed, score, c) -> dict[str, float]:
    """The six fold metrics from their definitions: accuracies and H by counting, AUROC by
    sklearn, OSCR as the trapezoid area of (FPR, CCR) over every distinct score."""
    from sklearn.metrics import accuracy_score, roc_auc_score

    known, unknown = y >= 0, y < 0
    acc_k = accuracy_score(y[known], y_pred[known])
    acc_u = float(np.mean(y_pred[unknown] == c))
    points = [(0.0, 0.0)]
    for t in sorted(set(score.tolist())):  # accept every sample whose score is <= t
        accepted = score <= t
        points.append(
            (
                np.sum(accepted & unknown) / unknown.sum(),
                np.sum(accepted & known & (closed == y)) / known.sum(),
            )
        )
    oscr = sum(
        (x1 - x0) * (c0 + c1) / 2
        for (x0, c0), (x1, c1) in zip(points[:-1], points[1:], strict=True)
    )
    return {
        "acc_known": acc_k,
        "acc_unknown": acc_u,
        "h_score": 0.0 if acc_k + acc_u == 0 else 2 * acc_k * acc_u / (acc_k + acc_u),
        "closed_set_acc": accuracy_score(y[known], closed[known]),
        "auroc": roc_auc_score(unknown, score),
        "oscr": oscr,
    }


def _small_digits(tmp_path, monkeypatch, *, remove: str | None = None):
    monkeypatch.setenv("SEECLIP_HOME", str(tmp_path / "home"))
    assert main(["prepare", "digits", "--n-per-class", "5", "--no-progress"]) == 0
    if remove is not None:
        tree = tmp_path / "home" / "data" / "digits"
        gone = [p for p in tree.rglob("*") if p.is_dir() and p.name == remove]
        assert gone
        for p in gone:
            shutil.rmtree(p)  # the target's images are absent: validation must not need them


def test_lodo_runs_without_the_target_images_and_opens_none(tmp_path, monkeypatch):
    from PIL import Image

    _small_digits(tmp_path, monkeypatch, remove="outline")
    opened = []
    real_open = Image.open

    def spy(fp, *a, **k):
        opened.append(str(fp))
        return real_open(fp, *a, **k)

    monkeypatch.setattr(Image, "open", spy)
    import seeclip.validation

    predictions = []  # each fold's labels and predictions, as they go into its report
    report_of = seeclip.validation.metrics.open_set_report

    def keep(y, y_pred, y_pred_closed, unknown_score, *, num_known):
        arrays = (y, y_pred, y_pred_closed, unknown_score)
        predictions.append((*(np.array(a, copy=True) for a in arrays), num_known))
        return report_of(y, y_pred, y_pred_closed, unknown_score, num_known=num_known)

    monkeypatch.setattr(seeclip.validation.metrics, "open_set_report", keep)
    cfg = apply_overrides(
        RunConfig(),
        [
            "data.benchmark=digits",
            "data.target=outline",
            "backbone.name=tiny-digits",
            "method=coop",
            "train.epochs=1",
            "train.batch_size=6",
        ],
    )
    report = run_lodo(cfg, LodoSettings(class_splits=1), progress=False)
    assert opened and not any("outline" in p for p in opened)
    assert [f["pseudo_target"] for f in report["folds"]] == ["handwritten", "printed", "textured"]
    assert len(predictions) == len(report["folds"])
    for f, (y, y_pred, closed, score, c) in zip(report["folds"], predictions, strict=True):
        assert len(f["held_out"]) == 2 and f["n_known"] > 0 and f["n_unknown"] > 0  # 6 x 0.3
        assert f["n_known"] == (y >= 0).sum() and f["n_unknown"] == (y < 0).sum()
        assert c == 6 - 2 and set(y[y >= 0]) <= set(range(c))
        # every fold metric recomputed from the fold's predictions, by hand and by sklearn
        expected = _metrics_by_hand(y, y_pred, closed, score, c)
        for name, want in expected.items():
            assert f[name] == pytest.approx(want, abs=1e-12), name
        thr = f["threshold_lodo_threshold"]
        assert f["h_score_lodo_threshold"] == pytest.approx(_hand_h(y, closed, score, thr, c))
    hs = [f["h_score"] for f in report["folds"]]
    assert report["mean"]["h_score"] == pytest.approx(np.mean(hs))
    assert report["std"]["h_score"] == pytest.approx(np.std(hs))
    assert report["target_left_out"] == "outline" and report["rule"] == "lodo_threshold"
    assert all(0 <= f["h_score_lodo_threshold"] <= 1 for f in report["folds"])


@pytest.mark.slow
def test_train_validate_lodo_records_the_rule_and_reuses_the_folds(tmp_path, monkeypatch, capsys):
    _small_digits(tmp_path, monkeypatch)
    args = [
        "train",
        "--config",
        "configs/digits.yaml",
        "--target",
        "printed",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--no-progress",
        "--validate",
        "lodo",
        "--class-splits",
        "1",
        "backbone.name=tiny-digits",
        "method=seeclip",
        "train.epochs=1",
        "train.pseudo_unknowns=mixup",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "LODO on the sources, 3 folds" in out
    (run_dir,) = [p.parent for p in (tmp_path / "runs").rglob("validation.json")]
    record = json.loads((run_dir / "results.jsonl").read_text().splitlines()[-1])
    rule = record["rules"]["lodo_threshold"]
    assert rule["threshold"] == record["validation"]["threshold"]
    with np.load(run_dir / "predictions.npz") as z:
        c = len(z["known_classes"])
        y_pred = np.where(z["unknown_score"] > rule["threshold"], c, z["y_pred_closed"])
        y_true = z["y_true"]
    from seeclip import metrics

    assert rule["h_score"] == pytest.approx(metrics.h_score(y_true, y_pred, num_known=c))
    assert record["h_score"] is not None  # the method's own rule is kept alongside
    from seeclip.report import under_rule

    (view,) = under_rule([record], "lodo_threshold")
    assert view["h_score"] == rule["h_score"] and view["method"] == record["method"]
    assert under_rule([record], "validated") == []  # no --grid selection made this run
    import seeclip.validation

    def no_rerun(*a, **k):
        raise AssertionError("the folds were run again")

    monkeypatch.setattr(seeclip.validation, "run_lodo", no_rerun)
    assert main(args) == 0  # a second call reuses the run and its folds
    assert "(finished earlier, reused)" in capsys.readouterr().out
    again = json.loads((run_dir / "results.jsonl").read_text().splitlines()[-1])
    assert again["rules"] == record["rules"]


def test_setting_selection_takes_the_best_mean_fold_h_over_settings_and_rules():
    from seeclip.selection import SETTING_SELECTIONS

    rule = SETTING_SELECTIONS.get("lodo_h")
    reports = {
        "a": {"mean": {"h_score": 0.5, "h_score_lodo_threshold": 0.7}},
        "b": {"mean": {"h_score": 0.72, "h_score_lodo_threshold": None}},
        "c": {"mean": {"h_score": 0.72, "h_score_lodo_threshold": 0.1}},
    }
    assert rule.choose(reports) == ("b", "own", 0.72)  # c ties b: the first declared wins
    reports["a"]["mean"]["h_score_lodo_threshold"] = 0.8
    assert rule.choose(reports) == ("a", "lodo_threshold", 0.8)


def test_grid_files_are_checked(tmp_path):
    from seeclip.config import ConfigError
    from seeclip.validation import load_grid

    good = tmp_path / "g.yaml"
    good.write_text("variants:\n  mixup: [train.pseudo_unknowns=mixup]\n  none: []\n")
    assert load_grid(good) == {"mixup": ("train.pseudo_unknowns=mixup",), "none": ()}
    for text in ("variants: {}\n", "mixup: [a=1]\n", "variants:\n  x: a=1\n"):
        good.write_text(text)
        with pytest.raises(ConfigError):
            load_grid(good)
    with pytest.raises(ConfigError, match="does not exist"):
        load_grid(tmp_path / "missing.yaml")


@pytest.mark.slow
def test_train_grid_chooses_a_setting_on_the_folds_and_records_why(tmp_path, monkeypatch, capsys):
    from seeclip.report import ReportError, summarize

    _small_digits(tmp_path, monkeypatch)
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "variants:\n  mixup: [train.pseudo_unknowns=mixup]\n  none: [train.pseudo_unknowns=none]\n"
    )
    runs = tmp_path / "runs"
    args = [
        "train",
        "--config",
        "configs/digits.yaml",
        "--target",
        "printed",
        "--runs-dir",
        str(runs),
        "--no-progress",
        "--validate",
        "lodo",
        "--class-splits",
        "1",
        "--grid",
        str(grid),
        "backbone.name=tiny-digits",
        "train.epochs=1",
    ]
    assert main(args) == 0
    assert "chosen" in capsys.readouterr().out
    (run_dir,) = [p.parent for p in runs.rglob("done")]
    record = json.loads((run_dir / "results.jsonl").read_text().splitlines()[-1])
    sel = record["setting_selection"]
    assert record["method"] == "seeclip:lodo" and set(sel["grid"]) == {"mixup", "none"}
    scores = [g[k] for g in sel["grid"].values() for k in ("h_score", "h_score_lodo_threshold")]
    assert sel["fold_score"] == max(s for s in scores if s is not None)
    key = "h_score" if sel["operating_rule"] == "own" else "h_score_lodo_threshold"
    assert sel["grid"][sel["chosen"]][key] == sel["fold_score"]
    assert record["config"]["train"]["pseudo_unknowns"] == sel["chosen"]
    assert len(list((runs / "_lodo").glob("*.json"))) == 2  # one fold report per variant
    assert record["validated"]["operating_rule"] == sel["operating_rule"]
    other = dict(record, config_hash="x", setting_hash="y", target="outline")
    # one label, one grid: one method, though the settings differ; a row per target + mean
    table = summarize([record, other], metrics=["h_score", "auroc"])
    rows = [line.strip("|").split("|") for line in table.splitlines()[2:]]
    rows = [[cell.strip() for cell in row] for row in rows]
    cells = ["n/a" if record[m] is None else f"{record[m] * 100:.1f}" for m in ("h_score", "auroc")]
    lead = [record["benchmark"], record["protocol"], "seeclip:lodo"]
    assert rows == [[*lead, target, "1", *cells] for target in ("outline", "printed", "**mean**")]
    with pytest.raises(ReportError, match="two configs"):  # another grid is another setting
        summarize([record, dict(other, selection_hash="z")])
    assert main(["train", "--config", "configs/digits.yaml", "--grid", str(grid)]) == 2
    assert "add --validate lodo" in capsys.readouterr().err
