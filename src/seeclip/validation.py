"""Open-set validation on the source domains only: leave-one-source-domain-out (LODO) folds.

For a run with target T and sources S_1..S_n, fold (i, j) makes source S_i a pseudo-target: the
other sources train, and a seeded subset of the known classes (class split j, chosen by name)
is held out of training and plays "unknown" on S_i, together with any class of S_i that no
training domain has (the daml protocol's per-source subsets make some). The whole pipeline
reruns per fold: the same method and config, pseudo-unknowns built from the fold's own training
features, the same decision rule. Fold H, AUROC and OSCR estimate how the setting does on an
unseen domain with unseen classes, and the folds' unknown scores calibrate an operating point
(:func:`fit_threshold`) that no target image has influenced.

Target-domain images are never listed, encoded or opened: the folds are cut from a manifest
without the target domain, and its features come from their own cache entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch

from seeclip import metrics
from seeclip.config import ConfigError, apply_overrides, parse_variants
from seeclip.datasets import Manifest, OSDGSplit, get_benchmark, load_manifest, make_split, select
from seeclip.features import Prediction
from seeclip.io import write_json
from seeclip.methods.scoring import apply_threshold, fit_threshold, held_out_thresholds
from seeclip.records import final_record, write_records
from seeclip.run_config import RunConfig
from seeclip.run_data import (
    BACKBONES,
    FEATURES,
    RunData,
    cache_entry_name,
    cache_root,
    data_hash,
    default_data_root,
)
from seeclip.runner import RunResult, run_eval, set_seed
from seeclip.selection import OWN_RULE, SETTING_SELECTIONS
from seeclip.wiring import make_method

__all__ = [
    "FOLD_SOURCES",
    "Fold",
    "LodoSettings",
    "apply_threshold",
    "attach_validation",
    "cached_lodo",
    "evaluate",
    "fit_threshold",
    "held_out_thresholds",
    "load_grid",
    "lodo_folds",
    "run_lodo",
    "select_by_lodo",
]

# pseudo-unknown sources that are rebuilt from each fold's training features; a stored pool
# was made from every source domain (the pseudo-target's images and held-out classes included)
FOLD_SOURCES = ("none", "mixup", "diffusion", "sd_images", "sd_online")
METRICS = metrics.METRICS
VALIDATION_FILE = "validation.json"
RULE = "lodo_threshold"  # records name the operating rule calibrated on the folds


@dataclass(frozen=True)
class LodoSettings:
    """How the folds are cut (recorded with every validation)."""

    held_out: float = 0.3  # share of a fold's known classes (present on the pseudo-target) held out
    class_splits: int = 2  # class splits per pseudo-target
    seed: int = 0  # seeds which classes each split holds out

    def __post_init__(self) -> None:
        if not 0 < self.held_out < 1:
            raise ValueError(f"held_out must be in (0, 1), got {self.held_out}")
        if self.class_splits < 1:
            raise ValueError(f"class_splits must be >= 1, got {self.class_splits}")


@dataclass(frozen=True)
class Fold:
    """One fold: a source domain as pseudo-target, the other sources training."""

    pseudo_target: str
    class_split: int
    held_out: tuple[str, ...]  # known classes held out of training, unknown on the pseudo-target
    split: OSDGSplit  # the fold as an OSDG task (its target is the pseudo-target)


def lodo_folds(split: OSDGSplit, settings: LodoSettings) -> list[Fold]:
    """The folds of ``split``, by class name; identical class splits of one domain are merged.

    Per pseudo-target p: the classes the other sources train on that p also has are eligible;
    ``round(held_out * n)`` of them (at least one when p would otherwise have no unknown class,
    always leaving one known) are held out, in ``class_splits`` distinct draws (fewer when
    fewer sets exist) from a generator seeded by (seed, p's position).
    """
    if len(split.source_domains) < 2:
        raise ValueError(
            f"LODO needs at least two source domains; {split.target} leaves "
            f"{list(split.source_domains)}"
        )
    folds = []
    for i, p in enumerate(split.source_domains):
        others = tuple(d for d in split.source_domains if d != p)
        trained = {c for d in others for c in split.source_classes[d]}
        own = set(split.source_classes[p])
        eligible = sorted(own & trained, key=split.known.index)
        natural = own - trained  # classes of p that no training domain has: unknown anyway
        need = 0 if natural else 1
        n = min(len(eligible) - 1, max(need, round(settings.held_out * len(eligible))))
        if n < need:
            continue  # p shares a single class with the others and has no other: no fold
        for j, held in enumerate(_class_splits(eligible, n, settings, i, split.known.index)):
            known = tuple(c for c in split.known if c in trained and c not in held)
            per_source = {
                d: tuple(c for c in split.source_classes[d] if c in known) for d in others
            }
            per_source = {d: cs for d, cs in per_source.items() if cs}  # a domain left empty
            fold = OSDGSplit(
                benchmark=split.benchmark,
                protocol=f"{split.protocol}/lodo",
                target=p,
                source_domains=tuple(per_source),
                known=known,
                unknown=tuple(c for c in split.known if c in own and c not in known),
                source_classes=MappingProxyType(per_source),
                target_known=tuple(c for c in known if c in own),
                target_unknown=tuple(c for c in split.known if c in own and c not in known),
            )
            folds.append(Fold(p, j, held, fold))
    if not folds:
        raise ValueError(f"no LODO fold can be cut from the sources of {split.target}")
    return folds


def _class_splits(eligible: list[str], n: int, settings: LodoSettings, domain: int, order):
    """Up to ``class_splits`` distinct held-out sets of ``n`` classes (fewer if fewer exist),
    drawn by a generator seeded by (seed, domain)."""
    want = min(settings.class_splits, math.comb(len(eligible), n))
    gen = np.random.default_rng([settings.seed, domain])
    out: list[tuple[str, ...]] = []
    for _ in range(100 * want):
        if len(out) == want:
            break
        held = tuple(sorted(gen.choice(eligible, size=n, replace=False).tolist(), key=order))
        if held not in out:
            out.append(held)
    return out


# ------------------------------------------------------------------------------ running folds


def _source_manifest(manifest: Manifest, split: OSDGSplit) -> Manifest:
    """The manifest without the target domain and without any "test" image."""
    keep = tuple(
        s for s in manifest.samples if s.domain in split.source_domains and s.split != "test"
    )
    return dataclasses.replace(manifest, samples=keep, path=None)


def run_lodo(
    cfg: RunConfig,
    settings: LodoSettings,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Run ``cfg`` on every fold of its target's sources; per-fold and mean metrics, threshold."""
    if cfg.train.pseudo_unknowns not in FOLD_SOURCES:
        raise ValueError(
            f"--validate lodo reruns the pseudo-unknown generator per fold; "
            f"train.pseudo_unknowns={cfg.train.pseudo_unknowns} is a stored pool made from all "
            f"sources: use one of {', '.join(FOLD_SOURCES)}"
        )
    d = cfg.data
    root = Path(d.data_root) if d.data_root else default_data_root(d.benchmark)
    spec = get_benchmark(d.benchmark, classes_file=d.classes_file, data_root=root)
    split = make_split(spec, d.protocol, d.target)
    sources = _source_manifest(load_manifest(spec, root), split)
    backbone = BACKBONES.get(cfg.backbone.name, cfg.backbone.pretrained)
    feats = FEATURES.get(
        backbone,
        sources,
        cache_dir=cache_root(cache_dir),
        name=cache_entry_name(spec.name, sources.root, backbone.name, f"-without-{d.target}"),
        batch_size=cfg.encode_batch_size,
        progress=progress,
    )
    domains = tuple(s.domain for s in sources.samples)
    classes = tuple(s.class_name for s in sources.samples)
    hash_, kind = data_hash(sources)
    start = time.perf_counter()
    rows, scored = [], []
    for fold in lodo_folds(split, settings):
        set_seed(cfg.seed)
        data = select(sources, fold.split, val_fraction=d.val_fraction, val_seed=d.val_seed)
        run = RunData(
            spec,
            fold.split,
            data,
            backbone,
            feats,
            domains,
            classes,
            hash_,
            kind,
            root=sources.root,
        )
        method = make_method(cfg, run, cache_dir=cache_dir, progress=progress)
        method.fit(
            run.features(data.source_train),
            torch.as_tensor(data.source_train_labels),
            run.features(data.source_val),
            torch.as_tensor(data.source_val_labels),
        )
        pred = method.predict(run.features(data.target))  # no label goes in
        y = np.asarray(data.target_labels)
        c = fold.split.num_known
        report = metrics.open_set_report(
            y, pred.y_pred, pred.y_pred_closed, pred.unknown_score, num_known=c
        )
        rows.append(
            {
                "pseudo_target": fold.pseudo_target,
                "class_split": fold.class_split,
                "held_out": list(fold.held_out),
                "unknown": list(fold.split.unknown),
                "n_known": int((y >= 0).sum()),
                "n_unknown": int((y < 0).sum()),
                **_clean(report),
            }
        )
        scored.append((y, pred, c))
    threshold = fit_threshold(scored)
    # each fold's H under the calibrated rule uses a threshold fitted on the *other* folds, so
    # it estimates the rule's H out of sample like the method's own rule's fold H
    for row, thr, (y, pred, c) in zip(rows, held_out_thresholds(scored), scored, strict=True):
        row[f"threshold_{RULE}"] = thr
        row[f"h_score_{RULE}"] = metrics.h_score(
            y, apply_threshold(pred, thr, c).y_pred, num_known=c
        )
    keys = (*METRICS, f"h_score_{RULE}")
    return {
        "protocol": "lodo",
        "settings": dataclasses.asdict(settings),
        "target_left_out": d.target,
        "data_hash": hash_,
        "config_hash": cfg.hash(),
        "folds": rows,
        "mean": {k: _stat(rows, k, np.mean) for k in keys},
        "std": {k: _stat(rows, k, np.std) for k in keys},
        "rule": RULE,
        "threshold": threshold,
        "seconds": round(time.perf_counter() - start, 1),
    }


def _clean(report: dict) -> dict:
    return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in report.items()}


