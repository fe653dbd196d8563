"""`seeclip sweep` flags on real tiny runs: --jobs, a run held by another process, --validate,
--dry-run, --report and --means-only; each checked by what it does, not only by its exit code."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from seeclip.cli import main
from seeclip.sweep import SweepSpec, parse_variant, plan, run_lock

PRESET = (
    "data: {benchmark: digits, protocol: full}\n"
    "backbone: {name: tiny-vit}\n"
    "method: zeroshot\n"
    "train: {epochs: 1, batch_size: 8}\n"
)
TARGETS = ("printed", "outline")
TIMING = ("fit_seconds",)  # what may differ between two computations of one run


def _final(run_dir: Path) -> dict:
    lines = [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == "final"][-1]


def _records(runs: Path) -> dict[str, dict]:
    """run folder (relative to ``runs``) -> final record, for every finished run."""
    return {str(d.parent.relative_to(runs)): _final(d.parent) for d in runs.glob("*/*/done")}


def _argv(preset: Path, runs: Path, *extra: str) -> list[str]:
    return [
        "sweep",
        "--config",
        str(preset),
        "--methods",
        "zeroshot",
        "coop:label=coop1",
        "--targets",
        *TARGETS,
        "--runs-dir",
        str(runs),
        "--no-progress",
        *extra,
    ]


def _main_out(argv: list[str]) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    return code, buf.getvalue()


def _plan_lines(out: str) -> dict[str, str]:
    """--dry-run's lines: run folder -> done | todo."""
    lines = [x.split() for x in out.splitlines() if x.startswith(("todo ", "done "))]
    assert all(len(x) == 4 and x[2] == "seed" for x in lines)
    return {x[1]: x[0] for x in lines}


@pytest.fixture(scope="module")
def swept(small_digits, tmp_path_factory):
    """zeroshot and a 1-epoch CoOp on two targets: a dry run first, then the sweep itself with
    --report and --means-only."""
    tmp = tmp_path_factory.mktemp("sweep_cli")
    preset = tmp / "preset.yaml"
    preset.write_text(PRESET)
    runs = tmp / "runs"
    mp = pytest.MonkeyPatch()
    mp.setenv("SEECLIP_HOME", str(small_digits))
    try:
        code, dry = _main_out(_argv(preset, runs, "--dry-run"))
        assert code == 0
        after_dry_run = sorted(runs.rglob("*")) if runs.exists() else None
        code, out = _main_out(_argv(preset, runs, "--report", str(tmp / "report"), "--means-only"))
        assert code == 0
    finally:
        mp.undo()
    return {
        "preset": preset,
        "runs": runs,
        "dry": dry,
        "out": out,
        "report": tmp / "report",
        "home": small_digits,
        "after_dry_run": after_dry_run,
    }


def test_dry_run_lists_the_plan_and_runs_nothing(swept, monkeypatch):
    runs = swept["runs"]
    assert swept["after_dry_run"] is None  # the dry run created no folder at all
    before = _plan_lines(swept["dry"])
    assert len(before) == 4 and set(before.values()) == {"todo"}
    finished = {str(p.parent) for p in runs.glob("*/*/done")}
    assert set(before) == finished  # the plan named exactly the folders the sweep then filled
    monkeypatch.setenv("SEECLIP_HOME", str(swept["home"]))
    listing = sorted(p for p in runs.rglob("*"))
    stamps = {p: p.stat().st_mtime_ns for p in listing if p.is_file()}
    code, out = _main_out(_argv(swept["preset"], runs, "--dry-run"))
    assert code == 0 and set(_plan_lines(out).values()) == {"done"}
    assert "computed now" not in out  # nothing ran
    assert sorted(p for p in runs.rglob("*")) == listing
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    victim = Path(sorted(finished)[0]) / "done"
    victim.unlink()  # an unfinished run is todo again
    try:
        code, out = _main_out(_argv(swept["preset"], runs, "--dry-run"))
        assert _plan_lines(out) == {
            d: "todo" if d == str(victim.parent) else "done" for d in finished
        }
        assert not victim.exists()
    finally:
        victim.write_text("restored by the test\n")


