"""Manifests (the validated list of a benchmark's images) and the samples of one OSDG split.

``prepare`` scans a dataset tree with its layout loader, validates it, and writes the manifest
once: ``<name>.csv`` (``path,class_name,domain,split``) and a ``<name>.json`` sidecar (benchmark,
root, spec fingerprint, counts, skipped images), each atomically (temporary file +
``os.replace``). Later runs only read it (``load_manifest``); they never rescan the tree.

Corrupt images: with ``check_images`` every image is opened and verified with PIL. Unreadable
images FAIL ``prepare`` by default (listing up to 10 and the total), because silently dropping
images changes the benchmark; with ``skip_corrupt=True`` they are left out and their count and
paths are recorded in the sidecar and in ``Manifest.skipped``.

Which samples a split uses (``select``):

- source: images of each source domain whose class is in that domain's source class set (so an
  unknown class never reaches training), from split "train", "val" or "all" (never "test"). A
  deterministic ``val_fraction`` of each (domain, class) is held out as source validation data,
  used only for model selection and thresholds.
- target: images of the target domain whose class is in ``target_known`` or unknown, from split
  "test" when the domain has any "test" image (VLCS, miniDomainNet), else all of the domain's
  images (PACS, Office-Home, Digits-DG: the usual DG convention of testing on the whole domain).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from seeclip.datasets.benchmarks import BenchmarkSpec, OSDGSplit
from seeclip.datasets.layouts import SPLITS, DataLayoutError, Sample, load_samples
from seeclip.paths import seeclip_home

MANIFEST_FORMAT = 1
_FIELDS = ("path", "class_name", "domain", "split")


@dataclass(frozen=True)
class Manifest:
    """The validated images of one benchmark under one data root."""

    benchmark: str
    root: Path  # sample paths are relative to this folder
    samples: tuple[Sample, ...]
    n_skipped: int = 0  # unreadable images left out (skip_corrupt=True)
    skipped: tuple[str, ...] = ()
    path: Path | None = None  # the CSV file, once written

    def abspath(self, sample: Sample) -> Path:
        return self.root / sample.path

    def counts(self) -> dict[str, dict[str, int]]:
        """Number of images per domain and split."""
        out: dict[str, dict[str, int]] = {}
        for s in self.samples:
            out.setdefault(s.domain, {}).setdefault(s.split, 0)
            out[s.domain][s.split] += 1
        return out


class CorruptImagesError(DataLayoutError):
    """Images that PIL cannot open or verify."""


def _resolved(data_root: Path | str) -> Path:
    return Path(data_root).expanduser().resolve()


def default_manifest_path(spec: BenchmarkSpec, data_root: Path | str) -> Path:
    """``$SEECLIP_HOME/manifests/<benchmark>-<sha1(resolved data root)[:10]>.csv``."""
    digest = hashlib.sha1(str(_resolved(data_root)).encode()).hexdigest()[:10]
    return seeclip_home() / "manifests" / f"{spec.name}-{digest}.csv"


def _is_corrupt(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()
        return False
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return True


def find_corrupt(root: Path, samples: Sequence[Sample], *, workers: int = 4) -> list[str]:
    """Paths (relative to ``root``) of the samples PIL cannot open and verify."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        bad = pool.map(_is_corrupt, [root / s.path for s in samples], chunksize=64)
        return [s.path for s, b in zip(samples, bad, strict=True) if b]


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _csv_text(samples: Sequence[Sample]) -> str:
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(_FIELDS)
    writer.writerows((s.path, s.class_name, s.domain, s.split) for s in samples)
    return buf.getvalue()


def prepare(
    spec: BenchmarkSpec,
    data_root: Path | str,
    *,
    out: Path | None = None,
    skip_corrupt: bool = False,
    check_images: bool = True,
) -> Manifest:
    """Scan and validate ``data_root`` for ``spec`` and write its manifest (CSV + JSON sidecar)."""
    root = Path(data_root).expanduser().absolute()
    samples = load_samples(spec, root)
    skipped: list[str] = []
    if check_images:
        skipped = find_corrupt(root, samples)
        if skipped and not skip_corrupt:
            shown = ", ".join(skipped[:10])
            raise CorruptImagesError(
                f"{spec.name}: {len(skipped)} unreadable or corrupt image(s) under {root}: "
                f"{shown}{', ...' if len(skipped) > 10 else ''}; re-download them, or rerun "
                "with --skip-corrupt to leave them out"
            )
        bad = set(skipped)
        samples = [s for s in samples if s.path not in bad]
    path = Path(out) if out is not None else default_manifest_path(spec, root)
    manifest = Manifest(spec.name, root, tuple(samples), len(skipped), tuple(skipped), path)
    sidecar = {
        "format": MANIFEST_FORMAT,
        "benchmark": spec.name,
        "spec_version": spec.version,
        "spec_fingerprint": spec.fingerprint(),
        "root": str(root),
        "n_samples": len(samples),
        "counts": manifest.counts(),
        "images_checked": check_images,
        "n_skipped": len(skipped),
        "skipped": skipped,
    }
    _write_atomic(path, _csv_text(samples))
    _write_atomic(path.with_suffix(".json"), json.dumps(sidecar, indent=1) + "\n")
    return manifest


