"""One evaluation run, top to bottom: data -> cached features -> method -> metrics -> run folder.

The runner is the only place that sees a whole :class:`~seeclip.config.RunConfig`; below it
every function takes explicit arguments. A run folder ``runs/<name>/<config-hash>/`` holds
``config.yaml``, ``results.jsonl`` (:mod:`seeclip.records`: one final record and one record per
epoch), ``predictions.npz`` (everything needed to recompute the metrics), ``model.safetensors``
and a ``done`` marker written last. A folder with ``done`` is complete and is reused.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from seeclip import distributed, metrics
from seeclip.backbone import Backbone, build_backbone
from seeclip.cache import CachedFeatures, encode_cached
from seeclip.config import RunConfig, load_config, save_config, to_dict
from seeclip.datasets import (
    BenchmarkSpec,
    Manifest,
    OSDGSplit,
    SplitData,
    digits,
    get_benchmark,
    glyphs,
    load_manifest,
    make_split,
    prepare,
    select,
)
from seeclip.datasets.digits import installed_versions, read_meta
from seeclip.features import Features, Prediction, PseudoSources, PseudoUnknownSource
from seeclip.io import atomic_path, load_tensors, write_text
from seeclip.methods import Method, MethodEnv
from seeclip.methods.registry import METHODS, build_method
from seeclip.paths import seeclip_home
from seeclip.pseudo import PSEUDO_UNKNOWNS, PseudoContext, draw
from seeclip.records import FINAL, final_record, write_records

# the embedded benchmarks and what generates each (seeclip prepare NAME [--seed N])
EMBEDDED = {"digits": digits.generate_benchmark, "glyphs": glyphs.generate_benchmark}
# the tiny CLIP pretrained on each embedded world: the backbone when none is named
WORLD_BACKBONES = {"digits": "tiny-digits", "glyphs": "tiny-glyphs"}
# the install a record names: what computes features, trains and scores
RECORD_PACKAGES = ("seeclip", "torch", "open_clip_torch", "numpy", "scikit-learn", "pillow")


TRAIN_STATE = "train_state.pt"  # an unfinished run's training checkpoint (resumed from)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_data_root(benchmark: str, seed: int = 0) -> Path:
    """Where an embedded benchmark is generated (data seed 0: ``data/<name>``, else
    ``data/<name>-seed<N>``); real benchmarks need ``--data-root``."""
    if benchmark not in EMBEDDED:
        raise ValueError(
            f"benchmark {benchmark!r} needs its images: pass --data-root DIR "
            f"(see `seeclip list` for the expected layout)"
        )
    return seeclip_home() / "data" / (benchmark if seed == 0 else f"{benchmark}-seed{seed}")


def cache_root(cache_dir: str | Path | None) -> Path:
    """Root of the feature cache (``features/``) and of pseudo-unknown pools (``pools/``)."""
    return Path(cache_dir) if cache_dir else seeclip_home()


def prepare_benchmark(
    benchmark: str,
    data_root: str | Path | None = None,
    *,
    classes_file: str | Path | None = None,
    skip_corrupt: bool = False,
    n_per_class: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Manifest:
    """Validate a dataset tree (generating an embedded one first) and write its manifest.

    ``seed`` is the embedded benchmark's data seed (another draw of the same world).
    """
    if benchmark in EMBEDDED:
        root = Path(data_root) if data_root else default_data_root(benchmark, seed)
        kwargs = {} if n_per_class is None else {"n_per_class": n_per_class}
        EMBEDDED[benchmark](root, seed=seed, progress=progress, **kwargs)
    elif data_root is None:
        root = default_data_root(benchmark)  # raises with the fix
    else:
        root = Path(data_root)
    spec = get_benchmark(benchmark, classes_file=classes_file, data_root=root)
    return prepare(spec, root, skip_corrupt=skip_corrupt, progress=progress)


def data_hash(manifest: Manifest) -> tuple[str, str]:
    """(hash, kind) naming the data a run used.

    ``content``: the generated tree's SHA-256 from its ``meta.json`` (every byte of every
    image). ``listing``: for a real dataset, SHA-256 of the manifest rows and file sizes.
    """
    meta = read_meta(manifest.root)
    if meta and meta.get("content_hash"):
        return meta["content_hash"], "content"
    digest = hashlib.sha256()
    for s in manifest.samples:
        size = (manifest.root / s.path).stat().st_size
        digest.update(f"{s.path}|{s.class_name}|{s.domain}|{s.split}|{size}\n".encode())
    return digest.hexdigest(), "listing"


class FeatureMemo:
    """Feature caches already opened by this process, keyed by the backbone's weights.

    Runs over targets and seeds share one staleness check. The key is the backbone's weights
    fingerprint (not its ``id``, which a new object can reuse), the data root, the cache root
    and the image list.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple, CachedFeatures] = {}

    def get(
        self,
        backbone: Backbone,
        manifest: Manifest,
        *,
        cache_dir: Path,
        name: str,
        batch_size: int,
        progress: bool,
    ) -> CachedFeatures:
        paths = [s.path for s in manifest.samples]
        key = (backbone.fingerprint, str(manifest.root), str(cache_dir), hash(tuple(paths)))
        if key not in self._entries:
            self._entries[key] = encode_cached(
                backbone,
                manifest.root,
                paths,
                cache_dir=cache_dir / "features",
                name=name,
                batch_size=batch_size,
                progress=progress,
            )
        return self._entries[key]

    def clear(self) -> None:
        self._entries.clear()


