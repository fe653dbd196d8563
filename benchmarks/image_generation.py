"""Per-image cost of the image-space pseudo-unknown generator (semantic-guided SD sampling).

Runs ``generate_image_pool`` end to end (token perturbation and projection, prompt encoding,
CFG sampling, PNG writing) on the tiny random pipeline used by the tests, a strict lower bound
for SD-1.5 (about 1.6M UNet+VAE parameters against about 940M, 16 px against 512 px). With
``--model`` a real local pipeline is timed as well.

    python benchmarks/image_generation.py [--images 16] [--batch-size 4] [--steps 20]
        [--model /path/to/stable-diffusion-v1-5 --device cuda --model-images 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from seeclip.generate.image_diffusion import (
    ImageDiffusionConfig,
    build_tiny_pipeline,
    generate_image_pool,
    load_pipeline,
)


def ms_per_image(pipe, n: int, cfg: ImageDiffusionConfig, *, k: int, d: int) -> float:
    """Wall time of one pool of ``n`` images, in ms per image (after one warm-up image)."""
    tokens = torch.randn(n, k, d, generator=torch.Generator().manual_seed(0))
    domains = ["photo", "sketch"] * (n // 2) + ["photo"] * (n % 2)
    sources = [f"src/{i}.jpg" for i in range(n)]
    classes = ["dog", "elephant", "giraffe", "guitar", "horse", "house"]
    with tempfile.TemporaryDirectory() as tmp:
        generate_image_pool(  # warm-up: lazy imports, allocator, kernels
            pipe, tokens[:1], domains[:1], sources[:1], classes,
            out_dir=Path(tmp) / "warm", cfg=cfg, progress=False,
        )  # fmt: skip
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        generate_image_pool(
            pipe, tokens, domains, sources, classes,
            out_dir=Path(tmp) / "pool", cfg=cfg, progress=False,
        )  # fmt: skip
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / n * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=16, help="images of the tiny pipeline")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--k", type=int, default=4, help="semantic tokens per image")
    p.add_argument("--d", type=int, default=512, help="token width (512: ViT-B/16)")
    p.add_argument("--model", help="a local SD-1.x pipeline folder or cached repo id")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model-images", type=int, default=8, help="images of the --model pipeline")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 suits the tiny pipeline)")
    p.add_argument("--repeats", type=int, default=3, help="report the median of this many pools")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = ImageDiffusionConfig(steps=args.steps, batch_size=args.batch_size)
    tiny = build_tiny_pipeline(seed=0)
    runs = [ms_per_image(tiny, args.images, cfg, k=args.k, d=args.d) for _ in range(args.repeats)]
    ms = statistics.median(runs)
    print(
        f"tiny random SD (16 px, {cfg.steps} steps, g={cfg.guidance}, batch {cfg.batch_size}, "
        f"CPU, torch threads {torch.get_num_threads()}): {ms:8.1f} ms/image "
        f"(median of {len(runs)} pools of {args.images})"
    )
    if args.model:
        pipe = load_pipeline(args.model, device=args.device, dtype=cfg.torch_dtype(args.device))
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        ms = ms_per_image(pipe, args.model_images, cfg, k=args.k, d=args.d)
        print(
            f"{args.model} ({size} px, {cfg.steps} steps, batch {cfg.batch_size}, "
            f"{args.device}, {pipe.unet.dtype}): {ms:8.1f} ms/image"
        )


if __name__ == "__main__":
    main()
