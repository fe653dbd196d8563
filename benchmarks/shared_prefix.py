"""Shared-prefix vs full text encoding in SeeCLIP's and CoCoOp's training step, side by side.

ViT-B-16 with random weights on CPU (speed does not depend on the values), at the shapes of
three benchmarks: PACS (7 classes + the unknown prompt, batch 16), Office-Home (65 + 1,
batch 6) and Mini-DomainNet (126 + 1, batch 6), with the benchmarks' real class names (their
token lengths decide the suffix buckets). For each shape, in one process and alternating:

- **full**: ``prompt.shared_prefix=false``; all B x (C + 1) prompts through the text tower,
  truncated at the longest end token (seeclip's path until now);
- **shared**: ``prompt.shared_prefix=true`` (the default); each image's ``[SOS][dom][sem_1..K]``
  once, the class names against its cached keys and values (seeclip/methods/shared_prefix.py);
- **authors' way** (SeeCLIP only): what the released implementation does every step: the
  image tower on the batch's images (seeclip caches image features instead) and every prompt
  padded to the 77-token context, the last block at all positions. ``--authors-chunk N`` runs
  it N images at a time (the same arithmetic; its memory column is then per chunk).

A step is forward + backward of the method's loss (no optimiser: its cost does not change with
the path). Time: the process's CPU time (``time.process_time``; with one torch thread it
counts this step's work and not the time other processes held the cores, which on a shared
machine swings wall-clock times by 2x), best of ``--repeats`` after one warm-up step per path;
the wall-clock time of that step is printed beside it.
Memory: the bytes autograd saves for backward during the forward (distinct storages, the frozen
weights excluded): the activation memory a step holds until its backward. Not the process's
RSS, which other work on the machine and the allocator's caching blur.

    python benchmarks/shared_prefix.py [--repeats 1] [--shapes pacs office_home mini_domainnet]
        [--authors pacs] [--threads 1]

The last line reads ``shared_prefix seeclip_pacs=<x>x seeclip_office_home=<y>x
cocoop_pacs=<z>x max_abs_diff=<d>`` (speed-ups of shared over full; d: the largest logit
difference between the two paths over every step, float32).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import seeclip.backbone as backbone_module
from seeclip.backbone import build_backbone
from seeclip.datasets.specs import get_benchmark
from seeclip.losses import alignment_terms
from seeclip.methods.cocoop import CoCoOpModel
from seeclip.methods.seeclip import LossConfig, SeeCLIPModel, seeclip_terms

SHAPES = {"pacs": 16, "office_home": 6, "mini_domainnet": 6}  # benchmark -> batch size


class SavedActivations:
    """Bytes of the distinct storages autograd saves for backward inside the ``with`` block,
    ``module``'s parameters and buffers excluded (frozen weights are not activations)."""

    def __init__(self, module: torch.nn.Module) -> None:
        tensors = itertools.chain(module.parameters(), module.buffers())
        self.exclude = {t.untyped_storage().data_ptr() for t in tensors}
        self.sizes: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self.sizes[storage.data_ptr()] = storage.nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @property
    def mib(self) -> float:
        return sum(self.sizes.values()) / 2**20


@dataclass
class Step:
    seconds: float  # CPU time of this process (what the ratios use)
    wall: float
    mib: float
    logits: torch.Tensor
    grads: list[torch.Tensor]


@contextlib.contextmanager
def authors_text_tower(backbone):
    """Every prompt padded to the whole context and run at every position, as the released
    code does (seeclip truncates at the longest end token and runs the last block at the end
    token only)."""
    encode = backbone.encode_text_embeddings

    def full_context(embeds, eot_index, *, truncate=True):
        padded = F.pad(embeds, (0, 0, 0, backbone.context_length - embeds.shape[1]))
        return encode(padded, eot_index, truncate=False)

    backbone.encode_text_embeddings = full_context  # an instance attribute shadows the method
    eot_only, backbone_module.EOT_ONLY_LAST_BLOCK = backbone_module.EOT_ONLY_LAST_BLOCK, False
    try:
        yield
    finally:
        del backbone.encode_text_embeddings
        backbone_module.EOT_ONLY_LAST_BLOCK = eot_only


def step(model, loss_fn, inputs, labels, *, shared: bool) -> Step:
    """One forward + backward from cached features ``inputs`` = (global, tokens)."""
    model.shared_prefix = shared
    params = model.learnable_parameters()
    for p in params:
        p.grad = None
    saved = SavedActivations(model)
    start, wall = time.process_time(), time.perf_counter()
    with saved.hooks():
        out = model(*inputs)
        loss = loss_fn(out, labels)["total"]
    loss.backward()
    seconds, wall = time.process_time() - start, time.perf_counter() - wall
    return Step(seconds, wall, saved.mib, out.logits.detach(), [p.grad.clone() for p in params])


def authors_step(model, loss_fn, images, labels, chunk: int) -> Step:
    """The released code's step: image features recomputed, 77-token prompts, ``chunk``
    images at a time (the gradients add up)."""
    model.shared_prefix = False
    for p in model.learnable_parameters():
        p.grad = None
    peak, logits = 0.0, []
    start, wall = time.process_time(), time.perf_counter()
    with authors_text_tower(model.backbone):
        for i in range(0, images.shape[0], chunk):
            with torch.no_grad():
                inputs = model.backbone.encode_image(images[i : i + chunk])
            saved = SavedActivations(model)
            with saved.hooks():
                out = model(*inputs)
                loss = loss_fn(out, labels[i : i + chunk])["total"]
            loss.backward()
            logits.append(out.logits.detach())
            peak = max(peak, saved.mib)  # the largest chunk's activations
    seconds, wall = time.process_time() - start, time.perf_counter() - wall
    return Step(seconds, wall, peak, torch.cat(logits), [])


