"""Per-sample cost of the feature-space diffusion generator (training and DDIM sampling) on CPU.

Random source features of three shapes: tiny-vit (d=64, 16 tokens) and tiny-digits (d=128,
16 tokens), every token kept, and ViT-B-16 (d=512, 196 tokens, pooled to a 2x2 grid).
Training is timed over a few steps of the default batch and reported per training sample (and
per step); sampling is the default 20 DDIM steps with classifier-free guidance (two network
calls per step), reported per pool sample.

"setup" is the one-off work before training (k-means queries, summaries, statistics) for
``--n-source`` images. The last column extrapolates the cost of a default pool (setup, 1000
training steps, 256 pseudo-unknowns per domain, 3 source domains). Use no more threads than
there are free cores: oversubscribed, the small matrix products slow down ten-fold.

    python benchmarks/feature_generation.py [--threads 1] [--train-steps 20] [--n-source 600]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
import torch.nn.functional as F

from seeclip.generate.feature_diffusion import FeatureDiffusionConfig, FeatureGenerator, sample_pool
from seeclip.methods import Features

SHAPES = {"tiny-vit": (64, 16), "tiny-digits": (128, 16), "ViT-B-16": (512, 196)}  # (d, N)
DOMAINS = ("photo", "art", "cartoon")
CLASSES = 6


def random_source(n: int, d: int, n_tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    glob = F.normalize(torch.randn(n, d, generator=g), dim=-1).half()
    tokens = torch.randn(n, n_tokens, d, generator=g).half()
    domains = tuple(DOMAINS[i % len(DOMAINS)] for i in range(n))
    labels = torch.randint(CLASSES, (n,), generator=g)
    text = F.normalize(torch.randn(CLASSES + 1, d, generator=g), dim=-1)
    return Features(glob, tokens, domains), labels, text[:CLASSES], text[CLASSES]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--n-source", type=int, default=600)
    p.add_argument("--pool-per-domain", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    default = FeatureDiffusionConfig()
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {default.batch_size}")
    header = "shape | x dim | setup s | train ms/sample (ms/step) | sample ms/sample | default pool"
    print(header + "\n" + "-" * len(header))
    for name, (d, n_tokens) in SHAPES.items():
        feats, labels, class_text, unknown = random_source(args.n_source, d, n_tokens)
        cfg = dataclasses.replace(
            default, train_steps=args.train_steps, pool_per_domain=args.pool_per_domain
        )
        times = []
        for steps in (
            1,
            1,
            1 + args.train_steps,
        ):  # the first run warms up  # the difference is the cost of the steps
            start = time.perf_counter()
            gen, _ = FeatureGenerator.fit(
                feats,
                labels,
                class_text,
                config=dataclasses.replace(cfg, train_steps=steps),
                seed=0,
                progress=False,
            )
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        glob, _, _ = sample_pool(
            gen,
            feats,
            labels,
            class_text=class_text,
            unknown_text=unknown,
            config=cfg,
            seed=0,
            progress=False,
        )
        sample_s = time.perf_counter() - start
        step_s = (times[2] - times[1]) / args.train_steps
        setup_s = times[1]  # k-means queries, summaries and statistics, plus one step
        per_train = 1000 * step_s / cfg.batch_size
        per_sample = 1000 * sample_s / len(glob)
        pool_s = (
            setup_s + default.train_steps * step_s + 3 * default.pool_per_domain * per_sample / 1000
        )
        dim = gen.model.out.out_features
        print(
            f"{name} (d={d}, N={n_tokens}) | {dim} | {setup_s:.1f} | "
            f"{per_train:.2f} ({1000 * step_s:.0f}) | {per_sample:.2f} | {pool_s:.0f} s"
        )


if __name__ == "__main__":
    main()
