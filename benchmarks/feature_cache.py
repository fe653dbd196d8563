"""Cached vs recomputed image features for ViT-B-16 (random weights), side by side in one run.

Builds a small folder of 224 px images, encodes it once through the frozen image encoder
(filling the cache), then reads the same features back from the memory-mapped cache.

    python benchmarks/feature_cache.py [--arch ViT-B-16] [--images 64] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from seeclip.backbone import build_backbone
from seeclip.cache import encode_cached


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="ViT-B-16")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()

    backbone = build_backbone(args.arch)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        root.mkdir()
        paths = []
        for i in range(args.images):
            pixels = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"{i:04d}.png")
            paths.append(f"{i:04d}.png")
        cache = Path(tmp) / "cache"

        def run():
            feats = encode_cached(
                backbone,
                root,
                paths,
                cache_dir=cache,
                name="bench",
                batch_size=args.batch_size,
                progress=False,
            )
            return feats.torch(np.arange(len(paths)))

        start = time.perf_counter()
        g1, t1 = run()  # builds the cache: one encoder pass per image
        built = time.perf_counter() - start
        start = time.perf_counter()
        g2, t2 = run()  # key check (stat of every file) + memmap read
        cached = time.perf_counter() - start
        size = sum(f.stat().st_size for f in cache.rglob("*.npy"))

    print(
        f"{args.arch}: {args.images} images, {t1.shape[1]} tokens x {t1.shape[2]} dims, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"encode (fill cache)  {built:8.3f} s  ({built / args.images * 1000:.1f} ms/image)")
    print(f"read from cache      {cached:8.3f} s  ({cached / args.images * 1000:.2f} ms/image)")
    print(
        f"speed-up             {built / cached:8.1f}x   cache size {size / 2**20:.1f} MiB "
        f"(fp16), identical: {torch.equal(g1, g2) and torch.equal(t1, t2)}"
    )


if __name__ == "__main__":
    main()