class BackboneMemo:
    """Frozen backbones built by this process, by (name, pretrained), the ``size`` newest kept.

    Evicting one is safe: features are memoised by weights fingerprint, not by object.
    """

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._entries: dict[tuple[str, str | None], Backbone] = {}

    def get(self, name: str, pretrained: str | None) -> Backbone:
        key = (name, pretrained)
        if key not in self._entries:
            while len(self._entries) >= self.size:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = build_backbone(name, pretrained=pretrained, seed=0)
        self._entries[key] = self._entries.pop(key)  # most recently used last
        return self._entries[key]


FEATURES = FeatureMemo()
BACKBONES = BackboneMemo()
_DATA_HASHES: dict[tuple, tuple[str, str]] = {}  # (data root, manifest file) -> data_hash()


@dataclass(frozen=True)
class RunData:
    """Everything a run needs before its method: split, labels and cached features."""

    spec: BenchmarkSpec
    split: OSDGSplit
    data: SplitData
    backbone: Backbone
    feats: CachedFeatures
    domains: tuple[str, ...]  # per manifest sample
    classes: tuple[str, ...]  # per manifest sample: its class name
    data_hash: str  # see :func:`data_hash`
    data_hash_kind: str
    root: Path | None = None  # the dataset root the cache's relative paths hang from

    def image_paths(self, indices: np.ndarray) -> tuple[str, ...]:
        """Absolute image files of manifest rows (empty when the root is not known)."""
        if self.root is None:
            return ()
        return tuple(str(self.root / self.feats.paths[i]) for i in indices)

    def features(self, indices: np.ndarray) -> Features:
        g = torch.from_numpy(np.ascontiguousarray(self.feats.global_[indices]))
        t = torch.from_numpy(np.ascontiguousarray(self.feats.tokens[indices]))
        return Features(g, t, tuple(self.domains[i] for i in indices))  # fp16 until used

    @property
    def class_texts(self) -> tuple[str, ...]:
        return tuple(self.spec.class_text(c) for c in self.split.known)


def load_run_data(
    cfg: RunConfig, *, cache_dir: str | Path | None = None, progress: bool = True
) -> RunData:
    """The split, source/target indices and cached features of ``cfg``'s benchmark and target."""
    d = cfg.data
    root = Path(d.data_root) if d.data_root else default_data_root(d.benchmark)
    spec = get_benchmark(d.benchmark, classes_file=d.classes_file, data_root=root)
    split = make_split(spec, d.protocol, d.target)
    manifest = load_manifest(spec, root)
    data = select(manifest, split, val_fraction=d.val_fraction, val_seed=d.val_seed)
    backbone = BACKBONES.get(cfg.backbone.name, cfg.backbone.pretrained)
    feats = FEATURES.get(
        backbone,
        manifest,
        cache_dir=cache_root(cache_dir),
        name=cache_entry_name(spec.name, manifest.root, backbone.name),
        batch_size=cfg.encode_batch_size,
        progress=progress,
    )
    domains = tuple(s.domain for s in manifest.samples)
    classes = tuple(s.class_name for s in manifest.samples)
    key = (str(manifest.root), manifest.path)
    if key not in _DATA_HASHES:  # once per process: a real dataset's listing stats every file
        _DATA_HASHES[key] = data_hash(manifest)
    return RunData(
        spec, split, data, backbone, feats, domains, classes, *_DATA_HASHES[key], root=manifest.root
    )


