"""``seeclip report --out DIR``: tables (md, csv, tex), figures and an index, from run folders.

Everything comes from the runs' records and ``predictions.npz``; nothing is recomputed from a
log. The folder holds ``tables.md`` / ``tables.csv`` / ``tables.tex``, ``figures/*.png``,
``index.md`` (tables and image links) and ``index.html`` (the same, self-contained: images
inlined, so the one file can be mailed or opened anywhere).
"""

from __future__ import annotations

import base64
import csv
import html
import io
from collections import defaultdict
from pathlib import Path

import numpy as np

from seeclip import figures, metrics
from seeclip.io import atomic_dir, write_text
from seeclip.records import run_dir_of
from seeclip.report import HEADERS, INCOMPLETE, Table, dedupe, default_metrics, paper_tables

FORMATS = ("md", "csv", "tex")
ORACLE_NOTE = (
    "ORACLE columns choose the rejection threshold with the target test labels, as DAML's and "
    "MEDIC's published H does; they are not valid results, only a like-for-like comparison "
    "with those tables (whose Acc is `Closed` here)."
)


def load_predictions(runs_dir: str | Path, record: dict) -> dict[str, np.ndarray] | None:
    path = run_dir_of(runs_dir, record) / "predictions.npz"
    if not path.is_file():
        return None
    with np.load(path) as z:  # plain arrays only: allow_pickle stays False
        return {k: z[k] for k in z.files}


def with_oracle(records: list[dict], runs_dir: str | Path) -> list[dict]:
    """Records with ``h_score_oracle`` (:func:`seeclip.metrics.oracle_h_score`) added from
    their saved predictions."""
    out = []
    for r in records:
        p = load_predictions(runs_dir, r)
        h = None
        if p is not None:
            h = metrics.oracle_h_score(p["y_true"], p["y_pred_closed"], p["unknown_score"])
            h = None if np.isnan(h) else h
        out.append({**r, "h_score_oracle": h})
    return out


# ------------------------------------------------------------------------------------ tables


def table_md(t: Table) -> str:
    head = "| " + " | ".join(t.header) + " |"
    sep = "|" + "---|" * len(t.header)
    notes = ["", *t.notes()] if t.notes() else []
    return "\n".join([head, sep, *("| " + " | ".join(r) + " |" for r in t.rows()), *notes])


def table_tex(t: Table) -> str:
    def esc(s: str) -> str:
        return (
            s.replace("\\", r"\textbackslash{}")
            .replace("_", r"\_")
            .replace("%", r"\%")
            .replace("&", r"\&")
            .replace("#", r"\#")
            .replace("±", r"$\pm$")
            .replace(INCOMPLETE, r"$^\dagger$")
        )

    lines = [
        f"% {t.title}",
        r"\begin{tabular}{l" + "c" * (len(t.header) - 1) + "}",
        r"\toprule",
        " & ".join(esc(h) for h in t.header) + r" \\",
        r"\midrule",
        *(" & ".join(esc(c) for c in r) + r" \\" for r in t.rows()),
        r"\bottomrule",
        r"\end{tabular}",
        *(r"\par{\footnotesize " + esc(note) + "}" for note in t.notes()),
    ]
    return "\n".join(lines)