def best(runs: list[Step]) -> Step:
    return min(runs, key=lambda s: s.seconds)


def max_rel_grad_diff(a: Step, b: Step) -> float:
    return max(
        float((x - y).abs().max()) / max(1.0, float(x.abs().max()))
        for x, y in zip(a.grads, b.grads, strict=True)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="ViT-B-16")
    p.add_argument("--repeats", type=int, default=1, help="timed steps per path (best is kept)")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument(
        "--authors",
        nargs="*",
        default=["pacs"],
        choices=list(SHAPES),
        help="shapes at which to time the released code's step (slow: image tower + 77 tokens)",
    )
    p.add_argument("--authors-chunk", type=int, default=16, help="images per authors' pass")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if "pacs" not in args.shapes:
        p.error("--shapes must include pacs (the last line reports it)")
    torch.set_num_threads(args.threads)

    backbone = build_backbone(args.arch)
    d, n, size = backbone.embed_dim, backbone.num_patches, backbone.image_size
    loss = LossConfig()
    print(
        f"{args.arch} (random weights), {n} patch tokens x {d}, K = 4 semantic tokens, "
        f"m = 4 unknown vectors, CoCoOp n_ctx = 4; torch threads {torch.get_num_threads()}; "
        f"best of {args.repeats}"
    )
    header = (
        f"{'shape':<15} {'method':<8} {'path':<12} {'prompts':>7} {'CPU time':>9} {'wall':>8} "
        f"{'saved act.':>11} {'speed-up':>9}  max |d logit|  max grad diff"
    )
    print(header)
    print("-" * len(header))
    ratios: dict[str, float] = {}
    worst = 0.0
    warmed = False
    for shape in args.shapes:
        spec = get_benchmark(shape)
        texts = tuple(spec.class_text(c) for c in spec.classes)
        b, c = SHAPES[shape], len(texts)
        gen = torch.Generator().manual_seed(0)
        inputs = (F.normalize(torch.randn(b, d, generator=gen), dim=-1), torch.randn(b, n, d))
        labels = torch.randint(0, c + 1, (b,), generator=gen)  # c = pseudo-unknown
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            seeclip = SeeCLIPModel(backbone, texts, k=4, m=4)
            cocoop = CoCoOpModel(backbone, texts, n_ctx=4)
        methods = {
            "seeclip": (seeclip, lambda o, y, m=seeclip: seeclip_terms(o, y, model=m, loss=loss)),
            # CoCoOp has no unknown prompt: its batches hold known images only
            "cocoop": (cocoop, lambda o, y, c=c: alignment_terms(o, y.clamp(max=c - 1))),
        }
        for name, (model, loss_fn) in methods.items():
            prompts = b * (c + 1 if name == "seeclip" else c)
            if not warmed:  # allocator and thread pools, once per path
                for shared in (False, True):
                    step(model, loss_fn, inputs, labels, shared=shared)
            runs: dict[bool, list[Step]] = {False: [], True: []}
            for _ in range(args.repeats):
                for shared in (False, True):
                    runs[shared].append(step(model, loss_fn, inputs, labels, shared=shared))
            full, shared = best(runs[False]), best(runs[True])
            diff = float((full.logits - shared.logits).abs().max())
            worst = max(worst, diff)
            ratio = full.seconds / shared.seconds
            ratios[f"{name}_{shape}"] = ratio
            for label, run, extra in (
                ("full", full, ""),
                (
                    "shared",
                    shared,
                    f"{ratio:8.2f}x  {diff:12.1e}  {max_rel_grad_diff(full, shared):12.1e}",
                ),
            ):
                print(
                    f"{shape:<15} {name:<8} {label:<12} {prompts:>7} {run.seconds:8.2f}s "
                    f"{run.wall:7.2f}s {run.mib:7.0f} MiB {extra}"
                )
            if name == "seeclip" and shape in args.authors:
                images = torch.randn(b, 3, size, size, generator=gen)
                chunk = min(args.authors_chunk, b)
                authors = authors_step(model, loss_fn, images, labels, chunk)
                ratios[f"authors_{shape}"] = authors.seconds / shared.seconds
                note = f" ({chunk} img/pass)" if chunk < b else ""
                print(
                    f"{shape:<15} {name:<8} {'authors way':<12} {prompts:>7} "
                    f"{authors.seconds:8.2f}s {authors.wall:7.2f}s {authors.mib:7.0f} MiB "
                    f"{shared.seconds / authors.seconds:8.3f}x  (shared is "
                    f"{authors.seconds / shared.seconds:.1f}x faster){note}"
                )
        warmed = True
    print(
        "speed-up: full / shared CPU time; authors' row: shared / authors. saved act.: bytes "
        "autograd keeps for backward (frozen weights excluded)"
    )
    print(
        f"shared_prefix seeclip_pacs={ratios['seeclip_pacs']:.2f}x "
        f"seeclip_office_home={ratios.get('seeclip_office_home', float('nan')):.2f}x "
        f"cocoop_pacs={ratios['cocoop_pacs']:.2f}x max_abs_diff={worst:.1e}"
    )


if __name__ == "__main__":
    main()