def test_means_only_prints_only_the_mean_over_targets(swept, monkeypatch):
    records = list(_records(swept["runs"]).values())
    lines = swept["out"].splitlines()
    header = [
        c.strip()
        for c in next(x for x in lines if x.startswith("| benchmark |")).strip("|").split("|")
    ]
    rows = [x for x in lines if x.startswith("| digits |")]
    assert len(rows) == 2 and all("| **mean** |" in r for r in rows)  # one per method, no target
    assert not any(f"| {t} |" in x for x in lines for t in TARGETS)
    for method in ("zeroshot", "coop1"):
        (row,) = [r for r in rows if f"| {method} |" in r]
        cells = dict(zip(header, (c.strip() for c in row.strip("|").split("|")), strict=True))
        for metric, column in (("h_score", "H"), ("acc_known", "Acc"), ("auroc", "AUROC")):
            mean = np.mean([r[metric] for r in records if r["method"] == method])
            assert float(cells[column]) == pytest.approx(100 * mean, abs=0.051), (method, column)
    # the same sweep without --means-only: every target's row too (all runs reused)
    monkeypatch.setenv("SEECLIP_HOME", str(swept["home"]))
    code, out = _main_out(_argv(swept["preset"], swept["runs"]))
    assert code == 0 and "(0 computed now)" in out
    for method in ("zeroshot", "coop1"):
        for target in TARGETS:
            assert sum(f"| {method} | {target} |" in x for x in out.splitlines()) == 1


def test_report_writes_the_report_folder_of_the_sweeps_runs(swept):
    report = swept["report"]
    assert f"report: {report / 'index.html'}" in swept["out"]
    written = {"index.html", "index.md", "tables.md", "tables.csv", "tables.tex", "figures"}
    assert {p.name for p in report.iterdir()} >= written
    assert list((report / "figures").glob("roc_*.png"))
    rows = list(csv.DictReader(io.StringIO((report / "tables.csv").read_text())))
    records = list(_records(swept["runs"]).values())
    assert len(records) == 4
    for r in records:
        (row,) = [
            x
            for x in rows
            if (x["metric"], x["method"], x["target"]) == ("h_score", r["method"], r["target"])
        ]
        assert float(row["mean"]) == pytest.approx(r["h_score"], abs=1e-6)
        assert row["seeds"] == "1"


def test_validate_adds_lodo_to_finished_runs_and_reuses_them(small_digits, tmp_path, monkeypatch):
    monkeypatch.setenv("SEECLIP_HOME", str(small_digits))
    preset = tmp_path / "preset.yaml"
    preset.write_text(PRESET)
    runs = tmp_path / "runs"
    argv = [
        "sweep",
        "--config",
        str(preset),
        "--methods",
        "zeroshot",
        "--targets",
        "printed",
        "--runs-dir",
        str(runs),
        "--no-progress",
    ]
    assert _main_out(argv)[0] == 0
    (run_dir,) = [p.parent for p in runs.glob("*/*/done")]
    assert not (run_dir / "validation.json").exists() and "rules" not in _final(run_dir)
    predictions = (run_dir / "predictions.npz").stat().st_ino
    validate = [*argv, "--validate", "lodo", "--class-splits", "1", "--held-out", "0.4"]
    code, out = _main_out([*validate, "--dry-run"])
    assert _plan_lines(out) == {str(run_dir): "todo"}  # finished, but not validated
    code, out = _main_out(validate)
    assert code == 0 and "1 to run" in out
    # the run itself was reused; its LODO folds were added
    assert (run_dir / "predictions.npz").stat().st_ino == predictions
    validation = json.loads((run_dir / "validation.json").read_text())
    assert validation["settings"]["class_splits"] == 1
    assert validation["settings"]["held_out"] == 0.4
    assert sorted(f["pseudo_target"] for f in validation["folds"]) == [
        "handwritten",
        "outline",
        "textured",
    ]
    for f in validation["folds"]:
        assert len(f["held_out"]) == 2  # round(0.4 x 6 known digits)
    record = _final(run_dir)
    rule = record["rules"]["lodo_threshold"]
    assert rule["threshold"] == validation["threshold"]
    with np.load(run_dir / "predictions.npz") as z:
        c = len(z["known_classes"])
        y, pred = (
            z["y_true"],
            np.where(z["unknown_score"] > rule["threshold"], c, z["y_pred_closed"]),
        )
    acc = (pred[y >= 0] == y[y >= 0]).mean()
    acc_u = (pred[y < 0] == c).mean()
    assert rule["acc_known"] == pytest.approx(acc) and rule["acc_unknown"] == pytest.approx(acc_u)
    assert rule["h_score"] == pytest.approx(
        0 if acc + acc_u == 0 else 2 * acc * acc_u / (acc + acc_u)
    )
    code, out = _main_out(validate)  # validated with these settings: nothing to do
    assert code == 0 and "all 1 runs finished earlier" in out
    code, out = _main_out([*validate[:-2], "--dry-run"])  # other settings (held-out 0.3)
    assert _plan_lines(out) == {str(run_dir): "todo"}


