"""The zero-shot table of docs/tiny_clip.md: 10-way accuracy of tiny-digits on the benchmark.

Generates (or reuses) the embedded digits benchmark under $SEECLIP_HOME and prints a Markdown
table: the shipped weights with the card's template ensemble and with the single template that
`seeclip eval --method zeroshot` uses, and the same architecture with random weights.

    python scripts/tiny_digits_zero_shot.py
"""

from __future__ import annotations

import numpy as np
import torch

from seeclip.datasets.digits import DOMAINS, read_meta
from seeclip.paths import seeclip_home
from seeclip.zoo.pretrain import PRIMARY_TEMPLATE, PretrainConfig, load_benchmark_arrays
from seeclip.zoo.pretrain import zero_shot_accuracy as accuracy
from seeclip.zoo.tiny_clip import TINY_DIGITS_WEIGHTS, build_tiny_digits


def main() -> None:
    torch.set_num_threads(1)
    data = load_benchmark_arrays()
    shipped, _, tokenizer = build_tiny_digits(TINY_DIGITS_WEIGHTS)
    random, _, _ = build_tiny_digits(None, seed=0)
    columns = {
        "tiny-digits, ensemble": accuracy(
            shipped, tokenizer, data, templates=tuple(PretrainConfig().eval_templates)
        ),
        "tiny-digits, single template": accuracy(
            shipped, tokenizer, data, templates=(PRIMARY_TEMPLATE,)
        ),
        "random-weights CLIP": accuracy(random, tokenizer, data, templates=(PRIMARY_TEMPLATE,)),
    }
    print("| domain | " + " | ".join(columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    for domain in DOMAINS:
        print(f"| {domain} | " + " | ".join(f"{c[domain]:.1%}" for c in columns.values()) + " |")
    means = [np.mean([c[d] for d in DOMAINS]) for c in columns.values()]
    print("| **mean** | " + " | ".join(f"**{m:.1%}**" for m in means) + " |")
    meta = read_meta(seeclip_home() / "data" / "digits")
    print(f"\ndata: {meta['content_hash'][:16]} (digits benchmark content hash)")


if __name__ == "__main__":
    main()
