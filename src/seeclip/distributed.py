"""Several processes, one run: ``torchrun --nproc_per_node=N -m seeclip eval|train ...``.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous (``MASTER_ADDR``,
``MASTER_PORT``); :func:`init_from_env` joins the process group from them (gloo: the models run
on the CPU). What runs where:

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

import torch
import torch.distributed as dist

__all__ = ["barrier", "broadcast_flag", "init_from_env", "is_main", "rank", "world_size"]


def init_from_env() -> bool:
    """Joins the process group torchrun describes; False (nothing done) for one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
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


def broadcast_flag(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank (a max all-reduce)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def shard(n: int) -> range:
    """This rank's contiguous block of ``range(n)`` (the blocks of all ranks tile it)."""
    w, r = world_size(), rank()
    return range(n * r // w, n * (r + 1) // w)