def _stat(rows: list[dict], key: str, fn) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(fn(values)) if values else None


# ------------------------------------------------------------------------------- run records


def attach_validation(run_dir: str | Path, validation: dict) -> dict:
    """Write ``validation.json`` into a finished run and add the calibrated rule to its record.

    The record keeps its metrics under the method's own rule and gains ``validation`` (fold
    means and stds, the threshold) and ``rules[lodo_threshold]``: the target metrics with the
    threshold applied to the saved unknown scores.
    """
    run_dir = Path(run_dir)
    record = final_record(run_dir)
    if record is None:
        raise FileNotFoundError(f"{run_dir} has no final record; run the evaluation first")
    write_json(run_dir / VALIDATION_FILE, validation, indent=1)
    with np.load(run_dir / "predictions.npz") as z:
        y, closed, score = z["y_true"], z["y_pred_closed"], z["unknown_score"]
        num_known = len(z["known_classes"])
        classes = z["target_class"].tolist() if "target_class" in z.files else None
    pred = apply_threshold(Prediction(closed, closed, score), validation["threshold"], num_known)
    validated = metrics.open_set_report(y, pred.y_pred, closed, score, num_known=num_known)
    data = record.get("config", {}).get("data", {})
    if classes is not None and data.get("benchmark"):  # AccU on hard/easy unknowns (glyphs)
        spec = get_benchmark(
            data["benchmark"],
            classes_file=data.get("classes_file"),
            data_root=data.get("data_root"),
        )
        kinds = spec.unknown_kinds(data["protocol"])
        validated.update(
            metrics.acc_unknown_by_group(pred.y_pred, classes, kinds, num_known=num_known)
        )
    record["validation"] = {
        k: validation[k] for k in ("protocol", "settings", "mean", "std", "threshold", "seconds")
    }
    record["rules"] = {RULE: {"threshold": validation["threshold"], **_clean(validated)}}
    write_records(run_dir, record)
    return record


