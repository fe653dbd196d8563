"""torchrun across processes: 2 CPU processes on gloo train one model, in step with each other,
and only rank 0 writes the run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from seeclip import distributed


def _worker(rank: int, world: int, init: str, out: str) -> None:
    from seeclip.backbone import build_backbone
    from test_trainer import _mixup, _trainer, synthetic

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        assert distributed.world_size() == 2 and distributed.rank() == rank
        feats, labels = synthetic()
        t = _trainer(
            build_backbone("tiny-vit"), "seeclip", _mixup(feats, labels, feats, labels), epochs=2
        )
        loss_fn, checked = t.loss_fn, []

        def same_weights_then_loss(output, y):
            # called at the start of every step: the weights after the previous step
            flat = torch.cat([p.detach().flatten() for p in t.model.learnable_parameters()])
            everyone = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(everyone, flat)
            assert all(torch.equal(everyone[0], x) for x in everyone), "ranks diverged"
            checked.append(y.shape[0])
            return loss_fn(output, y)

        t.loss_fn = same_weights_then_loss
        t.fit(feats, labels, feats, labels, checkpoint=Path(out) / "state.pt")
        flat = torch.cat([p.detach().flatten() for p in t.model.learnable_parameters()])
        everyone = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(everyone, flat)
        assert all(torch.equal(everyone[0], x) for x in everyone), "ranks diverged at the end"
        assert sum(checked) == 2 * 9 * 12 // world  # each rank ran its half of every batch
        torch.save(flat, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_stay_identical_after_every_step(tmp_path):
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert torch.equal(a, b)
    assert (tmp_path / "state.pt").is_file()  # written by rank 0 alone


def _main_first_worker(rank: int, world: int, init: str, log: str) -> None:
    import time

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        with distributed.main_first():
            with open(log, "a") as f:
                f.write(f"{rank} start\n")
            time.sleep(0.5 if rank == 0 else 0.0)  # rank 1 would overtake without the barrier
            with open(log, "a") as f:
                f.write(f"{rank} end\n")
    finally:
        dist.destroy_process_group()


def test_rank_0_makes_a_cached_pool_before_the_other_ranks_look_for_it(tmp_path):
    log = tmp_path / "order.txt"
    mp.spawn(_main_first_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(log)), nprocs=2)
    assert log.read_text().split("\n")[:4] == ["0 start", "0 end", "1 start", "1 end"]


def test_shards_tile_the_rows(monkeypatch):
    assert list(distributed.shard(7)) == list(range(7))  # one process: everything
    assert distributed.is_main() is not False and distributed.broadcast_flag(True)
    for world in (2, 3, 4):
        monkeypatch.setattr(distributed, "world_size", lambda world=world: world)
        for n in (0, 1, 2, 3, 5, 7, 8, 12, 13, 101):
            shards = []
            for r in range(world):  # each rank's view, as its own process would see it
                monkeypatch.setattr(distributed, "rank", lambda r=r: r)
                shards.append(list(distributed.shard(n)))
            rows = [i for s in shards for i in s]
            assert sorted(rows) == list(range(n)), (world, n)  # every row exactly once
            assert rows == list(range(n)), (world, n)  # contiguous blocks in rank order
            sizes = [len(s) for s in shards]
            assert max(sizes) - min(sizes) <= 1, (world, n, sizes)  # balanced within one
            assert sum(sizes) == n


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun is not installed",
)
def test_torchrun_eval_writes_one_run_close_to_the_single_process_one(small_digits, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    args = [
        "eval",
        "--benchmark",
        "digits",
        "--method",
        "seeclip",
        "--backbone",
        "tiny-vit",
        "--target",
        "printed",
        "--seed",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        "train.epochs=2",
        "train.batch_size=8",
    ]
    env = {**os.environ, "SEECLIP_HOME": str(small_digits), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            torchrun,
            "--nproc_per_node=2",
            "-m",
            "seeclip",
            *args,
            "--runs-dir",
            str(tmp_path / "ddp"),
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "seeclip",
            *args,
            "--runs-dir",
            str(tmp_path / "one"),
            "--threads",
            "1",
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    (ddp,) = (tmp_path / "ddp").glob("*/*/done")
    (one,) = (tmp_path / "one").glob("*/*/done")
    records = [json.loads(x) for x in (ddp.parent / "results.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["epoch", "epoch", "final"]  # one writer
    a = load_file(str(ddp.parent / "model.safetensors"))
    b = load_file(str(one.parent / "model.safetensors"))
    for k in a:  # the same global batches; only the order of float sums differs
        torch.testing.assert_close(a[k], b[k], atol=1e-2, rtol=0)
