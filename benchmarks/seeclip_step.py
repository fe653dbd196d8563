"""One SeeCLIP training step at PACS scale on CPU: ViT-B-16 (random weights), 6 known classes
+ the unknown prompt, batch 16, 196 patch tokens of width 512, from cached-feature shapes.

Prints the step time (forward + backward + AdamW) and the process's peak memory, and the same
for CoOp side by side (its text features are shared by all images, SeeCLIP's are per image).

    python benchmarks/seeclip_step.py [--arch ViT-B-16] [--batch 16] [--steps 3]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from seeclip.backbone import build_backbone
from seeclip.config import TrainConfig
from seeclip.losses import alignment_terms
from seeclip.methods.coop import CoOpModel
from seeclip.methods.seeclip import LossConfig, SeeCLIPModel, seeclip_terms

PACS_KNOWN = ("dog", "elephant", "giraffe", "guitar", "horse", "house")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def step_time(model, loss_fn, g, t, y, steps: int) -> float:
    params = [p for p in model.learnable_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-5)
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        terms = loss_fn(model(g, t), y)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, TrainConfig().grad_clip)
        opt.step()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="ViT-B-16")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()

    backbone = build_backbone(args.arch)
    base = peak_rss_mib()
    gen = torch.Generator().manual_seed(0)
    n, d = backbone.num_patches, backbone.embed_dim
    g = torch.nn.functional.normalize(torch.randn(args.batch, d, generator=gen), dim=-1)
    t = torch.randn(args.batch, n, d, generator=gen)
    y = torch.randint(0, len(PACS_KNOWN) + 1, (args.batch,), generator=gen)  # some pseudo-unknowns

    seeclip = SeeCLIPModel(backbone, PACS_KNOWN, k=4, m=4)
    loss = LossConfig()
    s_time = step_time(
        seeclip, lambda o, y_: seeclip_terms(o, y_, model=seeclip, loss=loss), g, t, y, args.steps
    )
    s_peak = peak_rss_mib()
    coop = CoOpModel(backbone, PACS_KNOWN, n_ctx=4, unknown_prompt=True, m=4)
    c_time = step_time(coop, alignment_terms, g, t, y, args.steps)

    print(
        f"{args.arch}: batch {args.batch}, {n} patch tokens x {d}, {len(PACS_KNOWN)} known + "
        f"unknown prompt, torch threads {torch.get_num_threads()}"
    )
    print(f"backbone loaded           peak RSS {base:8.0f} MiB")
    print(
        f"seeclip step              {s_time * 1000:8.0f} ms   peak RSS {s_peak:8.0f} MiB "
        f"(+{s_peak - base:.0f} MiB over the frozen backbone)"
    )
    print(f"coop_unknown step         {c_time * 1000:8.0f} ms")
    print(f"seeclip / coop_unknown    {s_time / c_time:8.1f}x  ({args.batch} x 7 prompts vs 7)")


if __name__ == "__main__":
    main()
