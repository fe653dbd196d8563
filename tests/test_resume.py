"""Resume after a kill: the training state is checkpointed every epoch and a resumed run ends
bitwise where the uninterrupted one does (CPU, one thread)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from seeclip.runner import TRAIN_STATE
from test_trainer import _mixup, _trainer, synthetic


@pytest.fixture(scope="module")
def backbone():
    from seeclip.backbone import build_backbone

    return build_backbone("tiny-vit")


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("selection", ["last", "val_h"])
def test_resumed_training_equals_the_uninterrupted_one(backbone, tmp_path, selection):
    feats, labels = synthetic()

    def trainer():
        return _trainer(
            backbone, "seeclip", _mixup(feats, labels, feats, labels), epochs=4, selection=selection
        )

    whole = trainer()
    whole.fit(feats, labels, feats, labels, checkpoint=tmp_path / "a.pt")

    broken = trainer()
    loss_fn, steps = broken.loss_fn, []

    def dies_in_epoch_3(out, y):
        steps.append(1)
        if len(steps) == 2 * 9 + 4:  # 9 steps per epoch: mid-way through epoch 3
            raise Interrupted
        return loss_fn(out, y)

    broken.loss_fn = dies_in_epoch_3
    with pytest.raises(Interrupted):
        broken.fit(feats, labels, feats, labels, checkpoint=tmp_path / "b.pt")
    assert torch.load(tmp_path / "b.pt", weights_only=True)["epoch"] == 2

    resumed = trainer()
    resumed.fit(feats, labels, feats, labels, checkpoint=tmp_path / "b.pt")
    a, b = whole.state(), resumed.state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole.history() == resumed.history()  # losses, gradient shares, val criteria

    other = _trainer(backbone, "seeclip", _mixup(feats, labels, feats, labels), epochs=5)
    with pytest.raises(ValueError, match="another training setup; delete it"):
        other.fit(feats, labels, feats, labels, checkpoint=tmp_path / "b.pt")


def _train_cmd(runs: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "seeclip.cli",
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
        "--threads",
        "1",
        "--device",
        "cpu",
        "--no-progress",
        "--runs-dir",
        str(runs),
        "train.epochs=40",
        "train.batch_size=8",
    ]


def _final(run_dir: Path) -> dict:
    lines = [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]
    final = [r for r in lines if r.get("kind") == "final"][-1]
    drop = ("created", "install")
    return {k: v for k, v in final.items() if "seconds" not in k and k not in drop}


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_gives_the_uninterrupted_result(small_digits, tmp_path):
    env = {**os.environ, "SEECLIP_HOME": str(small_digits)}
    subprocess.run(_train_cmd(tmp_path / "a"), env=env, check=True, capture_output=True)
    (run_a,) = (tmp_path / "a").glob("*/*/done")

    proc = subprocess.Popen(
        _train_cmd(tmp_path / "b"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while not list((tmp_path / "b").glob(f"*/*/{TRAIN_STATE}")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    time.sleep(0.05)  # inside a later epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (ckpt,) = (tmp_path / "b").glob(f"*/*/{TRAIN_STATE}")
    epoch = torch.load(ckpt, weights_only=True)["epoch"]
    assert 1 <= epoch < 40 and not (ckpt.parent / "done").exists()  # killed mid-training

    subprocess.run(_train_cmd(tmp_path / "b"), env=env, check=True, capture_output=True)
    assert (ckpt.parent / "done").exists() and not ckpt.exists()  # deleted once done
    a = load_file(str(run_a.parent / "model.safetensors"))
    b = load_file(str(ckpt.parent / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _final(run_a.parent) == _final(ckpt.parent)
