"""Semantic-guided diffusion in the cached CLIP feature space: the ``diffusion`` pseudo-unknowns.

A small conditional DDPM (:mod:`seeclip.generate.denoiser`) is trained on the source training
features only. A pool of pseudo-unknowns is then sampled with DDIM: for a real source image,
its K semantic summaries are perturbed (v~ = v + eps, eps ~ N(0, sigma^2 I), in source-std
units) and classifier-free guidance ``eps' = eps_neg + g (eps_pos - eps_neg)`` steers the
sample with the positive condition (v~, domain, text of the "unknown" prompt) away from the
negative one (v~, domain, known-class text) (docs/method.md, "Pseudo-unknowns").

Both steps are cached under ``seeclip_home()/pools``: the trained generator by (source set,
class texts, training fields of the config, seed), the pool by (generator, "unknown" text,
sampling fields, seed), so a sigma or g sweep trains once. Writes are atomic (a temporary
folder renamed into place); the same key loads instead of regenerating.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from seeclip.features import Features
from seeclip.generate.feature_config import FeatureDiffusionConfig
from seeclip.generate.feature_generator import (
    CHUNK,
    TRAIN_FIELDS,
    FeatureGenerator,
)
from seeclip.io import load_tensors
from seeclip.paths import seeclip_home

log = logging.getLogger(__name__)

_FORMAT = 1
UNKNOWN_WORD = "unknown"  # fills the benchmark template for the positive text condition


@dataclass(frozen=True)
class FeaturePool:
    """Generated pseudo-unknowns in the cache format; a :class:`PseudoUnknownSource`."""

    global_: Tensor  # [M, d] L2-normalised (fp16 as stored)
    tokens: Tensor  # [M, N, d] (fp16 as stored)
    domains: tuple[str, ...]  # source domain of each sample
    source_index: Tensor  # [M] row of the source image each sample was conditioned on
    path: Path | None = None  # the pool's folder

    def __len__(self) -> int:
        return self.global_.shape[0]

    def features(self) -> Features:
        return Features(self.global_, self.tokens, self.domains)

    def rows(self, domain: str) -> Tensor:
        rows = [i for i, d in enumerate(self.domains) if d == domain]
        if not rows:
            raise KeyError(f"the pseudo-unknown pool has no domain {domain!r}")
        return torch.tensor(rows)

    def sample(self, domain: str, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` pool rows of ``domain`` drawn with replacement: (global [n, d], tokens)."""
        rows = self.rows(domain)
        pick = rows[torch.randint(len(rows), (n,), generator=generator)]
        return self.global_[pick].float(), self.tokens[pick].float()


# ----------------------------------------------------------------------- keys
def _sha(*parts: np.ndarray | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
    return h.hexdigest()


def _fp16_bytes(x: Tensor) -> np.ndarray:
    """The fp16 values of ``x`` as a contiguous buffer (hashed without a copy when fp16)."""
    return x.detach().cpu().to(torch.float16).contiguous().numpy()


def source_fingerprint(features: Features, labels: Tensor) -> str:
    """sha256 of the fp16 bytes of every source feature, the labels and the domains."""
    h = hashlib.sha256(f"{tuple(features.global_.shape)}|{tuple(features.tokens.shape)}".encode())
    for i in range(0, len(features), 256):
        h.update(_fp16_bytes(features.global_[i : i + 256]))
        h.update(_fp16_bytes(features.tokens[i : i + 256]))
    h.update(labels.long().cpu().numpy().tobytes())
    h.update("\n".join(features.domains).encode())
    return h.hexdigest()


def generator_key(
    fingerprint: str, class_text: Tensor, config: FeatureDiffusionConfig, seed: int
) -> str:
    fields = {f: getattr(config, f) for f in TRAIN_FIELDS}
    blob = json.dumps({"format": _FORMAT, "fields": fields, "seed": seed}, sort_keys=True)
    return _sha(fingerprint, _fp16_bytes(class_text), blob)


def pool_key(gen_key: str, unknown_text: Tensor, config: FeatureDiffusionConfig, seed: int) -> str:
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in TRAIN_FIELDS}
    fields.pop("seed")
    blob = json.dumps({"format": _FORMAT, "fields": fields, "seed": seed}, sort_keys=True)
    return _sha(gen_key, _fp16_bytes(unknown_text), blob)


