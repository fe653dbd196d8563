"""--device: resolution (auto/cpu/cuda/cuda:N, torchrun's LOCAL_RANK), the process-group backend
per device, one-line errors that name the fix, and runs that record where they trained. The
GPU-marked tests run where torch sees a CUDA device (benchmarks/gpu_check.sh)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from seeclip import distributed
from seeclip.cli import main


@pytest.fixture
def gpus(monkeypatch):
    """Pretend torch sees ``n`` CUDA devices (resolution only: nothing runs on them)."""

    def set_count(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return set_count


def test_auto_is_the_cpu_without_a_gpu_and_this_ranks_gpu_with_one(gpus, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    gpus(0)
    assert distributed.resolve_device("auto") == torch.device("cpu")
    assert distributed.resolve_device(" CPU ") == torch.device("cpu")
    gpus(2)
    assert distributed.resolve_device("auto") == torch.device("cuda", 0)
    assert distributed.resolve_device("cuda") == torch.device("cuda", 0)
    assert distributed.resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun, second process of this machine
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.resolve_device("auto") == torch.device("cuda", 1)
    assert distributed.resolve_device("cuda") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # more processes than GPUs: auto keeps the CPU
    assert distributed.resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize(
    ("spec", "count", "says"),
    [
        ("cuda", 0, "--device cpu"),
        ("cuda:0", 0, "sees no CUDA GPU"),
        ("cuda:3", 2, "cuda:0 to cuda:1"),
        ("mps", 0, "auto, cpu, cuda or cuda:N"),
        ("gpu0", 0, "not a device; use auto, cpu, cuda or cuda:N"),
    ],
)
def test_a_device_that_cannot_be_used_is_one_line_naming_the_fix(gpus, spec, count, says):
    gpus(count)
    with pytest.raises(ValueError, match=f"--device {spec}: ") as err:
        distributed.resolve_device(spec)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_the_process_group_speaks_nccl_between_gpus_and_gloo_between_cpus():
    assert distributed.backend_for(torch.device("cuda", 1)) == "nccl"
    assert distributed.backend_for(torch.device("cpu")) == "gloo"


def test_cli_refuses_a_missing_gpu_before_any_work(gpus, capsys, tmp_path):
    gpus(0)
    rc = main(
        [
            "eval",
            "--benchmark",
            "digits",
            "--method",
            "zeroshot",
            "--device",
            "cuda",
            "--runs-dir",
            str(tmp_path / "runs"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("seeclip: error: --device cuda:") and "--device cpu" in err
    assert not (tmp_path / "runs").exists() and distributed.device() == torch.device("cpu")


def test_placing_a_module_on_the_cpu_changes_nothing():
    layer = torch.nn.Linear(2, 2)
    weight = layer.weight
    with distributed.placed(layer) as dev:
        assert dev == torch.device("cpu") and layer.weight is weight


def test_a_run_records_its_device_and_processes(small_digits, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SEECLIP_HOME", str(small_digits))
    rc = main(
        [
            "eval",
            "--benchmark",
            "digits",
            "--method",
            "coop",
            "--backbone",
            "tiny-vit",
            "--target",
            "printed",
            "--device",
            "cpu",
            "--no-progress",
            "--runs-dir",
            str(tmp_path),
            "train.epochs=1",
            "train.batch_size=8",
        ]
    )
    assert rc == 0
    (done,) = tmp_path.glob("*/*/done")
    final = json.loads((done.parent / "results.jsonl").read_text().splitlines()[-1])
    assert final["device"] == "cpu" and final["processes"] == 1
    capsys.readouterr()


def _gpu_run(small_digits, runs: Path, device: str, *launcher: str, nproc: int = 1) -> Path:
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
        "--no-progress",
        "--device",
        device,
        "--runs-dir",
        str(runs),
        "train.epochs=2",
        "train.batch_size=8",
    ]
    env = {**os.environ, "SEECLIP_HOME": str(small_digits), "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, f"--nproc_per_node={nproc}"] if launcher else [sys.executable]
    subprocess.run([*cmd, "-m", "seeclip", *args], env=env, check=True, capture_output=True)
    (done,) = runs.glob("*/*/done")
    return done.parent


@pytest.mark.gpu
def test_a_gpu_run_matches_the_cpu_run(small_digits, tmp_path):
    gpu = _gpu_run(small_digits, tmp_path / "gpu", "cuda")
    cpu = _gpu_run(small_digits, tmp_path / "cpu", "cpu")
    final = json.loads((gpu / "results.jsonl").read_text().splitlines()[-1])
    assert final["device"] == "cuda:0"
    a, b = load_file(str(gpu / "model.safetensors")), load_file(str(cpu / "model.safetensors"))
    for k in a:  # the same batches; GPU kernels round differently
        torch.testing.assert_close(a[k], b[k], atol=1e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs")
def test_torchrun_on_two_gpus_speaks_nccl_and_matches_one_gpu(small_digits, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    ddp = _gpu_run(small_digits, tmp_path / "ddp", "auto", torchrun, nproc=2)
    one = _gpu_run(small_digits, tmp_path / "one", "cuda")
    final = json.loads((ddp / "results.jsonl").read_text().splitlines()[-1])
    assert final["device"] == "cuda:0" and final["processes"] == 2
    a, b = load_file(str(ddp / "model.safetensors")), load_file(str(one / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-2, rtol=0)
