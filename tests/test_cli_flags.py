"""CLI flags checked by what they do: eval/train --force, --resume, --checkpoint-every,
--verify-cache and --cache-dir; report --rule, --format, --no-plots and --benchmark; generate
--inspect --run; predict to stdout and with nothing readable."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import seeclip
from seeclip import run_data
from seeclip.cli import main
from seeclip.runner import TRAIN_STATE
from seeclip.trainer import PromptTrainer

EVAL = ["eval", "--benchmark", "digits", "--backbone", "tiny-vit", "--no-progress"]
TRAIN_PRESET = (
    "data: {benchmark: digits, protocol: full, target: printed}\n"
    "backbone: {name: tiny-vit}\n"
    "method: seeclip\n"
    "train: {epochs: 3, batch_size: 8, pseudo_unknowns: mixup}\n"
)
TIMING = ("fit_seconds",)
TINY_DIFFUSION = [
    "diffusion.train_steps=20",
    "diffusion.width=64",
    "diffusion.depth=1",
    "diffusion.batch_size=32",
    "diffusion.sample_steps=4",
]


class Interrupted(Exception):
    pass


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]


def _final(run_dir: Path) -> dict:
    return [r for r in _records(run_dir) if r["kind"] == "final"][-1]


def _untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING}


def _one_run(runs: Path) -> Path:
    (run_dir,) = {p.parent for p in runs.glob("*/*/config.yaml")}
    return run_dir


@pytest.fixture
def digits(small_digits, monkeypatch):
    monkeypatch.setenv("SEECLIP_HOME", str(small_digits))
    return small_digits


@pytest.fixture
def train_preset(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(TRAIN_PRESET)
    return path


@pytest.fixture
def saved_epochs(monkeypatch):
    """Spy on training checkpoints: (epoch saved, epoch the file on disk then holds) per save;
    ``saved_epochs.stop_after = N`` interrupts training right after saving epoch N."""
    real = PromptTrainer._save_checkpoint
    calls: list[tuple[int, int]] = []

    def spy(self, path, epoch, *args, **kwargs):
        real(self, path, epoch, *args, **kwargs)
        calls.append((epoch, torch.load(path, weights_only=True)["epoch"]))
        if epoch == getattr(spy, "stop_after", None):
            raise Interrupted

    monkeypatch.setattr(PromptTrainer, "_save_checkpoint", spy)
    spy.calls = calls
    return spy


# ------------------------------------------------------------------------- eval / train flags


def test_force_reruns_a_finished_run_and_discards_its_checkpoint(digits, tmp_path, capsys):
    argv = [*EVAL, "--target", "printed", "--method", "zeroshot", "--runs-dir", str(tmp_path)]
    assert main(argv) == 0
    run_dir = _one_run(tmp_path)
    first = {p.name: p.stat().st_ino for p in run_dir.iterdir()}  # writes are rename-into-place
    record = _final(run_dir)
    capsys.readouterr()
    assert main(argv) == 0
    assert "(finished earlier, reused)" in capsys.readouterr().out
    assert {p.name: p.stat().st_ino for p in run_dir.iterdir()} == first
    assert main([*argv, "--force"]) == 0
    assert "reused" not in capsys.readouterr().out
    again = {p.name: p.stat().st_ino for p in run_dir.iterdir()}
    for name in ("done", "results.jsonl", "predictions.npz", "model.safetensors"):
        assert again[name] != first[name], name  # written anew
    assert _untimed(_final(run_dir)) == _untimed(record)  # zero-shot: the same result

    # a stale checkpoint in an unfinished trained run: refused, unless --force starts afresh
    coop = [
        *EVAL,
        "--target",
        "printed",
        "--method",
        "coop",
        "--runs-dir",
        str(tmp_path / "c"),
        "train.epochs=1",
        "train.batch_size=8",
    ]
    assert main(coop) == 0
    coop_dir = _one_run(tmp_path / "c")
    (coop_dir / "done").unlink()
    (coop_dir / TRAIN_STATE).write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert main(coop) == 2
    err = capsys.readouterr().err
    assert err.startswith("seeclip: error:") and err.count("\n") == 1
    assert main([*coop, "--force"]) == 0
    assert (coop_dir / "done").exists() and not (coop_dir / TRAIN_STATE).exists()


def test_resume_continues_from_the_checkpoint_to_the_uninterrupted_result(
    digits, train_preset, tmp_path, saved_epochs, capsys
):
    argv = ["train", "--config", str(train_preset), "--no-progress", "--threads", "1"]
    assert main([*argv, "--runs-dir", str(tmp_path / "a")]) == 0
    assert saved_epochs.calls == [(1, 1), (2, 2), (3, 3)]  # default: every epoch
    whole = _one_run(tmp_path / "a")
    assert not (whole / TRAIN_STATE).exists()  # deleted once the run is done

    saved_epochs.calls.clear()
    saved_epochs.stop_after = 1
    with pytest.raises(Interrupted):
        main([*argv, "--runs-dir", str(tmp_path / "b")])
    broken = _one_run(tmp_path / "b")
    assert not (broken / "done").exists()
    assert torch.load(broken / TRAIN_STATE, weights_only=True)["epoch"] == 1

    saved_epochs.calls.clear()
    saved_epochs.stop_after = None
    assert main([*argv, "--runs-dir", str(tmp_path / "b"), "--resume"]) == 0
    assert [e for e, _ in saved_epochs.calls] == [2, 3]  # went on from epoch 2, not from 1
    assert (broken / "done").exists() and not (broken / TRAIN_STATE).exists()
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(broken / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    za, zb = np.load(whole / "predictions.npz"), np.load(broken / "predictions.npz")
    assert za.files == zb.files and all(np.array_equal(za[k], zb[k]) for k in za.files)
    # epoch records (losses, gradient shares) and the final record, timings aside
    assert [_untimed(r) for r in _records(whole)] == [_untimed(r) for r in _records(broken)]

    capsys.readouterr()
    assert main([*argv, "--runs-dir", str(tmp_path / "c"), "--resume", "--force"]) == 2
    assert "pass one" in capsys.readouterr().err


def test_checkpoint_every(digits, train_preset, tmp_path, saved_epochs, capsys):
    argv = ["train", "--config", str(train_preset), "--no-progress", "method=coop"]
    assert main([*argv, "--runs-dir", str(tmp_path / "two"), "--checkpoint-every", "2"]) == 0
    assert saved_epochs.calls == [(2, 2), (3, 3)]  # every 2nd epoch, and the last
    saved_epochs.calls.clear()
    saved_epochs.stop_after = 2
    with pytest.raises(Interrupted):  # killed after epoch 2: the state of epoch 2 is on disk
        main([*argv, "--runs-dir", str(tmp_path / "cut"), "--checkpoint-every", "2"])
    cut = _one_run(tmp_path / "cut")
    assert torch.load(cut / TRAIN_STATE, weights_only=True)["epoch"] == 2
    saved_epochs.calls.clear()
    assert main([*argv, "--runs-dir", str(tmp_path / "none"), "--checkpoint-every", "0"]) == 0
    assert saved_epochs.calls == []  # 0: never
    assert main([*argv, "--runs-dir", str(tmp_path / "neg"), "--checkpoint-every", "-1"]) == 2
    assert "--checkpoint-every must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "neg").exists()


@pytest.fixture
def own_digits(small_digits, tmp_path, monkeypatch):
    """A SEECLIP_HOME of its own holding a copy of the small digits tree (images get edited)."""
    from seeclip.cache import VERIFY_ENV

    monkeypatch.setenv(VERIFY_ENV, "0")  # --verify-cache sets it in this process: undone after
    home = tmp_path / "home"
    shutil.copytree(small_digits / "data", home / "data")
    monkeypatch.setenv("SEECLIP_HOME", str(home))
    assert main(["prepare", "digits", "--n-per-class", "6", "--no-progress"]) == 0
    return home


def test_verify_cache_sees_an_image_replaced_with_the_same_size_and_mtime(own_digits, tmp_path):

    argv = [*EVAL, "--target", "printed", "--method", "zeroshot", "--runs-dir", str(tmp_path)]
    assert main(argv) == 0
    run_dir = _one_run(tmp_path)
    before = np.load(run_dir / "predictions.npz")["unknown_score"]
    # replace one target image by another (padded to its size), keeping its mtime: `cp -p`
    images = sorted((own_digits / "data" / "digits" / "printed").rglob("*.png"))
    victim = max(images, key=lambda p: p.stat().st_size)
    donor = next(
        p for p in images if p.parent != victim.parent and p.stat().st_size < victim.stat().st_size
    )
    st = victim.stat()
    data = donor.read_bytes()
    victim.write_bytes(data + b"\0" * (st.st_size - len(data)))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert victim.stat().st_size == st.st_size

    run_data.FEATURES.clear()  # what a new process starts with
    assert main([*argv, "--force"]) == 0  # size and mtime trusted: the stale features
    np.testing.assert_array_equal(np.load(run_dir / "predictions.npz")["unknown_score"], before)
    run_data.FEATURES.clear()
    assert main([*argv, "--force", "--verify-cache"]) == 0  # contents compared: re-encoded
    after = np.load(run_dir / "predictions.npz")["unknown_score"]
    assert (after != before).sum() == 1  # exactly the replaced image scores differently


def test_cache_dir_holds_the_features_instead_of_seeclip_home(digits, tmp_path):
    home_features = digits / "features"
    listing = sorted(home_features.rglob("*")) if home_features.exists() else []
    cache = tmp_path / "cache"
    argv = [
        *EVAL,
        "--target",
        "printed",
        "--method",
        "zeroshot",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--cache-dir",
        str(cache),
    ]
    assert main(argv) == 0
    built = sorted(p.parent for p in cache.rglob("global.npy"))
    assert built and all(p.is_relative_to(cache / "features") for p in built)
    assert (sorted(home_features.rglob("*")) if home_features.exists() else []) == listing
    assert not (tmp_path / "runs" / "features").exists()


# ----------------------------------------------------------------------------- report flags


@pytest.fixture(scope="module")
def validated_runs(small_digits, tmp_path_factory):
    """zeroshot on two targets, trained with LODO validation (so it has the calibrated rule)."""
    tmp = tmp_path_factory.mktemp("report_flags")
    preset = tmp / "zs.yaml"
    preset.write_text(
        "data: {benchmark: digits, protocol: full}\nbackbone: {name: tiny-vit}\nmethod: zeroshot\n"
    )
    mp = pytest.MonkeyPatch()
    mp.setenv("SEECLIP_HOME", str(small_digits))
    try:
        for target in ("printed", "outline"):
            assert (
                main(
                    [
                        "train",
                        "--config",
                        str(preset),
                        "--target",
                        target,
                        "--runs-dir",
                        str(tmp / "runs"),
                        "--no-progress",
                        "--validate",
                        "lodo",
                        "--class-splits",
                        "1",
                    ]
                )
                == 0
            )
    finally:
        mp.undo()
    return tmp / "runs"


def _table_rows(out: str) -> dict[tuple[str, str, str], dict[str, str]]:
    lines = [x for x in out.splitlines() if x.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        rows[(cells["benchmark"], cells["method"], cells["target"])] = cells
    return rows


def test_report_rule_shows_the_calibrated_threshold_metrics(validated_runs, capsys):
    records = {r["target"]: r for r in (_final(d.parent) for d in validated_runs.glob("*/*/done"))}
    assert sorted(records) == ["outline", "printed"]
    capsys.readouterr()
    assert main(["report", str(validated_runs)]) == 0
    own = _table_rows(capsys.readouterr().out)
    assert main(["report", str(validated_runs), "--rule", "lodo_threshold"]) == 0
    calibrated = _table_rows(capsys.readouterr().out)
    differs = False
    for target, r in records.items():
        rule = r["rules"]["lodo_threshold"]
        for metric, column in (("h_score", "H"), ("acc_known", "Acc"), ("acc_unknown", "AccU")):
            assert own[("digits", "zeroshot", target)][column] == f"{100 * r[metric]:.1f}"
            cell = calibrated[("digits", "zeroshot", target)][column]
            assert cell == f"{100 * rule[metric]:.1f}", (target, metric)
            differs |= f"{100 * rule[metric]:.1f}" != f"{100 * r[metric]:.1f}"
    assert differs  # the two rules give other numbers here, so the table shows which it used
    assert main(["report", str(validated_runs), "--rule", "validated"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seeclip: error: no finished runs") and "rule validated" in err


def test_report_format_and_no_plots(validated_runs, tmp_path, capsys):
    out = tmp_path / "csv_only"
    assert main(["report", str(validated_runs), "--out", str(out), "--format", "csv"]) == 0
    assert {p.name for p in out.glob("tables.*")} == {"tables.csv"}
    assert list((out / "figures").glob("*.png"))  # plots by default
    assert "data:image/png;base64," in (out / "index.html").read_text()
    rows = list(csv.DictReader(io.StringIO((out / "tables.csv").read_text())))
    assert {r["target"] for r in rows} == {"outline", "printed", "mean"}

    bare = tmp_path / "bare"
    assert (
        main(
            ["report", str(validated_runs), "--out", str(bare), "--no-plots", "--format", "md,tex"]
        )
        == 0
    )
    assert {p.name for p in bare.glob("tables.*")} == {"tables.md", "tables.tex"}
    assert not list(bare.rglob("*.png"))
    assert "data:image/png" not in (bare / "index.html").read_text()
    assert "![" not in (bare / "index.md").read_text()  # no figure links

    capsys.readouterr()
    assert (
        main(["report", str(validated_runs), "--out", str(tmp_path / "x"), "--format", "pdf"]) == 2
    )
    err = capsys.readouterr().err
    assert "unknown report format 'pdf'" in err and err.count("\n") == 1


def test_report_benchmark_keeps_only_that_benchmarks_runs(validated_runs, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(validated_runs, runs)
    # a second benchmark's run: a copy whose record names another benchmark
    (src,) = [d.parent for d in runs.glob("*_printed_*/*/done")]
    other = runs / "glyphs_full_printed_zeroshot" / src.name
    shutil.copytree(src, other)
    lines = [json.loads(x) for x in (other / "results.jsonl").read_text().splitlines()]
    lines[-1]["benchmark"] = "glyphs"
    (other / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    capsys.readouterr()
    assert main(["report", str(runs)]) == 0
    assert {k[0] for k in _table_rows(capsys.readouterr().out)} == {"digits", "glyphs"}
    assert main(["report", str(runs), "--benchmark", "digits"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert {k[0] for k in rows} == {"digits"} and len(rows) == 3  # two targets and the mean
    assert main(["report", str(runs), "--benchmark", "glyphs"]) == 0
    assert set(_table_rows(capsys.readouterr().out)) == {("glyphs", "zeroshot", "printed")}
    assert main(["report", str(runs), "--benchmark", "pacs"]) == 2
    assert "no finished runs" in capsys.readouterr().err


# --------------------------------------------------------------------- generate and predict


@pytest.fixture(scope="module")
def coop_run(small_digits, tmp_path_factory):
    """A finished 1-epoch CoOp run on digits, target outline."""
    runs = tmp_path_factory.mktemp("flags_coop")
    mp = pytest.MonkeyPatch()
    mp.setenv("SEECLIP_HOME", str(small_digits))
    try:
        assert (
            main(
                [
                    *EVAL,
                    "--target",
                    "outline",
                    "--method",
                    "coop",
                    "--runs-dir",
                    str(runs),
                    "train.epochs=1",
                    "train.batch_size=8",
                ]
            )
            == 0
        )
    finally:
        mp.undo()
    return _one_run(runs)


def test_generate_inspect_run_reports_that_runs_rejection_rate(
    coop_run, digits, tmp_path, monkeypatch, capsys
):
    from seeclip.generate.feature_diffusion import load_pool

    monkeypatch.chdir(tmp_path)
    preset = tmp_path / "gen.yaml"
    preset.write_text(
        "data: {benchmark: digits, protocol: full, target: outline}\n"
        "backbone: {name: tiny-vit}\nmethod: seeclip\n"
    )
    argv = [
        "generate",
        "--config",
        str(preset),
        "--backend",
        "feature",
        "--n",
        "8",
        "--no-progress",
        "--inspect",
        "--run",
        str(coop_run),
        *TINY_DIFFUSION,
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    pool_path = next(x for x in out.splitlines() if x.startswith("feature pool:")).split(" -> ")[1]
    pool = load_pool(Path(pool_path))
    predictor = seeclip.load(coop_run)  # the run loaded another way than generate's
    pred = predictor.method.predict(pool.features())
    rate = float(np.mean(np.asarray(pred.y_pred) == len(predictor.known)))
    assert f"run {coop_run} already rejects {rate:.1%} of the pool" in out
    assert "zero-shot" not in out
    png = coop_run / "pseudo_unknowns_digits_full_outline.png"
    assert png.stat().st_size > 0 and f"-> {png}" in out
    assert not list(tmp_path.glob("*.png"))  # beside the run, not in the working folder


def _outline_images(home: Path) -> list[Path]:
    from seeclip.datasets import get_benchmark, load_manifest

    manifest = load_manifest(get_benchmark("digits"), home / "data" / "digits")
    return [manifest.root / s.path for s in manifest.samples if s.domain == "outline"]


def test_predict_prints_the_csv_to_stdout(coop_run, digits, capsys):
    paths = _outline_images(digits)[:3]
    capsys.readouterr()
    assert main(["predict", "--run", str(coop_run), *map(str, paths)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    rows = list(csv.reader(io.StringIO(captured.out)))
    assert rows[0] == [
        "path",
        "prediction",
        "confidence",
        "unknown_score",
        "closed_prediction",
        "error",
    ]
    assert len(rows) == 4 and all(len(r) == 6 for r in rows)  # nothing but the CSV
    # the target's first images: what the run itself predicted for them
    z = np.load(coop_run / "predictions.npz")
    names = [*z["known_classes"].tolist(), "unknown"]
    for row, path, y, score in zip(rows[1:], paths, z["y_pred"], z["unknown_score"], strict=False):
        assert row[0] == str(path) and row[1] == names[y] and not row[5]
        assert float(row[3]) == pytest.approx(score, abs=1e-6)


def test_predict_fails_when_no_image_is_readable(coop_run, digits, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    capsys.readouterr()
    assert main(["predict", "--run", str(coop_run), str(broken)]) != 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1  # one line, no traceback
    assert captured.err.startswith("seeclip: ") and "broken.png" in captured.err
    (row,) = list(csv.DictReader(io.StringIO(captured.out)))
    assert row["error"] and not row["prediction"]

    missing = tmp_path / "gone.jpg"
    code = main(
        [
            "predict",
            "--run",
            str(coop_run),
            str(broken),
            str(missing),
            "--out",
            str(tmp_path / "p.csv"),
        ]
    )
    assert code != 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(x.startswith("seeclip: ") for x in err)
    assert "broken.png" in err[0] and "gone.jpg" in err[1]
    # one readable image among them: success
    good = _outline_images(digits)[0]
    assert main(["predict", "--run", str(coop_run), str(broken), str(good)]) == 0


def test_a_finished_run_is_not_served_for_other_data(digits, tmp_path, capsys):
    """A run records the hash of the data it saw; when the data under the root hashes otherwise
    (re-prepared, files replaced), eval and sweep refuse to reuse it in one line naming --force,
    and --force redoes it on today's data."""
    argv = [*EVAL, "--target", "printed", "--method", "zeroshot", "--runs-dir", str(tmp_path)]
    assert main(argv) == 0
    run_dir = _one_run(tmp_path)
    results = run_dir / "results.jsonl"
    today = _final(run_dir)["data_hash"]
    results.write_text(results.read_text().replace(today, "0" * 64))  # it saw other data
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "computed on data 0000000000000000" in err[0] and "--force" in err[0]
    assert main([*argv, "--force"]) == 0
    assert _final(run_dir)["data_hash"] == today
    runs = tmp_path / "sweep"
    sweep = ["sweep", "--config", "digits", "--methods", "zeroshot", "--targets", "printed",
             "--runs-dir", str(runs), "--no-progress", "backbone.name=tiny-vit"]  # fmt: skip
    assert main(sweep) == 0
    results = _one_run(runs) / "results.jsonl"
    results.write_text(results.read_text().replace(today, "0" * 64))
    capsys.readouterr()
    assert main(sweep) == 2 and "--force" in capsys.readouterr().err
