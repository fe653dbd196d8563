"""Tables from run records (``results.jsonl``), never from logs: mean ± std over seeds."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

METRICS = ("acc_known", "acc_unknown", "h_score", "closed_set_acc", "auroc", "oscr")
HEADERS = {
    "acc_known": "Acc",
    "acc_unknown": "AccU",
    "h_score": "H",
    "closed_set_acc": "Closed",
    "auroc": "AUROC",
    "oscr": "OSCR",
}


def read_records(runs_dir: str | Path) -> list[dict]:
    """Every record of every finished run (folders with a ``done`` marker) under ``runs_dir``."""
    records = []
    for done in sorted(Path(runs_dir).glob("*/*/done")):
        lines = (done.parent / "results.jsonl").read_text().splitlines()
        records.extend(json.loads(line) for line in lines if line.strip())
    return records


def _fmt(values: Sequence[float | None]) -> str:
    vals = np.array([np.nan if v is None else v for v in values], dtype=float) * 100
    if np.all(np.isnan(vals)):
        return "n/a"
    if len(vals) == 1 or np.sum(~np.isnan(vals)) == 1:
        return f"{np.nanmean(vals):.1f}"
    return f"{np.nanmean(vals):.1f} ± {np.nanstd(vals):.1f}"


def summarize(
    records: Iterable[dict], *, metrics: Sequence[str] = METRICS, per_target: bool = True
) -> str:
    """A Markdown table: one row per (method, target) plus each method's mean over targets.

    With several seeds a cell is mean ± std over seeds; the "mean" row first averages over
    targets within each seed, then reports mean ± std of those per-seed averages.
    """
    groups: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        key = (r["benchmark"], r["protocol"], r["method"], r["target"])
        for m in metrics:
            groups[key][m].append(r.get(m))
        groups[key]["seed"].append(r["seed"])
    lines = [
        "| benchmark | protocol | method | target | seeds | "
        + " | ".join(HEADERS[m] for m in metrics)
        + " |",
        "|" + "---|" * (5 + len(metrics)),
    ]
    by_method: dict[tuple, list] = defaultdict(list)
    for key in sorted(groups):
        g = groups[key]
        by_method[key[:3]].append(g)
        if not per_target:
            continue
        lines.append(
            f"| {' | '.join(key)} | {len(g['seed'])} | "
            + " | ".join(_fmt(g[m]) for m in metrics)
            + " |"
        )
    for key, targets in sorted(by_method.items()):
        if len(targets) < 2 and per_target:
            continue
        cells = []
        for m in metrics:
            per_seed: dict[int, list] = defaultdict(list)
            for g in targets:
                for seed, v in zip(g["seed"], g[m], strict=True):
                    per_seed[seed].append(np.nan if v is None else v)
            means = [
                np.nan if np.all(np.isnan(v)) else float(np.nanmean(v)) for v in per_seed.values()
            ]
            cells.append(_fmt(means))
        lines.append(
            f"| {' | '.join(key)} | **mean** | {len(per_seed)} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)
