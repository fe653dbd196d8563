"""Where a method's unknown scores fall on the target (docs/results.md: why a row almost never
says "unknown" on one target), from the finished runs' saved predictions.

    python scripts/unknown_scores.py --runs-dir runs/glyphs_v3 --protocol daml \
        --methods seeclip seeclip_mixup seeclip_feature_diffusion

Per (method, target), mean over the seeds found: the median unknown score of the target's known
and unknown samples and of fresh draws of the run's own pseudo-unknowns; the share of target
unknowns and knowns the method's own rule rejects (the argmax over C+1 for SeeCLIP and
``coop_unknown``, the source-data threshold for the baselines without an unknown prompt) and
the share the threshold calibrated on the source folds rejects (``lodo_threshold``, validated
runs only); AUROC. Every number is read from the records and ``predictions.npz``; nothing is
trained, and nothing here chooses a setting.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from seeclip import metrics
from seeclip.features import Prediction
from seeclip.report import dedupe, read_records
from seeclip.report_files import load_predictions
from seeclip.validation import apply_threshold

COLUMNS = (
    "median score known",
    "median score unknown",
    "median score pseudo-unknown",
    "own rule rejects unknown %",
    "own rule rejects known %",
    "lodo_threshold rejects unknown %",
    "lodo_threshold rejects known %",
    "AUROC",
)


def score_stats(pred: dict[str, np.ndarray], threshold: float | None) -> list[float]:
    """One run's :data:`COLUMNS` (NaN where the run lacks it: no pseudo-unknowns drawn, or not
    validated). The calibrated rule is applied by :func:`seeclip.validation.apply_threshold`,
    as at evaluation."""
    unknown = pred["y_true"] < 0
    score, num_known = pred["unknown_score"], len(pred["known_classes"])
    pseudo = pred.get("pseudo_unknown_score")

    def rejects(y_pred: np.ndarray | None) -> list[float]:  # % of unknowns, % of knowns
        if y_pred is None:
            return [np.nan, np.nan]
        rejected = y_pred == num_known
        return [100 * rejected[unknown].mean(), 100 * rejected[~unknown].mean()]

    calibrated = None
    if threshold is not None:
        own = Prediction(pred["y_pred"], pred["y_pred_closed"], score)
        calibrated = apply_threshold(own, threshold, num_known).y_pred
    return [
        float(np.median(score[~unknown])),
        float(np.median(score[unknown])),
        float(np.median(pseudo)) if pseudo is not None else np.nan,
        *rejects(pred["y_pred"]),
        *rejects(calibrated),
        100 * metrics.auroc(pred["y_true"], score),
    ]


def table(records: list[dict], runs_dir: str | Path) -> str:
    """Markdown: one row per (method, target), :data:`COLUMNS` averaged over seeds."""
    rows: dict[tuple[str, str], list[list[float]]] = defaultdict(list)
    for r in records:
        pred = load_predictions(runs_dir, r)
        if pred is None:
            continue
        threshold = (r.get("rules", {}).get("lodo_threshold") or {}).get("threshold")
        rows[(r["method"], r["target"])].append(score_stats(pred, threshold))
    head = ["method", "target", "runs", *COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (method, target), stats in sorted(rows.items()):
        cells = []
        for i, column in enumerate(np.array(stats, dtype=float).T):
            kept = column[~np.isnan(column)]  # a column a run lacks is "-", not a warning
            cells.append("-" if not kept.size else f"{kept.mean():.{3 if i < 3 else 1}f}")
        lines.append("| " + " | ".join([method, target, str(len(stats)), *cells]) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", required=True)
    p.add_argument("--protocol", help="only this protocol (default: all)")
    p.add_argument("--methods", nargs="+", help="only these variant labels (default: all)")
    p.add_argument("--targets", nargs="+", help="only these targets (default: all)")
    args = p.parse_args()
    records = [
        r
        for r in dedupe(read_records(args.runs_dir))
        if (args.protocol is None or r["protocol"] == args.protocol)
        and (args.methods is None or r["method"] in args.methods)
        and (args.targets is None or r["target"] in args.targets)
    ]
    if not records:
        raise SystemExit(
            f"no finished runs match under {args.runs_dir}; check --runs-dir, "
            f"--protocol, --methods and --targets"
        )
    print(table(records, args.runs_dir))


if __name__ == "__main__":
    main()
