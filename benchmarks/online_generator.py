"""What the online generator (train.pseudo_unknowns=sd_online) costs: seconds per generated image
and generated images per epoch at each train.sd_every.

    python benchmarks/online_generator.py [--sd15 FOLDER] [--sizes 64 128 256] [--device cpu]

1. Per image: ``sample_images`` (the one sampling call of the offline pool and the online
   generator) on the shipped tiny-glyphs-sd at its own size and 20 steps, guidance 15; and,
   with ``--sd15``, on a diffusers folder of SD-1.5's architecture (e.g. the random-weight one
   ``scripts/rehearsal.py`` writes) at each ``--sizes``. SD-1.5 is timed at 2 and 4 steps; the
   20-step cost is the fitted line (fixed part + 20 x per-step part), printed as such.
2. Per epoch: images drawn in one epoch of the glyphs preset (exact, from the trainer's batch
   sampler on the prepared split) and of a PACS-sized run (approximate source sizes), at
   sd_every 1, 10 and 0.

One thread, timed in CPU seconds of this process (what an idle core would take as wall time;
robust to other jobs on the machine); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from seeclip.generate.image_pool import sample_images
from seeclip.generate.sd_conditioning import token_projection
from seeclip.generate.sd_pipeline import ImageDiffusionConfig, load_pipeline
from seeclip.trainer import BalancedBatches

K, D = 4, 512  # semantic tokens per image and their width (ViT-B/16's joint space)


def _clock(device: str):
    """CPU seconds of this process on the CPU; wall seconds after a sync on a GPU."""
    if device == "cpu":
        return time.process_time

    def wall() -> float:
        torch.cuda.synchronize()
        return time.perf_counter()

    return wall


def per_image(pipe, *, size: int | None, steps: int, batch: int, repeats: int) -> float:
    """Median CPU seconds per image over ``repeats`` calls of ``batch`` images."""
    cfg = ImageDiffusionConfig(model="bench", steps=steps, guidance=15.0, image_size=size)
    width = pipe.text_encoder.config.hidden_size
    proj = token_projection(D, width)
    g = torch.Generator().manual_seed(0)
    clock = _clock(str(pipe.device.type))
    times = []
    for r in range(repeats + 1):  # the first call warms up
        clean = torch.randn(batch, K, D, generator=g)
        noise = torch.randn(batch, K, D, generator=g)
        t0 = clock()
        sample_images(
            pipe,
            clean,
            noise,
            ["photo"] * batch,
            "dog, elephant, giraffe",
            cfg=cfg,
            projection=proj,
            latent_seeds=range(r * batch, (r + 1) * batch),
        )
        if r:
            times.append((clock() - t0) / batch)
    return statistics.median(times)


def images_per_epoch(domain_sizes: dict[str, int], batch: int, fraction: float, every: int,
                     pool_per_domain: int) -> int:  # fmt: skip
    """Images the online generator draws in one epoch (the trainer's own batch sampler)."""
    domains = tuple(d for d, n in domain_sizes.items() for _ in range(n))
    gen = torch.Generator().manual_seed(0)
    batches = BalancedBatches(domains, batch, pseudo_fraction=fraction, generator=gen)
    steps = -(-len(domains) // batch)
    total = 0
    for step in range(steps):
        _, counts = batches.next()
        if every == 1:
            total += sum(counts.values())
        elif every == 0 and step == 0:
            total += pool_per_domain * len(domain_sizes)
        elif every > 1 and step % every == 0:
            total += max([1, *counts.values()]) * len(domain_sizes)
    return total


def glyph_sizes() -> dict[str, int]:
    """Source training images per domain of the glyphs preset, target printed (prepared data)."""
    from seeclip import run_data
    from seeclip.run_config import load_config

    cfg = load_config("glyphs", ["data.target=printed"])
    run = run_data.load_run_data(cfg, progress=False)
    domains = run.features(run.data.source_train).domains
    return {d: domains.count(d) for d in sorted(set(domains))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sd15", help="a diffusers folder with SD-1.5's architecture")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    clock = "CPU seconds" if args.device == "cpu" else "seconds (wall clock)"
    print(f"torch {torch.__version__}, 1 thread, device {args.device}, {clock}\n")
    print("| model | side px | steps | batch | s / image |")
    print("|---|---|---|---|---|")
    tiny = load_pipeline("tiny-glyphs-sd", device=args.device, progress=False)
    for batch in (1, 4):
        s = per_image(tiny, size=None, steps=20, batch=batch, repeats=args.repeats)
        print(f"| tiny-glyphs-sd | 48 | 20 | {batch} | {s:.3f} |")
    costs = {"tiny-glyphs-sd": per_image(tiny, size=None, steps=20, batch=4, repeats=1)}
    del tiny
    if args.sd15:
        sd = load_pipeline(args.sd15, device=args.device, progress=False)
        for size in args.sizes:
            two = per_image(sd, size=size, steps=2, batch=1, repeats=args.repeats)
            four = per_image(sd, size=size, steps=4, batch=1, repeats=args.repeats)
            step = (four - two) / 2
            twenty = two + 18 * step
            print(f"| SD-1.5 shape | {size} | 2 | 1 | {two:.2f} |")
            print(f"| SD-1.5 shape | {size} | 4 | 1 | {four:.2f} |")
            print(f"| SD-1.5 shape | {size} | 20 (fitted) | 1 | {twenty:.1f} |")
            costs[f"SD-1.5 {size}px"] = twenty
    print("\nimages per epoch (and minutes per epoch at each model's 20-step cost):\n")
    try:
        glyphs = {"glyphs preset (batch 32)": (glyph_sizes(), 32)}
    except FileNotFoundError:  # not prepared on this machine: `seeclip prepare glyphs`
        glyphs = {}
    worlds = {
        **glyphs,
        # PACS target sketch, 6 known classes: ~90% of the known images of the three sources
        "PACS-sized (batch 16)": ({"art_painting": 1640, "cartoon": 1880, "photo": 1340}, 16),
    }
    head = " | ".join(costs)
    print(f"| run | sd_every | images / epoch | {head} |")
    print("|---|---|---|" + "---|" * len(costs))
    for name, (sizes, batch) in worlds.items():
        for every in (1, 10, 0):
            n = images_per_epoch(sizes, batch, 0.1, every, pool_per_domain=128)
            minutes = " | ".join(f"{n * c / 60:.1f}" for c in costs.values())
            print(f"| {name} | {every} | {n} | {minutes} |")


if __name__ == "__main__":
    main()