def _sweep_in_thread(argv: list[str]) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def target():
        try:
            result["code"], result["out"] = _main_out(argv)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def test_a_run_held_by_another_process_is_waited_for_and_not_recomputed(
    small_digits, tmp_path, monkeypatch
):
    from seeclip.runner import run_eval

    monkeypatch.setenv("SEECLIP_HOME", str(small_digits))
    preset = tmp_path / "preset.yaml"
    preset.write_text(PRESET)
    runs = tmp_path / "runs"
    held_cfg, free_cfg = plan(SweepSpec(str(preset), (parse_variant("zeroshot"),), targets=TARGETS))
    held, free = held_cfg.run_dir(runs), free_cfg.run_dir(runs)
    argv = [
        "sweep",
        "--config",
        str(preset),
        "--methods",
        "zeroshot",
        "--targets",
        *TARGETS,
        "--runs-dir",
        str(runs),
        "--no-progress",
    ]
    # flock locks belong to an open file: holding one here blocks the sweep as another process
    with run_lock(held, wait=False) as locked:
        assert locked
        thread, result = _sweep_in_thread(argv)
        deadline = time.monotonic() + 300
        while not (free / "done").exists():
            assert thread.is_alive() and time.monotonic() < deadline, result
            time.sleep(0.05)
        thread.join(2.0)
        # the free run is finished; the held one is neither computed nor given up on
        assert thread.is_alive(), result
        assert not (held / "done").exists()
        # the other process finishes the run while holding the lock, as a sweep would
        run_eval(held_cfg, runs_dir=runs, progress=False)
        files = {p.name: p.stat().st_ino for p in held.iterdir() if p.is_file()}
    thread.join(300)
    assert not thread.is_alive() and "error" not in result, result
    assert result["code"] == 0
    assert "2 runs (1 computed now)" in result["out"]  # the held run was read, not redone
    assert {p.name: p.stat().st_ino for p in held.iterdir() if p.is_file()} == files
    assert sum(f"| zeroshot | {t} |" in result["out"] for t in TARGETS) == 2


@pytest.mark.slow
def test_two_jobs_finish_every_run_with_the_records_of_one(swept, tmp_path, monkeypatch):
    monkeypatch.setenv("SEECLIP_HOME", str(swept["home"]))
    runs = tmp_path / "runs"
    argv = [
        "sweep",
        "--config",
        str(swept["preset"]),
        "--methods",
        "zeroshot",
        "coop:label=coop1",
        "--targets",
        "printed",
        "--runs-dir",
        str(runs),
        "--no-progress",
        "--jobs",
        "2",
    ]
    code, out = _main_out(argv)
    assert code == 0 and "2 to run (2 processes" in out and "(2 computed now)" in out
    two = _records(runs)
    # the fixture's sweep ran the same runs (and two more) with --jobs 1
    one = {k: v for k, v in _records(swept["runs"]).items() if v["target"] == "printed"}
    assert sorted(two) == sorted(one) and len(two) == 2
    for name, record in one.items():
        strip = [{k: v for k, v in r.items() if k not in TIMING} for r in (record, two[name])]
        assert strip[0] == strip[1], name
        a = np.load(swept["runs"] / name / "predictions.npz")
        b = np.load(runs / name / "predictions.npz")
        assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
        ma = load_file(str(swept["runs"] / name / "model.safetensors"))
        mb = load_file(str(runs / name / "model.safetensors"))
        assert ma.keys() == mb.keys() and all((ma[k] == mb[k]).all() for k in ma)
