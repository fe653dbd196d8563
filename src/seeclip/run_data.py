"""What a run reads before its method: the benchmark on disk, its content hash, the split and
the cached features of a backbone.

Dataset preparation (generating an embedded world, writing a manifest), the data hash a record
names, and the per-process memos of backbones and feature caches. Nothing here knows a method.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from seeclip.backbone import Backbone, build_backbone
from seeclip.cache import CachedFeatures, encode_cached
from seeclip.config import ConfigError
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
from seeclip.datasets.digits import read_meta
from seeclip.features import Features
from seeclip.paths import seeclip_home
from seeclip.run_config import RunConfig

# the embedded benchmarks and what generates each (seeclip prepare NAME [--seed N])
EMBEDDED = {"digits": digits.generate_benchmark, "glyphs": glyphs.generate_benchmark}
# the tiny CLIP pretrained on each embedded world: the backbone when none is named
WORLD_BACKBONES = {"digits": "tiny-digits", "glyphs": "tiny-glyphs"}


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


def current_data_hash(cfg: RunConfig) -> str | None:
    """The hash of ``cfg``'s data as prepared now, read from its manifest (no image is opened;
    once per process); None when the benchmark was never prepared here (nothing to compare)."""
    d = cfg.data
    try:
        root = Path(d.data_root) if d.data_root else default_data_root(d.benchmark)
        spec = get_benchmark(d.benchmark, classes_file=d.classes_file, data_root=root)
        manifest = load_manifest(spec, root)
    except (ConfigError, FileNotFoundError, ValueError):
        return None
    key = (str(manifest.root), manifest.path)
    if key not in _DATA_HASHES:
        _DATA_HASHES[key] = data_hash(manifest)
    return _DATA_HASHES[key][0]


def check_same_data(cfg: RunConfig, record: dict, run_dir: Path) -> None:
    """A finished run is reused only for the data it saw: raise one line when the data under
    its root now hashes differently (re-prepared, or files replaced)."""
    seen, now = record.get("data_hash"), current_data_hash(cfg)
    if seen and now and seen != now:
        raise ValueError(
            f"{run_dir} was computed on data {seen[:16]}, but {cfg.data.benchmark} now hashes "
            f"{now[:16]}: redo it on today's data with eval/train --force (a sweep: delete the "
            f"folder), or restore the data it saw"
        )


def cache_entry_name(benchmark: str, root: Path, backbone: str, suffix: str = "") -> str:
    """The feature-cache entry of a benchmark tree and a backbone (``suffix``: a subset)."""
    return f"{benchmark}-{_root_tag(root)}/{_safe(backbone)}{suffix}"


def _root_tag(root: Path) -> str:
    return hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:10]


def _safe(name: str) -> str:
    return name.replace("/", "_").replace(":", "_")
