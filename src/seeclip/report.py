"""Tables from run records (``results.jsonl``), never from logs: mean ± std over seeds.

DomainBed's ``collect_results`` discipline: a table is built from final records only, one per
run (config and seed); a row is one setting (config without seed and target) and its cells
count distinct seeds. A label that stands for two different settings is an error, never an
average of the two.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seeclip.records import FINAL, final_record

METRICS = ("acc_known", "acc_unknown", "h_score", "closed_set_acc", "auroc", "oscr")
# shown after AccU when some record has them (benchmarks that name look-alikes, e.g. glyphs)
GROUP_METRICS = ("acc_unknown_hard", "acc_unknown_easy")
HEADERS = {
    "acc_known": "Acc",
    "acc_unknown": "AccU",
    "acc_unknown_hard": "AccU hard",
    "acc_unknown_easy": "AccU easy",
    "h_score": "H",
    "closed_set_acc": "Closed",
    "auroc": "AUROC",
    "oscr": "OSCR",
    "h_score_oracle": "H ORACLE (target-chosen threshold)",
}


class ReportError(ValueError):
    """Records that cannot form one honest table (e.g. one label for two settings)."""


def read_records(runs_dir: str | Path) -> list[dict]:
    """The final record of every finished run (folders with ``done``) under ``runs_dir``."""
    records = []
    for done in sorted(Path(runs_dir).glob("*/*/done")):
        record = final_record(done.parent)
        if record is not None:
            records.append(record)
    return records


def _flatten(d: Mapping, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differing_keys(a: Mapping, b: Mapping) -> list[str]:
    """Dotted config keys whose values differ between two configs (seed and target left out)."""
    fa, fb = _flatten(a), _flatten(b)
    skip = {"seed", "data.target"}
    return sorted(k for k in set(fa) | set(fb) if k not in skip and fa.get(k) != fb.get(k))


def dedupe(records: Iterable[dict]) -> list[dict]:
    """One record per run (config hash): the last one wins. Evaluating a run again adds none."""
    by_run: dict[str, dict] = {}
    for r in records:
        if r.get("kind", FINAL) != FINAL:
            continue
        by_run[r.get("config_hash") or f"{id(r)}"] = r
    return list(by_run.values())


def check_labels(records: Iterable[dict]) -> None:
    """Raise :class:`ReportError` when one (benchmark, protocol, label) has two settings."""
    seen: dict[tuple, dict] = {}
    for r in records:
        key = (r["benchmark"], r["protocol"], r["method"])
        if "setting_hash" not in r:
            continue  # a hand-made or old record: nothing to compare
        first = seen.setdefault(key, r)
        if _setting(first) != _setting(r):
            keys = differing_keys(first.get("config", {}), r.get("config", {}))
            shown = ", ".join(
                f"{k} ({_flatten(first.get('config', {})).get(k)!r} vs "
                f"{_flatten(r.get('config', {})).get(k)!r})"
                for k in keys
            )
            raise ReportError(
                f"label {r['method']!r} ({r['benchmark']}/{r['protocol']}) stands for two "
                f"configs, {first['setting_hash']} and {r['setting_hash']}, which differ in "
                f"{shown or 'fields the records do not show'}; give one a different "
                f"label=... or report one runs folder at a time"
            )


def _setting(record: dict) -> str:
    """What one table row must share: the setting, or for a run chosen by validation the grid
    and rule it was chosen by (the chosen setting may differ between targets and seeds)."""
    return record.get("selection_hash") or record["setting_hash"]


def _fmt(values: Sequence[float | None]) -> str:
    vals = np.array([np.nan if v is None else v for v in values], dtype=float) * 100
    if np.all(np.isnan(vals)):
        return "n/a"
    if len(vals) == 1 or np.sum(~np.isnan(vals)) == 1:
        return f"{np.nanmean(vals):.1f}"
    return f"{np.nanmean(vals):.1f} ± {np.nanstd(vals):.1f}"


def default_metrics(records: Iterable[dict]) -> tuple[str, ...]:
    """:data:`METRICS`, with the hard/easy AccU columns after AccU when any record has them."""
    present = [m for m in GROUP_METRICS if any(r.get(m) is not None for r in records)]
    return METRICS[:2] + tuple(present) + METRICS[2:]


RULES = ("own", "lodo_threshold", "validated")  # which decision rule's metrics a table shows


def under_rule(records: Iterable[dict], rule: str) -> list[dict]:
    """The records with their metrics under ``rule``: ``own`` (the method's, as recorded),
    ``lodo_threshold`` (the threshold calibrated on LODO folds, ``--validate lodo``) or
    ``validated`` (the rule a ``--grid`` selection chose). Records without it are left out."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    if rule == "own":
        return list(records)
    out = []
    for r in records:
        metrics = r.get("validated") if rule == "validated" else r.get("rules", {}).get(rule)
        if metrics:
            out.append({**r, **{k: v for k, v in metrics.items() if k in HEADERS}})
    return out


def summarize(
    records: Iterable[dict], *, metrics: Sequence[str] | None = None, per_target: bool = True
) -> str:
    """A Markdown table: one row per (method, target) plus each method's mean over targets.

    ``metrics=None`` shows :func:`default_metrics`.

    With several seeds a cell is mean ± std over seeds; the "mean" row first averages over
    targets within each seed, then reports mean ± std of those per-seed averages. Each run
    counts once (:func:`dedupe`), and a label with two settings raises :class:`ReportError`.
    """
    records = dedupe(records)
    check_labels(records)
    if metrics is None:
        metrics = default_metrics(records)
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
            f"| {' | '.join(key)} | {len(set(g['seed']))} | "
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


# ------------------------------------------------------------------ the paper's layout (issue 11)


@dataclass(frozen=True)
class Cell:
    """One table cell: mean and std (fractions) over seeds, and how many seeds."""

    mean: float | None
    std: float | None
    seeds: int

    def text(self) -> str:
        if self.mean is None:
            return "n/a"
        if self.seeds < 2 or self.std is None:
            return f"{self.mean * 100:.1f}"
        return f"{self.mean * 100:.1f} ± {self.std * 100:.1f}"


@dataclass(frozen=True)
class Table:
    """Methods x targets (and their mean) for one benchmark, protocol and metric."""

    benchmark: str
    protocol: str
    metric: str
    targets: tuple[str, ...]
    cells: dict[str, dict[str, Cell]]  # method -> target (or "mean") -> cell

    @property
    def title(self) -> str:
        return f"{self.benchmark} / {self.protocol}: {HEADERS.get(self.metric, self.metric)}"

    @property
    def header(self) -> tuple[str, ...]:
        return ("method", *self.targets, "mean")

    def rows(self) -> list[tuple[str, ...]]:
        return [(m, *(c[t].text() for t in (*self.targets, "mean"))) for m, c in
                self.cells.items()]  # fmt: skip


def _cell(values: list[float]) -> Cell:
    vals = np.array([v for v in values if v is not None and not np.isnan(v)], dtype=float)
    if vals.size == 0:
        return Cell(None, None, 0)
    return Cell(float(vals.mean()), float(vals.std()), int(vals.size))


def paper_tables(records: Iterable[dict], metrics: Sequence[str] | None = None) -> list[Table]:
    """One :class:`Table` per (benchmark, protocol, metric), the layout of the paper's tables:
    a row per method, a column per target and the mean over targets. A cell is mean ± std over
    seeds; the mean column averages the targets within each seed first (as :func:`summarize`).
    Methods keep their first-seen order; each run counts once and labels are checked."""
    records = dedupe(records)
    check_labels(records)
    if metrics is None:
        metrics = default_metrics(records)
    groups: dict[tuple[str, str], dict] = {}
    for r in records:
        methods = groups.setdefault((r["benchmark"], r["protocol"]), {})
        per_target = methods.setdefault(r["method"], defaultdict(dict))
        per_target[r["target"]][r["seed"]] = r
    tables = []
    for (bench, protocol), methods in groups.items():
        targets = tuple(sorted({t for m in methods.values() for t in m}))
        for metric in metrics:
            cells: dict[str, dict[str, Cell]] = {}
            for method, per_target in methods.items():
                row = {t: _cell([r.get(metric) for r in per_target.get(t, {}).values()])
                       for t in targets}  # fmt: skip
                seeds = sorted({s for runs in per_target.values() for s in runs})
                complete = [s for s in seeds if all(s in per_target.get(t, {}) for t in targets)]
                means = []
                for s in complete:  # a seed missing a target has no mean over targets
                    vals = [per_target[t][s].get(metric) for t in targets]
                    vals = [v for v in vals if v is not None]
                    means.append(float(np.mean(vals)) if vals else None)
                row["mean"] = _cell(means)
                cells[method] = row
            tables.append(Table(bench, protocol, metric, targets, cells))
    return tables
