"""docs/extending.md, followed: a method defined outside the package, registered with one line,
then trained, evaluated, reported and used for prediction through the CLI like a shipped one."""

import csv
import io

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import seeclip
from seeclip.cli import main
from seeclip.features import Features, Prediction
from seeclip.methods.base import MethodEnv
from seeclip.methods.registry import METHODS
from seeclip.methods.scoring import MaxSoftmaxThreshold
from seeclip.methods.zeroshot import ZeroShotConfig


class NearestPrototype:
    """Class means of the source images' global features; confidence is the softmax over
    cosines to them at temperature 0.1; "unknown" below the source-val 5% quantile."""

    def __init__(self, num_known: int, quantile: float) -> None:
        self.num_known = num_known
        self.rule = MaxSoftmaxThreshold(quantile)
        self.protos: torch.Tensor | None = None
        self.threshold: float | None = None

    def _scored(self, images: Features):
        logits = images.global_.float() @ self.protos.T / 0.1
        return self.rule.scores(logits, self.num_known)

    def fit(self, train, train_labels, val, val_labels, *, checkpoint=None, checkpoint_every=1):
        g = train.global_.float()
        means = torch.stack([g[train_labels == c].mean(0) for c in range(self.num_known)])
        self.protos = torch.nn.functional.normalize(means, dim=-1)
        self.threshold = self.rule.threshold(1.0 - self._scored(val)[2])

    def predict(self, images: Features) -> Prediction:
        scored = self._scored(images)
        y = self.rule.decide(scored, 1.0 - scored[2], self.threshold, self.num_known)
        return Prediction(y, scored[1], scored[2])

    def state(self):
        return {"protos": self.protos, "__threshold__": torch.tensor(self.threshold)}

    def load_state(self, state):
        self.protos, self.threshold = state["protos"], float(state["__threshold__"])

    def history(self):
        return []


def build(env: MethodEnv, *, zeroshot: ZeroShotConfig) -> NearestPrototype:
    """Nearest class prototype of the source features (reads the zeroshot section's quantile)."""
    return NearestPrototype(len(env.class_texts), zeroshot.threshold_quantile)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(METHODS, "_entries", dict(METHODS._entries))  # undone after the test
    METHODS.add("prototype", build)  # the one registry line of docs/extending.md


def test_a_method_from_outside_runs_through_train_report_and_predict(
    registered, small_digits, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("SEECLIP_HOME", str(small_digits))
    runs = tmp_path / "runs"
    argv = [
        "train",
        "--config",
        "digits",
        "--no-progress",
        "--target",
        "printed",
        "--runs-dir",
        str(runs),
    ]
    assert main([*argv, "--method", "prototype"]) == 0
    assert main([*argv, "--method", "zeroshot"]) == 0
    capsys.readouterr()
    (run,) = runs.glob("digits_full_printed_prototype/*")
    state = load_file(str(run / "model.safetensors"))
    assert state["protos"].shape == (6, 128)  # digits/full: 6 known classes, tiny-digits d=128

    # its predictions follow from its own definition, recomputed here from the saved arrays
    preds = np.load(run / "predictions.npz")
    assert "__threshold__" in state and (preds["y_pred"] <= 6).all()
    rejected = 1.0 - preds["unknown_score"] < float(state["__threshold__"])
    assert np.array_equal(preds["y_pred"] == 6, rejected)

    assert main(["report", str(runs), "--means-only"]) == 0
    table = capsys.readouterr().out
    assert "| digits | full | prototype | **mean** | 1 |" in table
    assert "| digits | full | zeroshot | **mean** | 1 |" in table

    # predict restores it from its state and applies its rule, without a label
    images = sorted(str(p) for p in small_digits.rglob("*.png") if "printed" in p.parts)[:8]
    out = seeclip.load(run).predict(images)
    threshold = float(state["__threshold__"])
    assert [r.label == "unknown" for r in out] == [1.0 - r.unknown_score < threshold for r in out]
    assert {r.label for r in out} <= {*preds["known_classes"].tolist(), "unknown"}
    assert main(["predict", "--run", str(run), *images]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["prediction"] for r in rows] == [r.label for r in out]