def tables_csv(tables: list[Table]) -> str:
    """Tidy CSV: one line per (table, method, target or mean), fractions, not text; ``missing``
    names the (target, seed) results a mean over targets left out (``;``-separated)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        ["benchmark", "protocol", "metric", "method", "target", "mean", "std", "seeds", "missing"]
    )
    for t in tables:
        for method, row in t.cells.items():
            for target in (*t.targets, "mean"):
                c = row[target]
                w.writerow(
                    [
                        t.benchmark,
                        t.protocol,
                        t.metric,
                        method,
                        target,
                        "" if c.mean is None else f"{c.mean:.6f}",
                        "" if c.std is None else f"{c.std:.6f}",
                        c.seeds,
                        ";".join(c.missing),
                    ]
                )
    return buf.getvalue()


# ----------------------------------------------------------------------------------- figures


def _first_seed(records: list[dict]) -> dict[tuple[str, str], dict]:
    """(method, target) -> the record of its lowest seed: what the per-run figures show."""
    out: dict[tuple[str, str], dict] = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        out.setdefault((r["method"], r["target"]), r)
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def make_figures(
    records: list[dict], tables: list[Table], runs_dir: str | Path, out: Path
) -> dict[tuple[str, str], list[tuple[str, Path]]]:
    """Every figure of every (benchmark, protocol): ROC per target, unknown-score histograms
    per method, H bars per target, confusion matrix with "unknown" per method (pooled over
    targets). Returns (benchmark, protocol) -> [(caption, png path)]."""
    made: dict[tuple[str, str], list[tuple[str, Path]]] = defaultdict(list)
    by_group: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        by_group[(r["benchmark"], r["protocol"])].append(r)
    for (bench, protocol), group in by_group.items():
        tag = f"{_safe(bench)}_{_safe(protocol)}"
        first = _first_seed(group)
        methods = list(dict.fromkeys(r["method"] for r in group))
        targets = sorted({r["target"] for r in group})
        preds = {k: load_predictions(runs_dir, r) for k, r in first.items()}
        seed_note = "lowest seed of each run"
        for target in targets:
            curves = {
                m: (p["y_true"], p["unknown_score"])
                for (m, t), p in preds.items()
                if t == target and p is not None
            }
            if curves:
                path = figures.roc_figure(
                    curves,
                    f"{bench}/{protocol}: target {target}",
                    out / f"roc_{tag}_{_safe(target)}.png",
                )
                made[(bench, protocol)].append((f"ROC, target {target} ({seed_note})", path))
        h_table = next(
            (
                t
                for t in tables
                if (t.benchmark, t.protocol, t.metric) == (bench, protocol, "h_score")
            ),
            None,
        )
        if h_table is not None:
            mean = np.array(
                [
                    [
                        np.nan if h_table.cells[m][t].mean is None else h_table.cells[m][t].mean
                        for t in h_table.targets
                    ]
                    for m in h_table.cells
                ]
            )
            std = np.array(
                [[h_table.cells[m][t].std or 0.0 for t in h_table.targets] for m in h_table.cells]
            )
            path = figures.h_bars(
                list(h_table.cells),
                list(h_table.targets),
                mean,
                std,
                f"{bench}/{protocol}: H per target domain (mean ± std over seeds)",
                out / f"h_bars_{tag}.png",
            )
            made[(bench, protocol)].append(("H per target domain and method", path))
        for method in methods:
            panels = {}
            for target in targets:
                p = preds.get((method, target))
                if p is None:
                    continue
                known = p["y_true"] >= 0
                panels[f"target {target}"] = {
                    "known": p["unknown_score"][known],
                    "unknown": p["unknown_score"][~known],
                    "pseudo-unknown": p.get("pseudo_unknown_score"),
                }
            if panels:
                path = figures.score_histograms(
                    panels,
                    f"{bench}/{protocol}, {method}: unknown score ({seed_note})",
                    out / f"scores_{tag}_{_safe(method)}.png",
                )
                made[(bench, protocol)].append((f"unknown-score histograms, {method}", path))
            matrix = _confusion(
                [preds[(method, t)] for t in targets if preds.get((method, t)) is not None]
            )
            if matrix is not None:
                path = figures.confusion_figure(
                    *matrix,
                    f"{bench}/{protocol}, {method}: all targets ({seed_note})",
                    out / f"confusion_{tag}_{_safe(method)}.png",
                )
                made[(bench, protocol)].append((f"confusion matrix, {method}", path))
    return made


def _confusion(preds: list[dict]) -> tuple[np.ndarray, list[str], list[str]] | None:
    """Confusion counts by class name, pooled over runs: rows = true known classes then
    "unknown" (every unknown class), columns = predicted known classes then "unknown"."""
    if not preds or any("target_class" not in p for p in preds):
        return None
    known = list(dict.fromkeys(c for p in preds for c in p["known_classes"].tolist()))
    names = [*known, "unknown"]
    index = {c: i for i, c in enumerate(names)}
    m = np.zeros((len(names), len(names)), dtype=np.int64)
    for p in preds:
        k = p["known_classes"].tolist()
        pred_names = [k[i] if i < len(k) else "unknown" for i in p["y_pred"].tolist()]
        pairs = zip(p["target_class"].tolist(), p["y_true"].tolist(), strict=True)
        true_names = [c if y >= 0 else "unknown" for c, y in pairs]
        for t, q in zip(true_names, pred_names, strict=True):
            m[index[t], index[q]] += 1
    return m, names, names


# ------------------------------------------------------------------------------------ output


def write_report(
    records: list[dict],
    out_dir: str | Path,
    *,
    runs_dir: str | Path,
    formats: tuple[str, ...] = FORMATS,
    oracle: bool = False,
    title: str = "seeclip report",
    plots: bool = True,
) -> Path:
    """Write the report folder for ``records`` (final records of runs under ``runs_dir``);
    returns the path of ``index.html``.

    The folder is built beside ``out_dir`` and swapped in whole: a report is never half
    written, and nothing of an earlier report (e.g. figures of runs no longer reported) stays.
    An existing folder that is not a seeclip report is refused, never deleted."""
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"unknown report format {bad[0]!r}; choose from {', '.join(FORMATS)}")
    records = dedupe(records)
    if not records:
        raise FileNotFoundError(f"no finished runs to report under {runs_dir}")
    final = Path(out_dir)
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()  # an empty folder made for it
    with atomic_dir(final, marker="index.html") as out:
        _write_report(records, out, runs_dir, formats, oracle, title, plots)
    return final / "index.html"


def _write_report(records, out: Path, runs_dir, formats, oracle: bool, title: str, plots: bool):
    metric_list = list(default_metrics(records))
    if oracle:
        records = with_oracle(records, runs_dir)
        metric_list.append("h_score_oracle")
    tables = paper_tables(records, metric_list)
    text = {
        "md": lambda: "\n\n".join(f"### {t.title}\n\n{table_md(t)}" for t in tables) + "\n",
        "csv": lambda: tables_csv(tables),
        "tex": lambda: "\n\n".join(table_tex(t) for t in tables) + "\n",
    }
    for fmt in formats:
        write_text(out / f"tables.{fmt}", text[fmt]())
    figs = make_figures(records, tables, runs_dir, out / "figures") if plots else {}
    hashes = sorted({r["data_hash"][:16] for r in records if r.get("data_hash")})
    weights = sorted(
        {
            f"{r['backbone']} {r['backbone_fingerprint'][:12]}"
            for r in records
            if r.get("backbone_fingerprint")
        }
    )
    seeds = sorted({r["seed"] for r in records})
    meta = (
        f"{len(records)} runs from `{runs_dir}`; seeds {', '.join(map(str, seeds))}; "
        f"data {', '.join(hashes) or 'n/a'} (content hash); weights "
        f"{', '.join(weights) or 'not recorded'} (sha256). Cells: mean ± std over seeds, "
        f"in %; the mean column averages the targets within each seed first."
    )
    write_text(out / "index.md", _index_md(title, meta, tables, figs, out, oracle))
    write_text(out / "index.html", _index_html(title, meta, tables, figs, oracle))


def _index_md(title, meta, tables, figs, out: Path, oracle: bool) -> str:
    parts = [f"# {title}", "", meta, ""]
    if oracle:
        parts += [f"> {ORACLE_NOTE}", ""]
    for key in _groups(tables):
        parts.append(f"## {key[0]} / {key[1]}")
        for t in tables:
            if (t.benchmark, t.protocol) == key:
                parts += ["", f"### {HEADERS.get(t.metric, t.metric)}", "", table_md(t)]
        for caption, path in figs.get(key, []):
            parts += ["", f"![{caption}]({path.relative_to(out).as_posix()})"]
        parts.append("")
    return "\n".join(parts) + "\n"


def _groups(tables: list[Table]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((t.benchmark, t.protocol) for t in tables))


def _table_html(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in t.rows()
    )
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in t.notes())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>{notes}"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 8px;
text-align:right;font-variant-numeric:tabular-nums}th:first-child,td:first-child{text-align:left}
thead{background:#f2f2f2}figure{display:inline-block;margin:.5em;vertical-align:top}
figcaption{font-size:.85em;color:#555}img{max-width:560px}.oracle{background:#fff4e5;
padding:.5em 1em;border-left:4px solid #e69500}"""


def _index_html(title, meta, tables, figs, oracle: bool) -> str:
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(meta)}</p>"]
    if oracle:
        body.append(f'<p class="oracle">{html.escape(ORACLE_NOTE)}</p>')
    for key in _groups(tables):
        body.append(f"<h2>{html.escape(key[0])} / {html.escape(key[1])}</h2>")
        for t in tables:
            if (t.benchmark, t.protocol) == key:
                body.append(f"<h3>{html.escape(HEADERS.get(t.metric, t.metric))}</h3>")
                body.append(_table_html(t))
        for caption, path in figs.get(key, []):
            data = base64.b64encode(path.read_bytes()).decode()
            body.append(
                f'<figure><img alt="{html.escape(caption)}" '
                f'src="data:image/png;base64,{data}"><figcaption>'
                f"{html.escape(caption)}</figcaption></figure>"
            )
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>'
        f"{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