# -------------------------------------------------------------------- storage
def _write_atomically(entry: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``entry``; a finished entry is never replaced.

    Not :func:`seeclip.io.atomic_dir`, which moves an existing folder aside and replaces it:
    here two runs may build the same content-addressed entry at once, and the first one to
    finish must stay. The rename fails on a non-empty ``entry``, and the loser's copy is then
    dropped if ``entry`` holds a finished ``manifest.json``.
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        os.replace(tmp, entry)
    except OSError:
        if not (entry / "manifest.json").is_file():  # not a concurrent writer's finished entry
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _manifest(entry: Path, key: str) -> dict | None:
    try:
        meta = json.loads((entry / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return meta if meta.get("key") == key and meta.get("format") == _FORMAT else None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def load_or_train_generator(
    features: Features,
    labels: Tensor,
    class_text: Tensor,
    *,
    config: FeatureDiffusionConfig,
    seed: int,
    key: str,
    root: Path,
    progress: bool = True,
) -> FeatureGenerator:
    """The generator stored under ``root/generators/<key>``, trained and stored if absent."""
    entry = root / "generators" / key[:16]
    meta = _manifest(entry, key)
    if meta is None:
        start = time.perf_counter()
        gen, losses = FeatureGenerator.fit(
            features, labels, class_text, config=config, seed=seed, progress=progress
        )
        tensors, gen_meta = gen.state()

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp / "generator.safetensors"))
            info = {
                "format": _FORMAT,
                "key": key,
                "seed": seed,
                "config": {f: getattr(config, f) for f in TRAIN_FIELDS},
                "generator": gen_meta,
                "n_source": len(features),
                "train_seconds": round(time.perf_counter() - start, 3),
                "loss_first_last": [losses[0], float(np.mean(losses[-50:]))] if losses else [],
                "created": _now(),
            }
            (tmp / "manifest.json").write_text(json.dumps(info, indent=1))  # last: completion

        _write_atomically(entry, write)
        return gen
    log.info("reusing the feature-diffusion generator in %s", entry)
    tensors = load_tensors(entry / "generator.safetensors")
    return FeatureGenerator.from_state(tensors, meta["generator"])


def build_pool(
    features: Features,
    labels: Tensor,
    *,
    class_text: Tensor,
    unknown_text: Tensor,
    config: FeatureDiffusionConfig | None = None,
    seed: int = 0,
    root: Path | None = None,
    progress: bool = True,
) -> FeaturePool:
    """The pseudo-unknown pool of a source set, generated once and then loaded.

    Args:
        features: source-domain training features (never target data).
        labels: their known-class labels 0..C-1.
        class_text: [C, d] text features of the known-class prompts, in label order.
        unknown_text: [d] text feature of the "unknown" prompt (the positive text condition).
        config: generator settings (``config.seed``, when set, replaces ``seed``).
        seed: seeds the generator's training and the pool's sampling.
        root: where pools live; default ``seeclip_home() / "pools"``.
        progress: tqdm bars for training and sampling.
    """
    config = config or FeatureDiffusionConfig()
    seed = seed if config.seed is None else config.seed
    root = Path(root) if root is not None else seeclip_home() / "pools"
    fingerprint = source_fingerprint(features, labels)
    gen_key = generator_key(fingerprint, class_text, config, seed)
    key = pool_key(gen_key, unknown_text, config, seed)
    entry = root / key[:16]
    if _manifest(entry, key) is not None:
        log.info("reusing the pseudo-unknown pool in %s", entry)
        return load_pool(entry)
    gen = load_or_train_generator(
        features,
        labels,
        class_text,
        config=config,
        seed=seed,
        key=gen_key,
        root=root,
        progress=progress,
    )
    start = time.perf_counter()
    glob, tokens, rows = sample_pool(
        gen,
        features,
        labels,
        class_text=class_text,
        unknown_text=unknown_text,
        config=config,
        seed=seed,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    domains = [features.domains[i] for i in rows.tolist()]

    def write(tmp: Path) -> None:
        tensors = {"global": glob.half(), "tokens": tokens.half(), "source_index": rows}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "pool.safetensors"))
        with open(tmp / "samples.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["index", "source_index", "source_label", "domain", "sigma", "g", "seed"])
            for i, (r, d) in enumerate(zip(rows.tolist(), domains, strict=True)):
                w.writerow([i, r, int(labels[r]), d, config.sigma, config.guidance, seed])
        info = {
            "format": _FORMAT,
            "key": key,
            "generator_key": gen_key,
            "source_fingerprint": fingerprint,
            "seed": seed,
            "config": dataclasses.asdict(config),
            "n": len(rows),
            "domains": domains,
            "per_domain": {d: domains.count(d) for d in gen.domains},
            "global_shape": list(glob.shape),
            "tokens_shape": list(tokens.shape),
            "sample_seconds": round(seconds, 3),
            "created": _now(),
        }
        (tmp / "manifest.json").write_text(json.dumps(info, indent=1))  # last: completion

    _write_atomically(entry, write)
    return load_pool(entry)


def sample_pool(
    gen: FeatureGenerator,
    features: Features,
    labels: Tensor,
    *,
    class_text: Tensor,
    unknown_text: Tensor,
    config: FeatureDiffusionConfig,
    seed: int,
    progress: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """(global [M, d], tokens [M, N, d], source rows [M]): ``pool_per_domain`` per domain.

    Each domain's images condition the samples in turn (reshuffled every cycle). The negative
    text is the normalised mean of the known classes' features (``negative="all"``, the
    feature-space reading of "the known class names as the negative prompt") or the
    conditioning image's own class (``"own"``).
    """
    rng = torch.Generator().manual_seed(seed)
    rows = []
    for domain in gen.domains:
        idx = torch.tensor([i for i, d in enumerate(features.domains) if d == domain])
        cycles = -(-config.pool_per_domain // len(idx))
        order = torch.cat([idx[torch.randperm(len(idx), generator=rng)] for _ in range(cycles)])
        rows.append(order[: config.pool_per_domain])
    rows = torch.cat(rows)
    class_text = F.normalize(class_text.float(), dim=-1)
    if config.negative == "all":
        neg = F.normalize(class_text.mean(0), dim=-1).expand(len(rows), -1)
    else:
        neg = class_text[labels[rows].long()]
    pos = unknown_text.float().reshape(1, -1).expand(len(rows), -1)
    total = -(-len(rows) // CHUNK) * config.sample_steps
    with tqdm(total=total, desc="diffusion: sample", disable=not progress) as bar:
        glob, tokens = gen.generate(
            features,
            rows,
            pos,
            neg,
            sigma=config.sigma,
            guidance=config.guidance,
            steps=config.sample_steps,
            clip_x0=config.clip_x0,
            detail=config.detail,
            generator=rng,
            bar=bar,
        )
    return glob, tokens, rows


def load_pool(entry: Path) -> FeaturePool:
    """A pool folder written by :func:`build_pool`."""
    entry = Path(entry)
    meta = json.loads((entry / "manifest.json").read_text())
    t = load_tensors(entry / "pool.safetensors")
    return FeaturePool(t["global"], t["tokens"], tuple(meta["domains"]), t["source_index"], entry)


__all__ = [
    "FeatureDiffusionConfig",
    "FeatureGenerator",
    "FeaturePool",
    "build_pool",
    "load_pool",
    "sample_pool",
    "source_fingerprint",
]
