"""Are the pseudo-unknowns hard negatives? Similarity to the known classes, and rejection.

A hard negative sits near the known classes (its best match among the known-class text
prototypes is about as good as a real known image's) without being one of them (the model
rejects it). :func:`similarity_report` plots, per group of global features (e.g. real known
target images, real unknown target images, the generated pool), the histogram of the cosine to
the nearest known-class text prototype; :func:`rejection_rate` says how much of a pool a fitted
method already calls "unknown".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from seeclip.features import Features

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def max_similarity(global_: Tensor, prototypes: Tensor) -> Tensor:
    """[n] cosine of each global feature to its nearest prototype ([C, d], any norm)."""
    g = F.normalize(global_.float(), dim=-1)
    return (g @ F.normalize(prototypes.float(), dim=-1).T).max(dim=-1).values


def similarity_report(
    backbone,
    class_texts: Sequence[str],
    template: str,
    groups: Mapping[str, Tensor],
    *,
    out_png: str | Path,
) -> dict:
    """Histograms of the max cosine to the known-class text prototypes, one per group.

    Args:
        backbone: anything with ``encode_text(texts) -> [C, d]`` (a seeclip Backbone).
        class_texts: text of each known class; prototypes are ``template.format(text)``.
        template: the benchmark's prompt template with one ``{}``.
        groups: name -> global image features [n, d] (e.g. "known", "unknown", "pseudo").
        out_png: where the figure is written.

    Returns:
        ``{"png": path, "groups": {name: {"n", "mean", "std", "q05", ..., "q95"}}}``.
    """
    if empty := [name for name, g in groups.items() if len(g) == 0]:
        raise ValueError(f"similarity_report: empty group(s) {empty}")
    with torch.no_grad():
        protos = backbone.encode_text([template.format(c) for c in class_texts]).cpu()
    sims = {name: max_similarity(g.cpu(), protos).numpy() for name, g in groups.items()}
    stats = {}
    for name, s in sims.items():
        row = {"n": int(s.size), "mean": float(s.mean()), "std": float(s.std())}
        for q, v in zip(QUANTILES, np.quantile(s, QUANTILES), strict=True):
            row[f"q{round(q * 100):02d}"] = float(v)
        stats[name] = row
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    _plot(sims, out_png)
    return {"png": str(out_png), "groups": stats}


def _plot(sims: Mapping[str, np.ndarray], out_png: Path) -> None:
    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    values = np.concatenate(list(sims.values()))
    bins = np.linspace(values.min(), values.max(), 41)
    for i, (name, s) in enumerate(sims.items()):
        colour = f"C{i}"
        label = f"{name} (n={s.size}, mean {s.mean():.3f})"
        ax.hist(
            s, bins=bins, density=True, histtype="step", linewidth=1.6, color=colour, label=label
        )
        ax.axvline(float(s.mean()), color=colour, linestyle="--", linewidth=1)
    ax.set_xlabel("cosine to the nearest known-class text prototype")
    ax.set_ylabel("density")
    ax.set_title("Near the known classes? (dashed: group mean)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


def rejection_rate(method, pool_features: Features) -> float:
    """Share of ``pool_features`` that a fitted method predicts as unknown (class C)."""
    if len(pool_features) == 0:
        raise ValueError("rejection_rate needs at least one pseudo-unknown")
    pred = method.predict(pool_features)
    return float(np.mean(np.asarray(pred.y_pred) == method.num_known))


__all__ = ["max_similarity", "rejection_rate", "similarity_report"]
