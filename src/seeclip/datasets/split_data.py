"""Split selection: which manifest samples one OSDG split trains, validates and tests on."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from seeclip.datasets.layouts import SPLITS, Sample
from seeclip.datasets.manifest import Manifest
from seeclip.datasets.splits import OSDGSplit


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
    """The source train/val and target samples of ``split``.

    - source: images of each source domain whose class is in that domain's source class set (so
      an unknown class never reaches training), from split "train", "val" or "all" (never
      "test"). A deterministic ``val_fraction`` of each (domain, class) is held out as source
      validation data (:func:`source_val_mask`), used only for model selection and thresholds.
    - target: images of the target domain whose class is in ``target_known`` or unknown, from
      split "test" when the domain has any "test" image (VLCS, miniDomainNet), else all of the
      domain's images (PACS, Office-Home, Digits-DG: the usual DG convention of testing on the
      whole domain).
    """
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
