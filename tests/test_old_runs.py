"""Run folders written before a refactor stay valid: found under the same hash (not rerun),
reported, and loaded for prediction with the same decisions."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import seeclip
from seeclip.cli import main

OLD = Path(__file__).parent / "data" / "runs_before_method_modules"


@pytest.fixture
def old_runs(tmp_path, small_digits, monkeypatch):
    monkeypatch.setenv("SEECLIP_HOME", str(small_digits))
    runs = tmp_path / "runs"
    shutil.copytree(OLD, runs, ignore=shutil.ignore_patterns("README.md"))
    return runs


def _final(run: Path) -> dict:
    lines = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    return [r for r in lines if r.get("kind") == "final"][-1]


@pytest.mark.parametrize("method", ["seeclip", "coop"])
def test_an_old_run_is_found_under_its_hash_and_not_rerun(old_runs, method, capsys):
    (run,) = old_runs.glob(f"digits_full_printed_{method}/*")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    argv = ["eval", "--benchmark", "digits", "--method", method, "--backbone", "tiny-digits",
            "--target", "printed", "--seed", "0", "--threads", "1", "--no-progress",
            "--runs-dir", str(old_runs), "train.epochs=2", "train.batch_size=8"]  # fmt: skip
    assert main(argv) == 0
    assert [p.name for p in old_runs.glob(f"digits_full_printed_{method}/*")] == [run.name]
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # reused, not rewritten


def test_old_runs_are_reported_and_predict_as_they_recorded(old_runs, small_digits, capsys):
    assert main(["report", str(old_runs), "--means-only"]) == 0
    table = capsys.readouterr().out
    for method in ("seeclip", "coop"):
        (run,) = old_runs.glob(f"digits_full_printed_{method}/*")
        h = _final(run)["h_score"] * 100
        assert f"| digits | full | {method} | **mean** | 1 |" in table
        assert f"{h:.1f}" in table.split(f"| {method} | **mean** |")[1].split("\n")[0]
    # their saved states load into today's methods and predict the decisions they recorded
    # (scores to float32 rounding: SeeCLIP's text features now come from the exact
    # shared-prefix path, which sums in another order)
    for method in ("seeclip", "coop"):
        (run,) = old_runs.glob(f"digits_full_printed_{method}/*")
        with np.load(OLD / run.parent.name / run.name / "predictions.npz") as z:
            recorded = {k: z[k] for k in z.files}
        assert main(["eval", "--run", str(run), "--no-progress", "--threads", "1"]) == 0
        with np.load(run / "predictions.npz") as z:
            for key in ("y_pred", "y_pred_closed"):
                assert np.array_equal(z[key], recorded[key]), (method, key)
            score, old = z["unknown_score"], recorded["unknown_score"]
            np.testing.assert_allclose(score, old, rtol=0, atol=1e-6, err_msg=method)
    # and seeclip.load serves them on image files
    images = sorted(str(p) for p in small_digits.rglob("*.png") if "printed" in p.parts)[:4]
    assert len(seeclip.load(run).predict(images)) == 4
