"""Writing the embedded ``digits`` benchmark tree and its captioned pretraining corpus.

Every image comes from its own generator seeded by ``(seed, role, domain, digit, index)``, so
output does not depend on generation order. A tree is reused only when its ``meta.json`` names
the same parameters *and* the same renderer (a hash of the rendering code), and its files still
hash to the ``content_hash`` recorded there; otherwise it is written anew (seconds). Run records
carry that hash, so a table names the exact bytes it was computed on.

Layout written by :func:`generate_benchmark` (DomainBed style)::

    <root>/meta.json
    <root>/<domain>/<class word>/<index:05d>.png

and by :func:`generate_corpus`: ``images.npy`` (uint8 [N, S, S, 3]), ``captions.json``,
``labels.npy``, ``domains.npy`` (index into ``DOMAINS``) and ``meta.json``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image

from seeclip.datasets.digits import captions, render
from seeclip.datasets.digits.render import DIGIT_WORDS, DOMAINS, ROLES
from seeclip.io import atomic_dir, tree_hash, write_json

GENERATOR_VERSION = "2"
# the packages whose code draws the pixels; their versions are recorded in meta.json
RENDER_PACKAGES = ("numpy", "pillow", "matplotlib", "scikit-image", "scikit-learn", "scipy")


@functools.lru_cache(maxsize=2)
def renderer_hash(*, with_captions: bool = False) -> str:
    """SHA-256 (12 hex) of the code that draws the images (and writes the captions)."""
    digest = hashlib.sha256(GENERATOR_VERSION.encode())
    for module in (render, captions) if with_captions else (render,):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:12]


def installed_versions(packages: tuple[str, ...] = RENDER_PACKAGES) -> dict[str, str]:
    """Installed version of each distribution (``"missing"`` where it is not installed)."""
    return dict(_versions(tuple(packages)))


@functools.lru_cache(maxsize=8)
def _versions(packages: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    out = []
    for name in packages:
        try:
            out.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            out.append((name, "missing"))
    return tuple(out)


def read_meta(root: str | Path) -> dict | None:
    """The ``meta.json`` of a generated tree, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(root) / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def content_hash(root: str | Path, kind: str) -> str:
    """SHA-256 of a generated tree's data files (every file but ``meta.json``)."""
    pattern = "*/*/*.png" if kind == "benchmark" else "*"
    return tree_hash(root, pattern, exclude=("meta.json",))


def reusable(root: Path, expected: dict) -> bool:
    """True when ``root`` holds a tree written with ``expected`` parameters, bytes unchanged."""
    meta = read_meta(root)
    if meta is None or any(meta.get(k) != v for k, v in expected.items()):
        return False
    return meta.get("content_hash") == content_hash(root, expected["kind"])


def _meta(tmp: Path, expected: dict, used_fonts: set, used_photos: set) -> dict:
    """``meta.json`` of a tree just written to ``tmp``: parameters, hashes, install, pools."""
    hw = render.handwritten_pools()
    return {
        **expected,
        "content_hash": content_hash(tmp, expected["kind"]),
        "install": installed_versions(),
        "domains": list(DOMAINS),
        "classes": list(DIGIT_WORDS),
        "fonts_used": sorted(used_fonts - {None}),
        "photos_used": sorted(used_photos - {None}),
        "fonts": render.font_pools(),
        "photos": render.photo_pools(),
        "handwritten_indices": {r: sorted(int(i) for p in hw[r] for i in p) for r in ROLES},
    }


def write_corpus_arrays(folder: Path, images, labels, domains, captions: list[str]) -> None:
    """A corpus' data files: ``images.npy``, ``labels.npy``, ``domains.npy``, ``captions.json``."""
    np.save(folder / "images.npy", images)
    np.save(folder / "labels.npy", labels)
    np.save(folder / "domains.npy", domains)
    (folder / "captions.json").write_text(json.dumps(captions))


def progress_bar(iterable, total: int, desc: str, enabled: bool):
    """``iterable`` wrapped in a tqdm bar when ``enabled``."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc)


def generate_benchmark(
    root: Path,
    *,
    n_per_class: int = 200,
    seed: int = 0,
    image_size: int = 32,
    progress: bool = True,
) -> Path:
    """Write the benchmark tree under ``root`` (or return it if already generated alike)."""
    root = Path(root)
    expected = {
        "kind": "benchmark",
        "version": GENERATOR_VERSION,
        "renderer": renderer_hash(),
        "seed": seed,
        "image_size": image_size,
        "n_per_class": n_per_class,
    }
    if reusable(root, expected):
        return root
    role_id = ROLES.index("benchmark")
    jobs = [(d, c, i) for d in range(len(DOMAINS)) for c in range(10) for i in range(n_per_class)]
    used_fonts, used_photos = set(), set()
    with atomic_dir(root, marker="meta.json") as tmp:
        for d, c, i in progress_bar(jobs, len(jobs), "digits benchmark", progress):
            rng = np.random.default_rng([seed, role_id, d, c, i])
            img, attrs = render.render_digit(
                c, DOMAINS[d], rng, image_size=image_size, role="benchmark"
            )
            used_fonts.add(attrs["font"])
            used_photos.add(attrs["photo"])
            folder = tmp / DOMAINS[d] / DIGIT_WORDS[c]
            if i == 0:
                folder.mkdir(parents=True)
            Image.fromarray(img).save(folder / f"{i:05d}.png", optimize=False, compress_level=1)
        write_json(tmp / "meta.json", _meta(tmp, expected, used_fonts, used_photos))
    return root


def generate_corpus(
    root: Path,
    *,
    n: int = 60000,
    seed: int = 1,
    image_size: int = 32,
    progress: bool = True,
) -> Path:
    """Write ``n`` captioned images (all domains and digits, corpus pools only) under ``root``.

    Sample ``k`` has domain ``k % 4`` and digit ``(k // 4) % 10``, so any prefix is balanced.
    """
    root = Path(root)
    expected = {
        "kind": "corpus",
        "version": GENERATOR_VERSION,
        "renderer": renderer_hash(with_captions=True),
        "seed": seed,
        "image_size": image_size,
        "n": n,
    }
    if reusable(root, expected):
        return root
    role_id = ROLES.index("corpus")
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    domains = np.empty(n, dtype=np.int64)
    texts: list[str] = []
    used_fonts, used_photos = set(), set()
    for k in progress_bar(range(n), n, "digits corpus", progress):
        d, c = k % len(DOMAINS), (k // len(DOMAINS)) % 10
        rng = np.random.default_rng([seed, role_id, d, c, k])
        images[k], attrs = render.render_digit(
            c, DOMAINS[d], rng, image_size=image_size, role="corpus"
        )
        texts.append(captions.make_caption(attrs, rng))
        labels[k], domains[k] = c, d
        used_fonts.add(attrs["font"])
        used_photos.add(attrs["photo"])
    with atomic_dir(root, marker="meta.json") as tmp:
        write_corpus_arrays(tmp, images, labels, domains, texts)
        write_json(tmp / "meta.json", _meta(tmp, expected, used_fonts, used_photos))
    return root
