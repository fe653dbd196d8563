"""Manifests: the validated list of a benchmark's images, written once by ``prepare`` and read back.

Also the corrupt-image check (:func:`find_corrupt`) and the CSV format.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from seeclip.datasets.layouts import DataLayoutError, Sample, load_samples
from seeclip.datasets.specs import BenchmarkSpec
from seeclip.io import write_json, write_text
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
    """Whether PIL cannot verify AND fully decode ``path``: ``verify()`` alone passes a
    truncated JPEG, whose pixels only fail to decode later."""
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()
        return False
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return True


def find_corrupt(
    root: Path, samples: Sequence[Sample], *, workers: int = 4, progress: bool = False
) -> list[str]:
    """Paths (relative to ``root``) of the samples PIL cannot open and verify."""
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=workers) as pool:
        bad = pool.map(_is_corrupt, [root / s.path for s in samples], chunksize=64)
        bad = list(
            tqdm(bad, total=len(samples), desc="checking images", unit="img", disable=not progress)
        )
        return [s.path for s, b in zip(samples, bad, strict=True) if b]


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
    progress: bool = False,
) -> Manifest:
    """Scan and validate ``data_root`` for ``spec`` and write its manifest (CSV + JSON sidecar).

    The manifest is written once: ``<name>.csv`` (``path,class_name,domain,split``) and a
    ``<name>.json`` sidecar (benchmark, root, spec fingerprint, counts, skipped images), each
    atomically. Later runs only read it (:func:`load_manifest`); they never rescan the tree.

    Corrupt images: with ``check_images`` every image is opened and verified with PIL.
    Unreadable images FAIL ``prepare`` by default (listing up to 10 and the total), because
    silently dropping images changes the benchmark; with ``skip_corrupt=True`` they are left out
    and their count and paths are recorded in the sidecar and in ``Manifest.skipped``.
    """
    root = Path(data_root).expanduser().absolute()
    samples = load_samples(spec, root)
    skipped: list[str] = []
    if check_images:
        skipped = find_corrupt(root, samples, progress=progress)
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
    write_text(path, _csv_text(samples))
    write_json(path.with_suffix(".json"), sidecar, indent=1)
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
        rows = list(reader)
    fix = f"rerun `seeclip prepare {spec.name} --data-root {data_root}` to rewrite it"
    for line, row in enumerate(rows, start=2):
        if len(row) != len(_FIELDS) or not all(row):
            raise ValueError(f"{path} line {line} is damaged ({len(row)} fields); {fix}")
    samples = tuple(Sample(*row) for row in rows)
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
