"""One evaluation run, top to bottom: data -> cached features -> method -> metrics -> run folder.

A run folder ``runs/<name>/<config-hash>/`` holds ``config.yaml``, ``results.jsonl`` (one JSON
record per evaluation), ``predictions.npz`` (everything needed to recompute the metrics) and a
``done`` marker written last. A folder with ``done`` is complete and is reused, not recomputed.
"""

from __future__ import annotations

import functools
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from seeclip import metrics
from seeclip.config import RunConfig, save_config
from seeclip.paths import seeclip_home

EMBEDDED = "digits"


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_data_root(benchmark: str) -> Path:
    """Where the embedded benchmark is generated; real benchmarks need ``--data-root``."""
    if benchmark != EMBEDDED:
        raise ValueError(
            f"benchmark {benchmark!r} needs its images: pass --data-root DIR "
            f"(see `seeclip list` for the expected layout)"
        )
    return seeclip_home() / "data" / EMBEDDED


def prepare_benchmark(
    benchmark: str,
    data_root: str | Path | None = None,
    *,
    classes_file: str | Path | None = None,
    skip_corrupt: bool = False,
    n_per_class: int | None = None,
    seed: int = 0,
    progress: bool = True,
):
    """Validate a dataset tree (generating the embedded one first) and write its manifest."""
    from seeclip.datasets import get_benchmark, prepare

    if benchmark == EMBEDDED:
        from seeclip.datasets.digits import generate_benchmark

        root = Path(data_root) if data_root else default_data_root(benchmark)
        kwargs = {} if n_per_class is None else {"n_per_class": n_per_class}
        generate_benchmark(root, seed=seed, progress=progress, **kwargs)
    elif data_root is None:
        root = default_data_root(benchmark)  # raises with the fix
    else:
        root = Path(data_root)
    spec = get_benchmark(benchmark, classes_file=classes_file, data_root=root)
    return prepare(spec, root, skip_corrupt=skip_corrupt)


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    record: dict
    cached: bool  # True when a finished run folder was reused


def _data_root(cfg: RunConfig) -> Path:
    if cfg.data.data_root:
        return Path(cfg.data.data_root)
    return default_data_root(cfg.data.benchmark)


@dataclass(frozen=True)
class _Loaded:
    """Everything a run needs before its method: split, labels and cached features."""

    spec: object
    split: object
    data: object  # seeclip.datasets.SplitData
    backbone: object
    feats: object  # seeclip.cache.CachedFeatures
    domains: tuple[str, ...]  # per manifest sample
    paths: tuple[str, ...]  # per manifest sample, relative to the data root

    def features(self, indices: np.ndarray):
        from seeclip.methods import Features

        g = torch.from_numpy(np.ascontiguousarray(self.feats.global_[indices]))
        t = torch.from_numpy(np.ascontiguousarray(self.feats.tokens[indices]))
        return Features(g, t, tuple(self.domains[i] for i in indices))  # fp16 until used


_FEATURES: dict[tuple, object] = {}  # cached features already opened by this process


@functools.lru_cache(maxsize=2)
def _backbone(name: str, pretrained: str | None):
    """The frozen backbone, built once per process (runs over targets and seeds share it)."""
    from seeclip.backbone import build_backbone

    return build_backbone(name, pretrained=pretrained, seed=0)


def _load(cfg: RunConfig, cache_dir: str | Path | None, progress: bool) -> _Loaded:
    from seeclip.cache import encode_cached
    from seeclip.datasets import get_benchmark, load_manifest, make_split, select

    root = _data_root(cfg)
    spec = get_benchmark(cfg.data.benchmark, classes_file=cfg.data.classes_file, data_root=root)
    split = make_split(spec, cfg.data.protocol, cfg.data.target)
    manifest = load_manifest(spec, root)
    data = select(manifest, split, val_fraction=cfg.data.val_fraction, val_seed=cfg.data.val_seed)
    backbone = _backbone(cfg.backbone.name, cfg.backbone.pretrained)
    cache_root = Path(cache_dir) if cache_dir else seeclip_home() / "features"
    paths = tuple(s.path for s in manifest.samples)
    memo_key = (id(backbone), str(manifest.root), str(cache_root), hash(paths))
    if memo_key not in _FEATURES:  # one staleness check per process, not per target and seed
        _FEATURES[memo_key] = encode_cached(
            backbone,
            manifest.root,
            list(paths),
            cache_dir=cache_root,
            name=f"{spec.name}-{_root_tag(manifest.root)}/{_safe(backbone.name)}",
            batch_size=cfg.encode_batch_size,
            progress=progress,
        )
    feats = _FEATURES[memo_key]
    domains = tuple(s.domain for s in manifest.samples)
    return _Loaded(spec, split, data, backbone, feats, domains, paths)


def _build_method(cfg: RunConfig, loaded: _Loaded, progress: bool):
    from seeclip.methods import METHODS, MethodContext

    ctx = MethodContext(
        backbone=loaded.backbone,
        class_texts=tuple(loaded.spec.class_text(c) for c in loaded.split.known),
        template=loaded.spec.template,
        config=cfg,
        progress=progress,
    )
    return METHODS.get(cfg.method)(ctx)


