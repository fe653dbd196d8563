"""Where this process computes: its device, and with torchrun the process group of one run.

``--device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) is resolved once per process by
:func:`resolve_device` and set with :func:`use_device`, as ``torch.cuda.set_device`` is: the
feature cache's image encoder, the trainer's prompt model and the image-space generator run
there; everything else (data, mixup and feature-diffusion pseudo-unknowns, metrics) stays on the
CPU, and results come back to the CPU.

``torchrun --nproc_per_node=N -m seeclip eval|train ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous (``MASTER_ADDR``, ``MASTER_PORT``); :func:`init_from_env` joins
the process group from them, NCCL when the device is a GPU (each rank on ``cuda:LOCAL_RANK``),
gloo on the CPU. What runs where:

- the feature cache is encoded in shards, one contiguous block of images per rank, into one
  entry that rank 0 completes (:mod:`seeclip.cache`); the cache folder must be on a file system
  every rank sees (one machine, or a shared mount across nodes);
- training (:mod:`seeclip.trainer`) draws the same global batch on every rank, exactly as one
  process would, and each rank runs rows ``rank::world`` of it through
  ``DistributedDataParallel``, which averages the gradients; every rank then takes the same step;
- only rank 0 writes checkpoints, records and predictions, and evaluates on the target.

Outside torchrun (``WORLD_SIZE`` unset or 1) every function here is a no-op for one process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "backend_for",
    "barrier",
    "broadcast_flag",
    "device",
    "init_from_env",
    "is_main",
    "main_first",
    "placed",
    "rank",
    "resolve_device",
    "use_device",
    "world_size",
]

_DEVICE = torch.device("cpu")
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(spec: str) -> torch.device:
    """``--device`` as a torch device, or a one-line ValueError that says what to pass instead.

    ``auto``: this process's own GPU (``cuda:LOCAL_RANK`` under torchrun) when torch sees one
    for every process of this machine, else the CPU. ``cuda`` without an index means that same
    ``cuda:LOCAL_RANK``."""
    text = str(spec).strip().lower()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if text == "auto":
        per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if torch.cuda.is_available() and per_machine <= torch.cuda.device_count():
            return torch.device("cuda", local)
        return torch.device("cpu")
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {spec}: not a device; use {DEVICE_CHOICES}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ValueError(
            f"--device {spec}: seeclip runs on the CPU or CUDA GPUs; use {DEVICE_CHOICES}"
        )
    if not torch.cuda.is_available():
        raise ValueError(
            f"--device {spec}: torch {torch.__version__} sees no CUDA GPU here; use --device cpu "
            "(or auto), or install a CUDA build of torch on a machine with a GPU"
        )
    count = torch.cuda.device_count()
    index = local if dev.index is None else dev.index
    if index >= count:
        raise ValueError(
            f"--device {spec}: this machine shows {count} CUDA device(s), "
            f"cuda:0 to cuda:{count - 1}"
        )
    return torch.device("cuda", index)


def use_device(dev: torch.device) -> None:
    """Makes ``dev`` this process's device (see :func:`device`)."""
    global _DEVICE
    _DEVICE = torch.device(dev)
    if _DEVICE.type == "cuda":
        torch.cuda.set_device(_DEVICE)


def device() -> torch.device:
    """This process's device (the CPU unless :func:`use_device` said otherwise)."""
    return _DEVICE


@contextmanager
def placed(module: nn.Module) -> Iterator[torch.device]:
    """``module`` on this process's device inside the block and back on the CPU after it, so
    that what shares it (a backbone memoised across runs) finds it where it left it. A no-op on
    the CPU, and inside a block that placed it already."""
    dev = _DEVICE
    if dev.type == "cpu" or next(module.parameters()).device == dev:
        yield dev
        return
    module.to(dev)
    try:
        yield dev
    finally:
        module.to("cpu")


def backend_for(dev: torch.device) -> str:
    """The process-group backend for models on ``dev``: NCCL for GPUs, gloo for the CPU."""
    return "nccl" if torch.device(dev).type == "cuda" else "gloo"


def init_from_env() -> bool:
    """Joins the process group torchrun describes, with the backend of this process's device;
    False (nothing done) for one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(_DEVICE))
    return True


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0, the one process that writes files (True for a single process)."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block before every other rank does (each rank still runs it): for work
    that is cached on disk, such as a pseudo-unknown pool, rank 0 makes it and the others find it
    made. One process: just the block."""
    if world_size() > 1 and not is_main():
        barrier()  # wait for rank 0's block
    try:
        yield
    finally:  # rank 0 releases the others even when its block failed (theirs will say why)
        if world_size() > 1 and is_main():
            barrier()


def broadcast_flag(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank (a max all-reduce)."""
    if world_size() == 1:
        return flag
    # NCCL reduces GPU tensors only
    t = torch.tensor([int(flag)], device=_DEVICE if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def shard(n: int) -> range:
    """This rank's contiguous block of ``range(n)`` (the blocks of all ranks tile it)."""
    w, r = world_size(), rank()
    return range(n * r // w, n * (r + 1) // w)
