"""The report's figures, one PNG each, drawn with matplotlib from saved predictions.

Every function takes plain arrays (what ``predictions.npz`` holds) and a path, and draws on a
``matplotlib.figure.Figure`` (no pyplot, no global backend state).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from seeclip import metrics

SCORE_GROUPS = ("known", "unknown", "pseudo-unknown")
_COLOURS = {"known": "tab:blue", "unknown": "tab:red", "pseudo-unknown": "tab:orange"}


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def roc_figure(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str, path: str | Path
) -> Path:
    """Known-vs-unknown ROC of each method (label -> (y_true, unknown_score)), unknown positive."""
    fig = Figure(figsize=(4.6, 4.2))
    ax = fig.add_subplot()
    for label, (y_true, score) in curves.items():
        unknown = np.asarray(y_true) < 0
        if unknown.all() or not unknown.any():
            continue
        fpr, tpr, _ = roc_curve(unknown, score)
        auc = metrics.auroc(y_true, score)  # the number the tables show
        ax.plot(fpr, tpr, label=f"{label} ({auc * 100:.1f})", lw=1.4)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(
        xlabel="known called unknown (FPR)",
        ylabel="unknown called unknown (TPR)",
        xlim=(0, 1),
        ylim=(0, 1.01),
        title=title,
    )
    ax.legend(fontsize=7, title="method (AUROC)", title_fontsize=7, loc="lower right")
    return _save(fig, path)


def score_histograms(
    panels: Mapping[str, Mapping[str, np.ndarray]], title: str, path: str | Path
) -> Path:
    """A panel per target: the unknown score's density for known, unknown and (when the run
    trained with them) pseudo-unknown samples, on one shared bin grid per panel."""
    n = max(len(panels), 1)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows))
    for i, (name, groups) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        present = {
            g: np.asarray(groups[g], float)
            for g in SCORE_GROUPS
            if groups.get(g) is not None and len(groups[g])
        }
        values = np.concatenate(list(present.values())) if present else np.zeros(1)
        lo, hi = float(values.min()), float(values.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 31)
        for g, v in present.items():
            ax.hist(
                v,
                bins=bins,
                density=True,
                histtype="stepfilled",
                alpha=0.35,
                color=_COLOURS[g],
                edgecolor=_COLOURS[g],
                label=f"{g} ({len(v)})",
            )
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("unknown score", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10, y=1.03)
    return _save(fig, path)


def h_bars(
    methods: Sequence[str],
    targets: Sequence[str],
    means: np.ndarray,
    stds: np.ndarray,
    title: str,
    path: str | Path,
) -> Path:
    """Grouped bars: H per target domain (groups) and method (bars), std over seeds as error
    bars; ``means``/``stds`` are [methods, targets] fractions (nan: no run)."""
    fig = Figure(figsize=(max(5.0, 1.1 * len(targets) * max(1, len(methods)) / 3 + 2), 3.6))
    ax = fig.add_subplot()
    width = 0.8 / max(len(methods), 1)
    x = np.arange(len(targets))
    for i, method in enumerate(methods):
        ax.bar(
            x + (i - (len(methods) - 1) / 2) * width,
            means[i] * 100,
            width,  # nan: no bar
            yerr=np.nan_to_num(stds[i]) * 100,
            capsize=2,
            label=method,
        )
    ax.set_xticks(x, targets, fontsize=8)
    ax.set(ylabel="H (%)", ylim=(0, 100), title=title)
    ax.legend(
        fontsize=7, ncols=min(len(methods), 4), loc="upper center", bbox_to_anchor=(0.5, -0.12)
    )
    return _save(fig, path)


def confusion_figure(
    matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str, path: str | Path
) -> Path:
    """Row-normalised confusion matrix (true class rows, predicted columns, "unknown" last)."""
    m = np.asarray(matrix, float)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    size = 0.28 * max(len(rows), len(cols)) + 2.2
    fig = Figure(figsize=(size + 0.8, size))
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if len(rows) * len(cols) <= 400:
        for i in range(len(rows)):
            for j in range(len(cols)):
                if m[i, j]:
                    ax.text(
                        j,
                        i,
                        f"{norm[i, j] * 100:.0f}",
                        ha="center",
                        va="center",
                        fontsize=5,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    fig.colorbar(im, ax=ax, fraction=0.04)
    return _save(fig, path)
