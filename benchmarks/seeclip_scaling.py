"""What one SeeCLIP training step costs as the benchmark grows: ViT-B-16 shapes (random
weights; 196 patch tokens x 512, a 12-layer text tower of width 512), 7 / 65 / 126 / 345
classes (PACS, Office-Home, mini-DomainNet's 126, DomainNet's 345) and several batch sizes, in
fp32 and with the text tower under bf16 autocast (``prompt.text_precision=bf16``), side by side
in one run; then a profile of one step (where the time goes).

SeeCLIP encodes B x (C + 1) prompts per step (its prompts depend on the image), so the step
grows with B x C; the script prints that product, the step time per prompt, and the bf16
speed-up and its error (cosine of bf16 vs fp32 text features, and the largest logit change).

    OMP_NUM_THREADS=1 python benchmarks/seeclip_scaling.py [--classes 7 65 126 345]
        [--batch 2] [--batches 2 4 8] [--arch ViT-B-16] [--profile-classes 65]
"""

from __future__ import annotations

import argparse
import time

import torch

from seeclip.backbone import build_backbone
from seeclip.methods.seeclip import LossConfig, SeeCLIPModel, seeclip_terms


def _names(c: int) -> tuple[str, ...]:
    words = ("dog", "house", "guitar", "ice cream truck", "giraffe", "lamp", "horse", "zebra")
    return tuple(f"{words[i % len(words)]} {i}" for i in range(c))


def _inputs(backbone, batch: int, classes: int):
    gen = torch.Generator().manual_seed(0)
    n, d = backbone.num_patches, backbone.embed_dim
    g = torch.nn.functional.normalize(torch.randn(batch, d, generator=gen), dim=-1)
    t = torch.randn(batch, n, d, generator=gen)
    y = torch.randint(0, classes + 1, (batch,), generator=gen)
    return g.to(backbone.device), t.to(backbone.device), y.to(backbone.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_seconds(model, g, t, y, loss: LossConfig, steps: int = 1) -> float:
    """Best of ``steps`` timed steps (forward, backward, AdamW) after one warm-up step."""
    params = [p for p in model.learnable_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    best = float("inf")
    for i in range(steps + 1):
        _sync(g.device)
        start = time.perf_counter()
        terms = seeclip_terms(model(g, t), y, model=model, loss=loss)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        opt.step()
        _sync(g.device)
        if i:
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="ViT-B-16")
    p.add_argument("--classes", type=int, nargs="+", default=[7, 65, 126, 345])
    p.add_argument("--batch", type=int, default=2, help="batch of the class sweep")
    p.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=[2, 4, 8],
        help="batch sizes swept at the smallest class count",
    )
    p.add_argument("--profile-classes", type=int, default=65)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    backbone = build_backbone(args.arch, device=args.device)
    loss = LossConfig()
    print(
        f"{args.arch} on {args.device}: {backbone.num_patches} patch tokens x "
        f"{backbone.embed_dim}, torch threads {torch.get_num_threads()}\n"
    )
    print(
        "| C | B | prompts B x (C+1) | fp32 step | per prompt | bf16 step | bf16 speed-up | "
        "bf16 cos (min) | bf16 max logit change |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    cells = [(c, args.batch) for c in args.classes]
    cells += [(args.classes[0], b) for b in args.batches if b != args.batch]
    for c, b in cells:
        torch.manual_seed(0)
        model = SeeCLIPModel(backbone, _names(c), k=4, m=4)
        g, t, y = _inputs(backbone, b, c)
        with torch.no_grad():
            full = model(g, t)
            model.text_autocast = torch.bfloat16
            half = model(g, t)
        cos = (full.text * half.text).sum(-1).min().item()
        change = (full.logits - half.logits).abs().max().item()
        model.text_autocast = None
        fp32 = step_seconds(model, g, t, y, loss)
        model.text_autocast = torch.bfloat16
        bf16 = step_seconds(model, g, t, y, loss)
        n = b * (c + 1)
        print(
            f"| {c} | {b} | {n} | {fp32:.2f} s | {1000 * fp32 / n:.1f} ms | {bf16:.2f} s | "
            f"{fp32 / bf16:.2f}x | {cos:.4f} | {change:.3f} |",
            flush=True,
        )

    import seeclip.backbone as backbone_module

    c = args.profile_classes
    n = args.batch * (c + 1)
    ids = backbone.tokenize(["x x x x x " + name + "." for name in _names(c)] * args.batch)
    eot = backbone.eot_index(ids)

    def text_fwd_bwd() -> float:  # best of 5: the text tower alone, forward and backward
        best = float("inf")
        for _ in range(5):
            emb = backbone.embed_tokens(ids).detach().requires_grad_(True)
            _sync(emb.device)
            start = time.perf_counter()
            backbone.encode_text_embeddings(emb, eot).sum().backward()
            _sync(emb.device)
            best = min(best, time.perf_counter() - start)
        return best

    timings = {True: [], False: []}
    for fast in (True, False, True, False):  # alternated, so drifting load hits both alike
        backbone_module.EOT_ONLY_LAST_BLOCK = fast
        timings[fast].append(text_fwd_bwd())
    backbone_module.EOT_ONLY_LAST_BLOCK = True
    fast, whole = min(timings[True]), min(timings[False])
    print(
        f"\ntext tower forward + backward of {n} prompts (C = {c}, B = {args.batch}): last "
        f"block at the end token only {fast:.2f} s, at every position {whole:.2f} s, "
        f"{whole / fast:.2f}x"
    )

    torch.manual_seed(0)
    model = SeeCLIPModel(backbone, _names(c), k=4, m=4)
    g, t, y = _inputs(backbone, args.batch, c)
    step_seconds(model, g, t, y, loss, steps=0)  # warm up
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device != "cpu" else [])
    with profile(activities=activities) as prof:
        step_seconds(model, g, t, y, loss, steps=0)
    print(f"\nprofile of one fp32 step, C = {c}, B = {args.batch} (self CPU time, top 12):\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
