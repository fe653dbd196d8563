"""scripts/unknown_scores.py: where the unknown scores fall, from saved predictions (hand-computed
cases, and a whole runs folder read back the way the docs' command reads it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from seeclip.records import write_records

SCRIPT = Path(__file__).parents[1] / "scripts" / "unknown_scores.py"


def _pred(pseudo=True):
    # 2 known classes; samples 0-3 known, 4-7 unknown (-1); C = 2 is "unknown" in y_pred
    pred = {
        "y_true": np.array([0, 1, 0, 1, -1, -1, -1, -1]),
        "y_pred": np.array([0, 2, 0, 1, 2, 2, 0, 1]),
        "y_pred_closed": np.array([0, 1, 0, 1, 0, 1, 0, 1]),
        "unknown_score": np.array([0.1, 0.6, 0.2, 0.3, 0.9, 0.7, 0.4, 0.05]),
        "known_classes": np.array(["A", "B"]),
    }
    if pseudo:
        pred["pseudo_unknown_score"] = np.array([0.8, 0.9, 1.0])
    return pred


def test_one_runs_statistics_by_hand(load_script):
    stats = load_script("unknown_scores").score_stats(_pred(), threshold=0.5)
    assert stats[:3] == pytest.approx([0.25, 0.55, 0.9])  # medians: known, unknown, pseudo
    # argmax rejects 2 of 4 unknowns and 1 of 4 knowns; score > 0.5: 2 of 4 and 1 of 4
    assert stats[3:7] == pytest.approx([50.0, 25.0, 50.0, 25.0])
    # AUROC: of the 16 (unknown, known) pairs the unknown scores higher in 11 (0.9 and 0.7 beat
    # all four knowns, 0.4 beats 0.1, 0.2 and 0.3, 0.05 beats none)
    assert stats[7] == pytest.approx(100 * 11 / 16)


def test_missing_pseudo_unknowns_and_threshold_are_nan_not_zero(load_script):
    stats = load_script("unknown_scores").score_stats(_pred(pseudo=False), threshold=None)
    assert np.isnan(stats[2]) and np.isnan(stats[5]) and np.isnan(stats[6])
    assert not np.isnan(stats[3])


def _run(runs_dir: Path, method: str, target: str, seed: int, pred: dict, threshold=None):
    name, h = f"glyphs_daml_{target}_{method}", f"{method}{target}{seed}"
    run_dir = runs_dir / name / h
    run_dir.mkdir(parents=True)
    np.savez(run_dir / "predictions.npz", **pred)
    final = {
        "kind": "final",
        "benchmark": "glyphs",
        "protocol": "daml",
        "target": target,
        "method": method,
        "seed": seed,
        "config_hash": h,
    }
    if threshold is not None:
        final["rules"] = {"lodo_threshold": {"threshold": threshold}}
    write_records(run_dir, final, [])
    (run_dir / "done").touch()


def test_the_command_averages_seeds_per_method_and_target(tmp_path):
    _run(tmp_path, "seeclip", "textured", 0, _pred(), threshold=0.5)
    shifted = _pred()
    shifted["unknown_score"] = np.zeros(8)  # the threshold rejects nothing
    _run(tmp_path, "seeclip", "textured", 1, shifted, threshold=0.5)
    _run(tmp_path, "coop", "outline", 0, _pred(pseudo=False))
    cmd = [sys.executable, str(SCRIPT), "--runs-dir", str(tmp_path), "--protocol", "daml"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rows = {tuple(line.split(" | ")[:3]): line for line in out.stdout.splitlines()[2:]}
    seeclip = rows[("| seeclip", "textured", "2")].strip(" |").split(" | ")
    assert seeclip[6] == "50.0"  # argmax rejects 2 of 4 unknowns at both seeds
    assert seeclip[8] == "25.0"  # score > 0.5 rejects 50% of unknowns at seed 0, 0% at seed 1
    coop = rows[("| coop", "outline", "1")].strip(" |").split(" | ")
    assert coop[5] == "-" and coop[8] == "-"  # no pseudo-unknowns, not validated


def test_no_matching_runs_names_the_fix(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--runs-dir", str(tmp_path)], capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "no finished runs match" in out.stderr and "--runs-dir" in out.stderr
