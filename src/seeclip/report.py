"""Tables from run records (``results.jsonl``), never from logs: mean ± std over seeds.

DomainBed's ``collect_results`` discipline: a table is built from final records only, one per
run (config and seed); a row is one setting (config without seed and target) and its cells
count distinct seeds. A label that stands for two different settings is an error, never an
average of the two.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seeclip import metrics
from seeclip.records import FINAL, final_record

METRICS = metrics.METRICS
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


# ----------------------------------------------------------------- cells, shared by every table

INCOMPLETE = "†"  # marks a mean over targets that some seeds could not enter


@dataclass(frozen=True)
class Cell:
    """One table cell: mean and std (fractions) over seeds, and how many seeds.

    ``missing`` names the (target, seed) results a mean over targets lacked, e.g.
    ``("t2 seed 1",)``: those seeds are left out of the mean rather than averaged over
    fewer targets, and the cell is marked with :data:`INCOMPLETE`.
    """

    mean: float | None
    std: float | None
    seeds: int
    missing: tuple[str, ...] = ()

    def text(self) -> str:
        mark = f" {INCOMPLETE}" if self.missing else ""
        if self.mean is None:
            return ("incomplete" if self.missing else "n/a") + mark
        if self.seeds < 2 or self.std is None:
            return f"{self.mean * 100:.1f}{mark}"
        return f"{self.mean * 100:.1f} ± {self.std * 100:.1f}{mark}"


def _cell(values: list[float | None], missing: tuple[str, ...] = ()) -> Cell:
    vals = np.array([v for v in values if v is not None and not np.isnan(v)], dtype=float)
    if vals.size == 0:
        return Cell(None, None, 0, missing)
    return Cell(float(vals.mean()), float(vals.std()), int(vals.size), missing)


Runs = dict[str, dict[int, dict]]  # target -> seed -> final record


def mean_over_targets(runs: Runs, targets: Sequence[str], metric: str) -> Cell:
    """Mean ± std over seeds of each seed's mean over ``targets``.

    Only seeds with a value on every target enter; any other seed is named in
    ``Cell.missing`` (a mean of fewer targets is a different quantity, never averaged in).
    """
    seeds = sorted({s for per_seed in runs.values() for s in per_seed})
    means, missing = [], []
    for s in seeds:
        vals = [runs.get(t, {}).get(s, {}).get(metric) for t in targets]
        lacking = [t for t, v in zip(targets, vals, strict=True) if v is None]
        if lacking:
            missing += [f"{t} seed {s}" for t in lacking]
        else:
            means.append(float(np.mean(vals)))
    if not means and all(r.get(metric) is None for p in runs.values() for r in p.values()):
        return Cell(None, None, 0)  # the metric does not exist for this method: n/a, not missing
    return _cell(means, tuple(missing))


def _group_runs(records: Iterable[dict]) -> dict[tuple[str, str], dict[str, Runs]]:
    """(benchmark, protocol) -> method (first-seen order) -> target -> seed -> record.

    Each run counts once (:func:`dedupe`); a label with two settings, or two runs for one
    (method, target, seed), raises :class:`ReportError`.
    """
    records = dedupe(records)
    check_labels(records)
    groups: dict[tuple[str, str], dict[str, Runs]] = {}
    for r in records:
        methods = groups.setdefault((r["benchmark"], r["protocol"]), {})
        per_seed = methods.setdefault(r["method"], {}).setdefault(r["target"], {})
        if r["seed"] in per_seed:
            other = per_seed[r["seed"]]
            raise ReportError(
                f"two runs of {r['method']!r} ({r['benchmark']}/{r['protocol']}) for target "
                f"{r['target']!r} seed {r['seed']}: {other.get('config_hash', '?')} and "
                f"{r.get('config_hash', '?')}; remove one run folder or give one a different "
                f"label=..."
            )
        per_seed[r["seed"]] = r
    return groups


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
        return [(m, *(c[t].text() for t in self.header[1:])) for m, c in self.cells.items()]

    def notes(self) -> list[str]:
        """One line per method whose mean over targets left seeds out (:data:`INCOMPLETE`)."""
        return incomplete_notes({m: c["mean"] for m, c in self.cells.items()})


def incomplete_notes(means: Mapping[str, Cell]) -> list[str]:
    return [
        f"{INCOMPLETE} {name}: mean over the seeds with every target only; missing "
        f"{', '.join(cell.missing)}"
        for name, cell in means.items()
        if cell.missing
    ]


def paper_tables(records: Iterable[dict], metrics: Sequence[str] | None = None) -> list[Table]:
    """One :class:`Table` per (benchmark, protocol, metric), the layout of the paper's tables:
    a row per method, a column per target of the benchmark and protocol, and the mean over
    targets (:func:`mean_over_targets`). A cell is mean ± std over seeds. Methods keep their
    first-seen order; each run counts once and labels are checked."""
    records = list(records)
    if metrics is None:
        metrics = default_metrics(records)
    return _tables(_group_runs(records), metrics)


def _tables(groups: dict[tuple[str, str], dict[str, Runs]], metrics: Sequence[str]) -> list[Table]:
    tables = []
    for (bench, protocol), methods in groups.items():
        targets = tuple(sorted({t for runs in methods.values() for t in runs}))
        for metric in metrics:
            cells = {
                method: {
                    **{
                        t: _cell([r.get(metric) for r in runs.get(t, {}).values()]) for t in targets
                    },
                    "mean": mean_over_targets(runs, targets, metric),
                }
                for method, runs in methods.items()
            }
            tables.append(Table(bench, protocol, metric, targets, cells))
    return tables


def summarize(
    records: Iterable[dict], *, metrics: Sequence[str] | None = None, per_target: bool = True
) -> str:
    """A Markdown table: one row per (method, target) plus each method's mean over targets.

    ``metrics=None`` shows :func:`default_metrics`. A cell is mean ± std over seeds; the
    "mean" row is :func:`mean_over_targets` over every target of its benchmark and protocol,
    the same numbers as :func:`paper_tables`' mean column. Each run counts once
    (:func:`dedupe`), and a label with two settings raises :class:`ReportError`.
    """
    records = list(records)
    if metrics is None:
        metrics = default_metrics(records)
    groups = _group_runs(records)
    tables = {(t.benchmark, t.protocol, t.metric): t for t in _tables(groups, metrics)}
    lines = [
        "| benchmark | protocol | method | target | seeds | "
        + " | ".join(HEADERS[m] for m in metrics)
        + " |",
        "|" + "---|" * (5 + len(metrics)),
    ]
    mean_lines, notes = [], []
    for (bench, protocol), methods in sorted(groups.items()):
        targets = sorted({t for runs in methods.values() for t in runs})
        for method in sorted(methods):
            runs = methods[method]
            cells = [tables[(bench, protocol, m)].cells[method] for m in metrics]
            for t in targets if per_target else ():
                if t in runs:
                    lines.append(
                        f"| {bench} | {protocol} | {method} | {t} | {len(runs[t])} | "
                        + " | ".join(c[t].text() for c in cells)
                        + " |"
                    )
            if per_target and len(targets) < 2:
                continue  # one target: the mean row would repeat it
            means = [c["mean"] for c in cells]
            complete = sum(
                all(s in runs.get(t, {}) for t in targets)
                for s in {s for p in runs.values() for s in p}
            )
            mean_lines.append(
                f"| {bench} | {protocol} | {method} | **mean** | {complete} | "
                + " | ".join(c.text() for c in means)
                + " |"
            )
            missing = sorted({m for c in means for m in c.missing})
            if missing:
                notes += incomplete_notes({method: Cell(None, None, 0, tuple(missing))})
    return "\n".join(lines + mean_lines + ([""] + notes if notes else []))