def load_manifest(
    spec: BenchmarkSpec, data_root: Path | str, *, path: Path | None = None
) -> Manifest:
    """The manifest ``prepare`` wrote for ``spec`` and ``data_root`` (nothing is rescanned)."""
    path = Path(path) if path is not None else default_manifest_path(spec, data_root)
    sidecar_path = path.with_suffix(".json")
    if not path.is_file() or not sidecar_path.is_file():
        raise FileNotFoundError(
            f"no manifest for {spec.name} under {data_root} (looked for {path}); "
            f"run `seeclip prepare {spec.name} --data-root {data_root}` first"
        )
    meta = json.loads(sidecar_path.read_text())
    if meta.get("benchmark") != spec.name or meta.get("spec_fingerprint") != spec.fingerprint():
        raise ValueError(
            f"manifest {path} was prepared for another version of {spec.name} "
            f"({meta.get('benchmark')}); rerun "
            f"`seeclip prepare {spec.name} --data-root {data_root}`"
        )
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        if tuple(next(reader, ())) != _FIELDS:
            raise ValueError(
                f"{path} is not a seeclip manifest (header must be {','.join(_FIELDS)})"
            )
        samples = tuple(Sample(*row) for row in reader)
    if bad := {s.class_name for s in samples} - set(spec.classes):
        raise ValueError(f"{path} holds classes unknown to {spec.name}: {sorted(bad)}; re-prepare")
    return Manifest(
        spec.name,
        Path(data_root).expanduser().absolute(),
        samples,
        int(meta.get("n_skipped", 0)),
        tuple(meta.get("skipped", ())),
        path,
    )


def _hash_key(seed: int, path: str) -> bytes:
    return hashlib.sha1(f"{seed}\0{path}".encode()).digest()


def source_val_mask(
    samples: Sequence[Sample], *, fraction: float = 0.1, seed: int = 0
) -> np.ndarray:
    """Deterministic held-out mask: ``fraction`` of each (domain, class), picked by path hash.

    Within each group the samples are ranked by sha1(seed, path); the first
    ``round(fraction * n)`` (at most n - 1, so training keeps one image) are held out. The result
    does not depend on the order of ``samples``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    groups: dict[tuple[str, str], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault((s.domain, s.class_name), []).append(i)
    mask = np.zeros(len(samples), dtype=bool)
    for idx in groups.values():
        n_val = min(int(np.floor(fraction * len(idx) + 0.5)), len(idx) - 1)
        ranked = sorted(idx, key=lambda i: (_hash_key(seed, samples[i].path), samples[i].path))
        mask[ranked[:n_val]] = True
    return mask


@dataclass(frozen=True)
class SplitData:
    """Indices into ``manifest.samples`` and labels (index in ``split.known``; -1 = unknown)."""

    split: OSDGSplit
    source_train: np.ndarray
    source_train_labels: np.ndarray
    source_val: np.ndarray
    source_val_labels: np.ndarray
    target: np.ndarray
    target_labels: np.ndarray
    target_split: str  # "test" or "all": which images of the target domain are evaluated


def select(
    manifest: Manifest, split: OSDGSplit, *, val_fraction: float = 0.1, val_seed: int = 0
) -> SplitData:
    """The source train/val and target samples of ``split`` (rules in the module docstring)."""
    if manifest.benchmark != split.benchmark:
        raise ValueError(f"manifest is for {manifest.benchmark!r}, split for {split.benchmark!r}")
    samples = manifest.samples
    if bad := {s.split for s in samples} - set(SPLITS):
        raise ValueError(f"manifest has unknown split values {sorted(bad)}; re-prepare it")
    source = [
        i
        for i, s in enumerate(samples)
        if s.domain in split.source_classes
        and s.class_name in split.source_classes[s.domain]
        and s.split != "test"
    ]
    target_all = [i for i, s in enumerate(samples) if s.domain == split.target]
    has_test = any(samples[i].split == "test" for i in target_all)
    wanted = set(split.target_known) | set(split.target_unknown)
    target = [
        i
        for i in target_all
        if samples[i].class_name in wanted and (not has_test or samples[i].split == "test")
    ]
    for domain in split.source_domains:
        if not any(samples[i].domain == domain for i in source):
            raise ValueError(f"no {split.benchmark} images of source domain {domain!r}; re-prepare")
    if not target:
        raise ValueError(
            f"no {split.benchmark} images of target domain {split.target!r} in the manifest "
            f"(is the domain on disk? run `seeclip prepare {split.benchmark} --data-root DIR`)"
        )
    val = source_val_mask([samples[i] for i in source], fraction=val_fraction, seed=val_seed)
    src = np.asarray(source, dtype=np.int64)
    tgt = np.asarray(target, dtype=np.int64)

    def labels(idx: np.ndarray) -> np.ndarray:
        return np.asarray([split.label(samples[i].class_name) for i in idx], dtype=np.int64)

    return SplitData(
        split=split,
        source_train=src[~val],
        source_train_labels=labels(src[~val]),
        source_val=src[val],
        source_val_labels=labels(src[val]),
        target=tgt,
        target_labels=labels(tgt),
        target_split="test" if has_test else "all",
    )
