"""Writing the embedded ``glyphs`` benchmark tree and its captioned pretraining corpus.

Same contract as the ``digits`` writer (:mod:`seeclip.datasets.digits.writer`): every image has
its own generator seeded by ``(seed, role, domain, concept, index)``, a tree is reused only when
its ``meta.json`` names the same parameters and renderer and its bytes still hash to the
recorded ``content_hash``. Images are drawn by ``workers`` processes (the output does not depend
on how many).

Layout of :func:`generate_benchmark`: ``<root>/<domain>/<class>/<index:05d>.png`` and
``meta.json``; of :func:`generate_corpus`: ``images.npy`` (uint8 [N, S, S, 3]),
``captions.json``, ``labels.npy`` (index into ``CONCEPTS``), ``domains.npy`` and ``meta.json``.
"""

from __future__ import annotations

import functools
import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from seeclip.datasets.digits import render as digits_render
from seeclip.datasets.digits.writer import (
    content_hash,
    installed_versions,
    progress_bar,
    reusable,
    write_corpus_arrays,
)
from seeclip.datasets.glyphs import captions, render
from seeclip.datasets.glyphs.render import CONCEPTS, DOMAINS, IMAGE_SIZE, ROLES
from seeclip.io import atomic_dir, write_json

__all__ = [
    "BENCHMARK_CLASSES",
    "GENERATOR_VERSION",
    "generate_benchmark",
    "generate_corpus",
    "renderer_hash",
]

GENERATOR_VERSION = "1"
# The classes of specs/glyphs.yaml in label order (a test keeps the two equal): 12 known, 6 hard
# unknowns (each a look-alike of a known one), 6 easy unknowns.
BENCHMARK_CLASSES: tuple[str, ...] = (
    "A",
    "B",
    "C",
    "E",
    "H",
    "K",
    "M",
    "O",
    "P",
    "S",
    "T",
    "X",
    "Q",
    "F",
    "R",
    "G",
    "eight",
    "five",
    "two",
    "four",
    "nine",
    "J",
    "U",
    "Z",
)
_CONCEPT_NAMES = tuple(CONCEPTS)


@functools.lru_cache(maxsize=2)
def renderer_hash(*, with_captions: bool = False) -> str:
    """SHA-256 (12 hex) of the code that draws the images (and writes the captions)."""
    digest = hashlib.sha256(GENERATOR_VERSION.encode())
    modules = (digits_render, render) + ((captions,) if with_captions else ())
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:12]


def _draw(job: tuple) -> tuple[np.ndarray, dict, str | None]:
    """Render one image: job = (seed, role, domain index, concept index, index, size, caption)."""
    seed, role, d, c, i, size, with_caption = job
    rng = np.random.default_rng([seed, ROLES.index(role), d, c, i])
    img, attrs = render.render_glyph(_CONCEPT_NAMES[c], DOMAINS[d], rng, image_size=size, role=role)
    return img, attrs, captions.make_caption(attrs, rng) if with_caption else None


def _draw_all(jobs: list[tuple], workers: int, desc: str, progress: bool):
    """Yield ``_draw`` of every job in order, on ``workers`` processes (1: in this one)."""
    if workers <= 1:
        yield from progress_bar(map(_draw, jobs), len(jobs), desc, progress)
        return
    with ProcessPoolExecutor(workers) as pool:
        chunk = max(1, min(256, len(jobs) // (8 * workers)))
        yield from progress_bar(pool.map(_draw, jobs, chunksize=chunk), len(jobs), desc, progress)


def _default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def _meta(tmp: Path, expected: dict, attrs: list[dict], classes) -> dict:
    return {
        **expected,
        "content_hash": content_hash(tmp, expected["kind"]),
        "install": installed_versions(),
        "domains": list(DOMAINS),
        "classes": list(classes),
        "fonts_used": sorted({a["font"] for a in attrs} - {None}),
        "photos_used": sorted({a["photo"] for a in attrs} - {None}),
        "fonts": digits_render.font_pools(),
        "photos": digits_render.photo_pools(),
    }


def generate_benchmark(
    root: Path,
    *,
    n_per_class: int = 100,
    seed: int = 0,
    image_size: int = IMAGE_SIZE,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Write the benchmark tree (:data:`BENCHMARK_CLASSES`, every domain) under ``root``."""
    root = Path(root)
    expected = {
        "kind": "benchmark",
        "world": "glyphs",
        "version": GENERATOR_VERSION,
        "renderer": renderer_hash(),
        "seed": seed,
        "image_size": image_size,
        "n_per_class": n_per_class,
    }
    if reusable(root, expected):
        return root
    index = {name: k for k, name in enumerate(_CONCEPT_NAMES)}
    jobs = [
        (seed, "benchmark", d, index[c], i, image_size, False)
        for d in range(len(DOMAINS))
        for c in BENCHMARK_CLASSES
        for i in range(n_per_class)
    ]
    attrs_all = []
    with atomic_dir(root, marker="meta.json") as tmp:
        drawn = _draw_all(jobs, workers or _default_workers(), "glyphs benchmark", progress)
        for job, (img, attrs, _) in zip(jobs, drawn, strict=True):
            _, _, d, c, i, _, _ = job
            folder = tmp / DOMAINS[d] / _CONCEPT_NAMES[c]
            if i == 0:
                folder.mkdir(parents=True)
            Image.fromarray(img).save(folder / f"{i:05d}.png", optimize=False, compress_level=1)
            attrs_all.append(attrs)
        write_json(tmp / "meta.json", _meta(tmp, expected, attrs_all, BENCHMARK_CLASSES))
    return root


def generate_corpus(
    root: Path,
    *,
    n: int = 100000,
    seed: int = 1,
    image_size: int = IMAGE_SIZE,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Write ``n`` captioned images of every concept (corpus fonts and photos) under ``root``.

    Sample ``k`` has domain ``k % 4`` and concept ``(k // 4) % len(CONCEPTS)``, so any prefix
    is balanced over domains and concepts.
    """
    root = Path(root)
    expected = {
        "kind": "corpus",
        "world": "glyphs",
        "version": GENERATOR_VERSION,
        "renderer": renderer_hash(with_captions=True),
        "seed": seed,
        "image_size": image_size,
        "n": n,
    }
    if reusable(root, expected):
        return root
    n_concepts = len(_CONCEPT_NAMES)
    jobs = [
        (seed, "corpus", k % len(DOMAINS), (k // len(DOMAINS)) % n_concepts, k, image_size, True)
        for k in range(n)
    ]
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    labels = np.array([job[3] for job in jobs], dtype=np.int64)
    domains = np.array([job[2] for job in jobs], dtype=np.int64)
    texts, attrs_all = [], []
    drawn = _draw_all(jobs, workers or _default_workers(), "glyphs corpus", progress)
    for k, (img, attrs, caption) in enumerate(drawn):
        images[k] = img
        texts.append(caption)
        attrs_all.append(attrs)
    with atomic_dir(root, marker="meta.json") as tmp:
        write_corpus_arrays(tmp, images, labels, domains, texts)
        meta = _meta(tmp, expected, attrs_all, _CONCEPT_NAMES)
        meta["concepts"] = {name: CONCEPTS[name].kind for name in _CONCEPT_NAMES}
        write_json(tmp / "meta.json", meta)
    return root