def validate_run(
    result: RunResult,
    cfg: RunConfig,
    settings: LodoSettings,
    *,
    cache_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> tuple[RunResult, dict]:
    """``result`` (a finished run of ``cfg``) with its LODO validation attached; the folds are
    reused when the folder already holds them for these settings. Returns (run, validation)."""
    validation = None if force else read_validation(result.run_dir)
    if validation is None or validation.get("settings") != dataclasses.asdict(settings):
        validation = run_lodo(cfg, settings, cache_dir=cache_dir, progress=progress)
    record = attach_validation(result.run_dir, validation)
    return dataclasses.replace(result, record=record), validation


def evaluate(
    cfg: RunConfig,
    *,
    runs_dir: str | Path = "runs",
    cache_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    checkpoint_every: int = 1,
    validate: LodoSettings | None = None,
    grid: dict[str, tuple[str, ...]] | None = None,
) -> tuple[RunResult, dict | None]:
    """One run the whole way, as `seeclip train`/`eval` and sweeps do it: fit and evaluate on
    the target (or reuse the finished run), then, with ``validate``, its LODO validation on the
    sources; with ``grid`` too, the setting itself is chosen by the folds
    (:func:`select_by_lodo`). Returns (the run, its validation report or None)."""
    if grid is not None:
        if validate is None:
            raise ConfigError("a grid chooses a setting by validation folds: add --validate lodo")
        result = select_by_lodo(
            cfg,
            grid,
            validate,
            runs_dir=runs_dir,
            cache_dir=cache_dir,
            force=force,
            progress=progress,
        )
        return result, read_validation(result.run_dir)
    result = run_eval(
        cfg,
        runs_dir=runs_dir,
        cache_dir=cache_dir,
        force=force,
        progress=progress,
        checkpoint_every=checkpoint_every,
    )
    if validate is None:
        return result, None
    return validate_run(result, cfg, validate, cache_dir=cache_dir, force=force, progress=progress)


def read_validation(run_dir: str | Path) -> dict | None:
    """A run folder's ``validation.json`` (None when it has none)."""
    path = Path(run_dir) / VALIDATION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# ------------------------------------------------------------------ setting selection (grid)


def load_grid(path: str | Path) -> dict[str, tuple[str, ...]]:
    """A grid file, ``variants: {label: [key=value, ...]}``: the settings to choose from."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    variants = raw.get("variants") if isinstance(raw, dict) else None
    if not isinstance(variants, dict) or not variants or set(raw) - {"variants"}:
        raise ConfigError(
            f"{path}: a grid is `variants: {{label: [key=value, ...]}}` and nothing else"
        )
    return parse_variants(variants, path)


def cached_lodo(cfg: RunConfig, settings: LodoSettings, store: Path, **kw) -> dict:
    """:func:`run_lodo`, memoised on disk by config hash and settings."""
    path = store / f"{cfg.hash()}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("settings") == dataclasses.asdict(settings):
            return saved
    report = run_lodo(cfg, settings, **kw)
    write_json(path, report, indent=1)
    return report


def select_by_lodo(
    cfg: RunConfig,
    grid: dict[str, tuple[str, ...]],
    settings: LodoSettings,
    *,
    rule: str = "lodo_h",
    runs_dir: str | Path = "runs",
    cache_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> RunResult:
    """Choose a setting of ``grid`` (overrides on ``cfg``) and an operating rule by the LODO
    folds of ``cfg``'s sources, train the choice on all sources and evaluate it on the target.

    The run is labelled ``<label or method>:lodo``; its record holds the choice, every
    variant's fold means (``setting_selection``) and ``validated``: the target metrics under
    the chosen operating rule. Fold reports are kept under ``runs_dir/_lodo/``.
    """
    selection = SETTING_SELECTIONS.get(rule)
    variants = {label: apply_overrides(cfg, list(ov)) for label, ov in grid.items()}
    store = Path(runs_dir) / "_lodo"
    reports = {
        label: cached_lodo(v, settings, store, cache_dir=cache_dir, progress=progress)
        for label, v in variants.items()
    }
    label, operating, score = selection.choose(reports)
    base = cfg.label or cfg.method
    chosen = dataclasses.replace(variants[label], label=f"{base}:lodo")
    result = run_eval(
        chosen, runs_dir=runs_dir, cache_dir=cache_dir, force=force, progress=progress
    )
    record = attach_validation(result.run_dir, reports[label])
    if operating == OWN_RULE:
        validated = {k: record.get(k) for k in METRICS}
    else:
        validated = {k: record["rules"][operating].get(k) for k in METRICS}
    grid_blob = json.dumps(
        [cfg.setting_hash(), sorted(grid.items()), dataclasses.asdict(settings), rule],
        sort_keys=True,
    )
    record["setting_selection"] = {
        "rule": rule,
        "chosen": label,
        "operating_rule": operating,
        "fold_score": score,
        "grid": {
            lab: {
                "overrides": list(grid[lab]),
                "h_score": rep["mean"].get("h_score"),
                f"h_score_{RULE}": rep["mean"].get(f"h_score_{RULE}"),
            }
            for lab, rep in reports.items()
        },
    }
    # one table row per (grid, rule): the chosen setting may differ between targets and seeds
    record["selection_hash"] = hashlib.sha256(grid_blob.encode()).hexdigest()[:12]
    record["validated"] = {"operating_rule": operating, **validated}
    write_records(result.run_dir, record)
    return dataclasses.replace(result, record=record)