def run_eval(
    cfg: RunConfig,
    *,
    runs_dir: str | Path = "runs",
    cache_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> RunResult:
    """Fit ``cfg.method`` on the sources, evaluate it on ``cfg.data.target``, write the run."""
    from seeclip.methods import METHODS

    run_dir = Path(runs_dir) / cfg.run_name() / cfg.hash()
    if (run_dir / "done").exists() and not force:
        record = json.loads((run_dir / "results.jsonl").read_text().splitlines()[-1])
        return RunResult(run_dir, record, cached=True)
    METHODS.get(cfg.method)  # fail on a bad method name before any work
    set_seed(cfg.seed)
    loaded = _load(cfg, cache_dir, progress)
    method = _build_method(cfg, loaded, progress)
    data = loaded.data
    start = time.perf_counter()
    method.fit(
        loaded.features(data.source_train),
        torch.as_tensor(data.source_train_labels),
        loaded.features(data.source_val),
        torch.as_tensor(data.source_val_labels),
    )
    fit_seconds = time.perf_counter() - start
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "done").unlink(missing_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    save_file(method.state(), str(run_dir / "model.safetensors"))
    record = _evaluate(cfg, loaded, method, run_dir, extra={"fit_seconds": round(fit_seconds, 3)})
    return RunResult(run_dir, record, cached=False)


def eval_run(
    run_dir: str | Path, *, cache_dir: str | Path | None = None, progress: bool = True
) -> RunResult:
    """Re-evaluate a trained run from its ``config.yaml`` and ``model.safetensors``."""
    run_dir = Path(run_dir)
    cfg, loaded, method = restore_run(run_dir, cache_dir=cache_dir, progress=progress)
    (run_dir / "done").unlink(missing_ok=True)
    record = _evaluate(cfg, loaded, method, run_dir, extra={})
    return RunResult(run_dir, record, cached=False)


def restore_run(run_dir: Path, *, cache_dir: str | Path | None = None, progress: bool = True):
    """(config, loaded data, fitted method) of a run folder, from its config and checkpoint."""
    from seeclip.config import load_config

    for name in ("config.yaml", "model.safetensors"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(
                f"{run_dir} is not a run folder: {name} is missing "
                f"(expected runs/<name>/<config-hash>/ written by `seeclip train` or `eval`)"
            )
    cfg = load_config(run_dir / "config.yaml")
    if cfg.hash() != run_dir.name:
        raise ValueError(
            f"{run_dir}/config.yaml hashes to {cfg.hash()}, not to the folder name: it was edited "
            f"after training; train a new run instead"
        )
    loaded = _load(cfg, cache_dir, progress)
    method = _build_method(cfg, loaded, progress)
    state = load_file(str(run_dir / "model.safetensors"))
    try:
        method.load_state(state)
    except (RuntimeError, KeyError) as err:
        raise ValueError(f"{run_dir}/model.safetensors does not fit its config: {err}") from err
    return cfg, loaded, method


def _evaluate(cfg: RunConfig, loaded: _Loaded, method, run_dir: Path, *, extra: dict) -> dict:
    from seeclip.methods import Prediction

    split, data = loaded.split, loaded.data
    target = loaded.features(data.target)
    pred: Prediction = method.predict(target)  # no label goes in
    y_true = np.asarray(data.target_labels)
    record = {
        "benchmark": loaded.spec.name,
        "protocol": split.protocol,
        "target": split.target,
        "method": cfg.label or cfg.method,
        "seed": cfg.seed,
        "backbone": loaded.backbone.name,
        "pretrained": loaded.backbone.pretrained,
        "n_known": int((y_true >= 0).sum()),
        "n_unknown": int((y_true < 0).sum()),
        **metrics.open_set_report(
            y_true, pred.y_pred, pred.y_pred_closed, pred.unknown_score, num_known=len(split.known)
        ),
        **extra,
        "config_hash": cfg.hash(),
    }
    record = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in record.items()}
    _write_run(run_dir, cfg, record, pred, y_true, target.domains, split.known)
    return record


def _write_run(run_dir, cfg, record, pred, y_true, domains, known) -> None:
    tmp = run_dir / "predictions.tmp.npz"
    np.savez(
        tmp,
        y_true=y_true.astype(np.int64),
        y_pred=pred.y_pred.astype(np.int64),
        y_pred_closed=pred.y_pred_closed.astype(np.int64),
        unknown_score=pred.unknown_score.astype(np.float64),
        domain=np.asarray(domains),
        known_classes=np.asarray(known),
    )
    os.replace(tmp, run_dir / "predictions.npz")
    with open(run_dir / "results.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
    (run_dir / "done").write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))


def _root_tag(root: Path) -> str:
    import hashlib

    return hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:10]


def _safe(name: str) -> str:
    return name.replace("/", "_").replace(":", "_")
