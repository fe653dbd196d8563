"""Truncated vs full 77-token text encoding, side by side in one run.

SeeCLIP encodes B x (C+1) prompts per step through the frozen text tower. The tower only needs
to run up to the longest prompt's end token (exact under the causal mask); this measures what
that saves for ViT-B-16's text tower (random weights: speed does not depend on the values).

    python benchmarks/text_context.py [--arch ViT-B-16] [--prompts 112] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from seeclip.backbone import build_backbone


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="ViT-B-16")
    p.add_argument("--prompts", type=int, default=112, help="e.g. batch 16 x (7 classes + 1)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    backbone = build_backbone(args.arch)
    names = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person", "unknown"]
    texts = [f"a photo of a {names[i % len(names)]}." for i in range(args.prompts)]
    ids = backbone.tokenize(texts)
    eot = backbone.eot_index(ids)
    with torch.no_grad():
        embeds = backbone.embed_tokens(ids)
        full = _time(
            lambda: backbone.encode_text_embeddings(embeds, eot, truncate=False), args.repeats
        )
        short = _time(
            lambda: backbone.encode_text_embeddings(embeds, eot, truncate=True), args.repeats
        )
        diff = (
            (
                backbone.encode_text_embeddings(embeds, eot, truncate=False)
                - backbone.encode_text_embeddings(embeds, eot, truncate=True)
            )
            .abs()
            .max()
        )
    print(
        f"{args.arch}: {args.prompts} prompts, longest ends at token {int(eot.max()) + 1} of "
        f"{ids.shape[1]}; torch threads {torch.get_num_threads()}"
    )
    print(f"full context     {full * 1000:8.1f} ms")
    print(f"truncated        {short * 1000:8.1f} ms")
    print(f"speed-up         {full / short:8.2f}x   (max abs difference {diff:.2e})")


if __name__ == "__main__":
    main()