def pseudo_context(
    cfg: RunConfig,
    run: RunData,
    indices: np.ndarray,
    labels: np.ndarray,
    *,
    pool: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> PseudoContext:
    """What a pseudo-unknown source of ``cfg`` is built from: the features of the manifest rows
    ``indices`` (source images only) and the config's settings. Training and ``seeclip
    generate`` both build their sources through here, so one setting means one pool."""
    return PseudoContext(
        run.features(indices),
        torch.as_tensor(labels),
        backbone=run.backbone,
        class_texts=run.class_texts,
        template=run.spec.template,
        seed=cfg.seed,
        diffusion=cfg.diffusion,
        pool=pool,
        sd_model=cfg.train.sd_model,
        sd_prompt=cfg.train.sd_prompt,
        sd_projection=cfg.train.sd_projection,
        sd_strength=cfg.train.sd_strength,
        image_paths=run.image_paths(indices) if cfg.train.sd_strength < 1 else (),
        cache_dir=cache_root(cache_dir),
        progress=progress,
    )


def pseudo_sources(
    cfg: RunConfig, run: RunData, *, cache_dir: str | Path | None = None, progress: bool = True
) -> PseudoSources:
    """The run's pseudo-unknown sources: training ones from the training features, the
    held-out ones of model selection from source-validation features only (built on use)."""
    name = cfg.train.pseudo_unknowns
    factory = PSEUDO_UNKNOWNS.get(name)
    data = run.data

    def context(indices: np.ndarray, labels: np.ndarray, pool: str | None) -> PseudoContext:
        return pseudo_context(
            cfg, run, indices, labels, pool=pool, cache_dir=cache_dir, progress=progress
        )

    def val_source():
        stored = name in ("images", "pool")  # made ahead of time, from training images
        if stored and not cfg.train.val_pseudo_pool:
            raise ValueError(
                f"selection=val_h with train.pseudo_unknowns={name} needs "
                f"train.val_pseudo_pool=PATH, a pool made from source-validation images only "
                f"(`seeclip generate ... --from val`); the training pool would score the model "
                f"on what it trained on"
            )
        pool = cfg.train.val_pseudo_pool if stored else cfg.train.pseudo_pool
        return factory(context(data.source_val, data.source_val_labels, pool))

    return PseudoSources(
        name,
        lambda: factory(
            context(data.source_train, data.source_train_labels, cfg.train.pseudo_pool)
        ),
        val_source,
    )


def make_method(
    cfg: RunConfig,
    run: RunData,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    pseudo: PseudoSources | None = None,
) -> Method:
    """Build ``cfg.method`` on the run's backbone, with the config sections it asks for
    (``pseudo``: its pseudo-unknown sources; default :func:`pseudo_sources`)."""
    if pseudo is None:
        pseudo = pseudo_sources(cfg, run, cache_dir=cache_dir, progress=progress)
    return method_for(
        cfg, run.backbone, run.class_texts, run.spec.template, pseudo=pseudo, progress=progress
    )


def method_for(
    cfg: RunConfig,
    backbone: Backbone,
    class_texts: tuple[str, ...],
    template: str,
    *,
    pseudo: PseudoSources | None,
    progress: bool = True,
) -> Method:
    """``cfg.method`` on ``backbone`` for these known classes (no data needed: a fitted run's
    state is loaded into it afterwards, as :mod:`seeclip.predict` does)."""
    env = MethodEnv(
        backbone=backbone,
        class_texts=class_texts,
        template=template,
        seed=cfg.seed,
        pseudo=pseudo,
        progress=progress,
    )
    sections = {
        "zeroshot": cfg.zeroshot,
        "prompt": cfg.prompt,
        "loss": cfg.loss,
        "train": cfg.train,
        "diffusion": cfg.diffusion,
    }
    return build_method(cfg.method, env, sections)


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    record: dict
    cached: bool  # True when a finished run folder was reused


def run_eval(
    cfg: RunConfig,
    *,
    runs_dir: str | Path = "runs",
    cache_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    checkpoint_every: int = 1,
) -> RunResult:
    """Fit ``cfg.method`` on the sources, evaluate it on ``cfg.data.target``, write the run.

    Training writes ``train_state.pt`` in the run folder every ``checkpoint_every`` epochs
    (0: never); an unfinished run with one resumes from it, and it is deleted once the run is
    done. ``force`` starts afresh."""
    run_dir = cfg.run_dir(runs_dir)
    ckpt = run_dir / TRAIN_STATE
    if force:
        ckpt.unlink(missing_ok=True)
    if (run_dir / "done").exists() and not force:
        record = final_record(run_dir)
        if record is not None:
            return RunResult(run_dir, record, cached=True)
    METHODS.get(cfg.method)  # fail on a bad method name before any work
    set_seed(cfg.seed)
    run = load_run_data(cfg, cache_dir=cache_dir, progress=progress)
    pseudo = pseudo_sources(cfg, run, cache_dir=cache_dir, progress=progress)
    method = make_method(cfg, run, cache_dir=cache_dir, progress=progress, pseudo=pseudo)
    data = run.data
    main = distributed.is_main()  # under torchrun only rank 0 writes and evaluates
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "done").unlink(missing_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    distributed.barrier()
    start = time.perf_counter()
    method.fit(
        run.features(data.source_train),
        torch.as_tensor(data.source_train_labels),
        run.features(data.source_val),
        torch.as_tensor(data.source_val_labels),
        checkpoint=ckpt if checkpoint_every > 0 else None,
        checkpoint_every=checkpoint_every,
    )
    fit_seconds = time.perf_counter() - start
    if not main:
        distributed.barrier()  # rank 0 evaluates and writes the run
        return RunResult(run_dir, {}, cached=False)
    with atomic_path(run_dir / "model.safetensors") as tmp:
        save_file(method.state(), str(tmp))
    epochs = [{**r, "config_hash": cfg.hash(), "seed": cfg.seed} for r in method.history()]
    chosen = [r["epoch"] for r in epochs if r.get("selected")]
    trained = {"selection": cfg.train.selection, "selected_epoch": chosen[0]} if epochs else {}
    extra = {"selection": None, "selected_epoch": None, **trained}
    extra["fit_seconds"] = round(fit_seconds, 3)
    # where it trained: not part of the config (a run's hash), but its float rounding differs
    extra["device"] = str(distributed.device())
    extra["processes"] = distributed.world_size()
    pseudo_scores = pseudo_unknown_scores(method, pseudo.built("train"), run.split.source_domains)
    record = _evaluate(
        cfg, run, method, run_dir, epochs=epochs, extra=extra, pseudo_scores=pseudo_scores
    )
    ckpt.unlink(missing_ok=True)  # the run is done: model.safetensors holds what it learned
    distributed.barrier()
    return RunResult(run_dir, record, cached=False)


PSEUDO_SCORED = 200  # pseudo-unknowns per source domain whose unknown score a run saves


def pseudo_unknown_scores(
    method: Method, source: PseudoUnknownSource | None, domains: tuple[str, ...]
) -> np.ndarray | None:
    """The trained method's unknown score on fresh draws of the pseudo-unknowns it trained
    with (:data:`PSEUDO_SCORED` per source domain, a fixed generator apart from training's);
    None for a method that drew none. For the report's score histograms."""
    if source is None:
        return None
    gen = torch.Generator().manual_seed(0)
    g, t = draw(source, domains, PSEUDO_SCORED, gen)
    return method.predict(Features(g, t, ("pseudo-unknown",) * g.shape[0])).unknown_score


def eval_run(
    run_dir: str | Path, *, cache_dir: str | Path | None = None, progress: bool = True
) -> RunResult:
    """Re-evaluate a trained run from its checkpoint; the new record replaces the old one."""
    run_dir = Path(run_dir)
    cfg, run, method = restore_run(run_dir, cache_dir=cache_dir, progress=progress)
    old = final_record(run_dir) or {}
    (run_dir / "done").unlink(missing_ok=True)
    extra = {
        k: old.get(k) for k in ("selection", "selected_epoch", "fit_seconds", "device", "processes")
    }
    extra["evaluations"] = int(old.get("evaluations", 1)) + 1
    record = _evaluate(cfg, run, method, run_dir, epochs=None, extra=extra)
    return RunResult(run_dir, record, cached=False)


def restore_run(
    run_dir: Path, *, cache_dir: str | Path | None = None, progress: bool = True
) -> tuple[RunConfig, RunData, Method]:
    """(config, run data, fitted method) of a run folder, from its config and checkpoint."""
    cfg = run_config(run_dir)
    run = load_run_data(cfg, cache_dir=cache_dir, progress=progress)
    method = make_method(cfg, run, cache_dir=cache_dir, progress=progress)
    state = load_tensors(run_dir / "model.safetensors")
    try:
        method.load_state(state)
    except (RuntimeError, KeyError) as err:
        raise ValueError(f"{run_dir}/model.safetensors does not fit its config: {err}") from err
    return cfg, run, method


def run_config(run_dir: Path) -> RunConfig:
    """The config of a trained run folder, checked against the folder's name."""
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
    return cfg


def _evaluate(
    cfg: RunConfig,
    run: RunData,
    method: Method,
    run_dir: Path,
    *,
    epochs: list[dict] | None,
    extra: dict,
    pseudo_scores: np.ndarray | None = None,
) -> dict:
    """Predict the target (no label goes in), score it, write predictions and records.

    ``pseudo_scores``: unknown scores of pseudo-unknowns (saved as ``pseudo_unknown_score``);
    a re-evaluation keeps the ones the run saved when it trained."""
    split, data = run.split, run.data
    target = run.features(data.target)
    pred: Prediction = method.predict(target)  # no label goes in
    y_true = np.asarray(data.target_labels)
    target_classes = [run.classes[i] for i in data.target]
    num_known = len(split.known)
    record = {
        "kind": FINAL,
        "benchmark": run.spec.name,
        "protocol": split.protocol,
        "target": split.target,
        "method": cfg.label or cfg.method,
        "seed": cfg.seed,
        "backbone": run.backbone.name,
        "pretrained": run.backbone.pretrained,
        "backbone_fingerprint": run.backbone.fingerprint,  # which weights (cache key's sha256)
        "n_known": int((y_true >= 0).sum()),
        "n_unknown": int((y_true < 0).sum()),
        **metrics.open_set_report(
            y_true, pred.y_pred, pred.y_pred_closed, pred.unknown_score, num_known=num_known
        ),
        # AccU on hard and easy unknowns, where the benchmark names look-alikes (glyphs)
        **metrics.acc_unknown_by_group(
            pred.y_pred,
            target_classes,
            run.spec.unknown_kinds(split.protocol),
            num_known=num_known,
        ),
        "data_hash": run.data_hash,
        "data_hash_kind": run.data_hash_kind,
        "install": installed_versions(RECORD_PACKAGES),
        **extra,
        "config_hash": cfg.hash(),
        "setting_hash": cfg.setting_hash(),
        "config": to_dict(cfg),
    }
    record = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in record.items()}
    if pseudo_scores is None and epochs is None:  # re-evaluation: keep what training saved
        pseudo_scores = _saved_pseudo_scores(run_dir)
    _write_predictions(
        run_dir, pred, y_true, target.domains, target_classes, split.known, pseudo_scores
    )
    write_records(run_dir, record, epochs)
    write_text(run_dir / "done", time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    return record


def _saved_pseudo_scores(run_dir: Path) -> np.ndarray | None:
    path = run_dir / "predictions.npz"
    if not path.is_file():
        return None
    with np.load(path) as z:
        return z["pseudo_unknown_score"] if "pseudo_unknown_score" in z.files else None


def _write_predictions(
    run_dir: Path, pred: Prediction, y_true, domains, classes, known, pseudo_scores=None
) -> None:
    extra = {} if pseudo_scores is None else {"pseudo_unknown_score": pseudo_scores}
    with atomic_path(run_dir / "predictions.npz") as tmp:
        np.savez(
            tmp,
            **extra,
            y_true=y_true.astype(np.int64),
            y_pred=pred.y_pred.astype(np.int64),
            y_pred_closed=pred.y_pred_closed.astype(np.int64),
            unknown_score=pred.unknown_score.astype(np.float64),
            domain=np.asarray(domains),
            target_class=np.asarray(classes),  # the true class name (unknowns keep theirs)
            known_classes=np.asarray(known),
        )


def cache_entry_name(benchmark: str, root: Path, backbone: str, suffix: str = "") -> str:
    """The feature-cache entry of a benchmark tree and a backbone (``suffix``: a subset)."""
    return f"{benchmark}-{_root_tag(root)}/{_safe(backbone)}{suffix}"


def _root_tag(root: Path) -> str:
    return hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:10]


def _safe(name: str) -> str:
    return name.replace("/", "_").replace(":", "_")
