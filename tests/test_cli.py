"""End to end through the command line, on a reduced embedded benchmark and a tiny CLIP."""

import json

import numpy as np
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from seeclip.backbone import build_backbone
from seeclip.cli import main
from seeclip.datasets import BENCHMARKS
from seeclip.methods.registry import METHODS
from seeclip.pseudo import PSEUDO_UNKNOWNS
from seeclip.selection import SELECTIONS


def test_help_and_list(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in BENCHMARKS:
        assert f"  {name}" in out
    for name in [*METHODS, *PSEUDO_UNKNOWNS, *SELECTIONS]:
        assert f"  {name} " in out
    assert "tiny-vit" in out and "ViT-B-16" in out
    assert main(["list", "pseudo"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert listed == ["diffusion", "images", "mixup", "none", "pool", "sd_images", "sd_online"]


def test_eval_writes_run_folder_whose_metrics_recompute(
    small_digits, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("SEECLIP_HOME", str(small_digits))
    runs = tmp_path / "runs"
    args = [
        "eval",
        "--benchmark",
        "digits",
        "--protocol",
        "full",
        "--target",
        "printed",
        "--method",
        "zeroshot",
        "--backbone",
        "tiny-vit",
        "--seed",
        "3",
        "--runs-dir",
        str(runs),
        "--no-progress",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out

    (run_dir,) = (runs / "digits_full_printed_zeroshot").iterdir()
    assert {p.name for p in run_dir.iterdir()} == {
        "config.yaml",
        "results.jsonl",
        "predictions.npz",
        "model.safetensors",
        "done",
    }
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["data"]["target"] == "printed" and cfg["seed"] == 3
    (record,) = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert record["kind"] == "final" and record["selection"] is None  # zero-shot trains nothing
    assert record["benchmark"] == "digits" and record["method"] == "zeroshot"
    meta = json.loads((small_digits / "data" / "digits" / "meta.json").read_text())
    assert record["data_hash"] == meta["content_hash"] and record["data_hash_kind"] == "content"
    assert record["install"]["torch"] and record["config"]["seed"] == 3
    # which weights: tiny-vit is random at seed 0, so the fingerprint is that model's
    assert record["backbone_fingerprint"] == build_backbone("tiny-vit", seed=0).fingerprint
    assert record["protocol"] == "full" and record["target"] == "printed" and record["seed"] == 3

    # independent recomputation from predictions.npz: 6 known (zero..five), 4 unknown classes
    p = np.load(run_dir / "predictions.npz")
    y, pred, closed, score = p["y_true"], p["y_pred"], p["y_pred_closed"], p["unknown_score"]
    assert set(p["domain"]) == {"printed"}
    assert list(p["known_classes"]) == ["zero", "one", "two", "three", "four", "five"]
    known, unknown = y >= 0, y < 0
    assert (record["n_known"], record["n_unknown"]) == (known.sum(), unknown.sum()) == (36, 24)
    acc = (pred[known] == y[known]).mean()
    acc_u = (pred[unknown] == 6).mean()
    assert record["acc_known"] == pytest.approx(acc)
    assert record["acc_unknown"] == pytest.approx(acc_u)
    h = 0.0 if acc + acc_u == 0 else 2 * acc * acc_u / (acc + acc_u)
    assert record["h_score"] == pytest.approx(h)
    assert record["closed_set_acc"] == pytest.approx((closed[known] == y[known]).mean())
    assert record["auroc"] == pytest.approx(roc_auc_score(unknown, score))
    assert 0.0 <= record["oscr"] <= record["closed_set_acc"] + 1e-9

    # a finished run is reused, not recomputed
    assert main(args) == 0
    assert "reused" in capsys.readouterr().out


def test_eval_every_target_prints_a_mean_row(small_digits, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEECLIP_HOME", str(small_digits))
    assert (
        main(
            [
                "eval",
                "--benchmark",
                "digits",
                "--protocol",
                "daml",
                "--method",
                "zeroshot",
                "--backbone",
                "tiny-vit",
                "--runs-dir",
                str(tmp_path),
                "--no-progress",
                "zeroshot.score=mcm",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "**mean**" in out
    assert len(list(tmp_path.glob("digits_daml_*_zeroshot/*/done"))) == 4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--benchmark", "pacs", "--target", "photo"], "pass --data-root DIR"),
        (
            ["eval", "--benchmark", "digits", "--target", "photo"],
            "is not a target domain of 'digits'; valid targets: handwritten",
        ),
        (
            ["eval", "--benchmark", "digits", "--target", "printed", "zeroshot.scroe=mcm"],
            "unknown config key 'zeroshot.scroe'",
        ),
        (["eval", "--benchmark", "nope"], "unknown benchmark 'nope'"),
        (
            ["eval", "--benchmark", "digits", "--target", "printed", "--method", "magic"],
            "unknown method 'magic'",
        ),
        (["prepare", "pacs", "--data-root", "/nonexistent"], "PACS"),
    ],
)
def test_bad_input_gets_a_one_line_error(
    small_digits, argv, message, monkeypatch, capsys, tmp_path
):
    monkeypatch.setenv("SEECLIP_HOME", str(small_digits))
    assert main([*argv, "--runs-dir", str(tmp_path)] if argv[0] == "eval" else argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("seeclip: error:") and message in err


def test_eval_run_reevaluates_from_the_checkpoint(small_digits, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEECLIP_HOME", str(small_digits))
    base = ["--benchmark", "digits", "--protocol", "full", "--target", "outline"]
    assert main(["eval", *base, "--method", "zeroshot", "--runs-dir", str(tmp_path)]) == 0
    (run_dir,) = (tmp_path / "digits_full_outline_zeroshot").iterdir()
    first = np.load(run_dir / "predictions.npz")["y_pred"]
    for _ in range(3):
        assert main(["eval", "--run", str(run_dir), "--no-progress"]) == 0
    np.testing.assert_array_equal(np.load(run_dir / "predictions.npz")["y_pred"], first)
    (record,) = [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]
    assert record["evaluations"] == 4  # the re-evaluations replaced the record
    capsys.readouterr()
    assert main(["report", "--runs-dir", str(tmp_path)]) == 0
    (row,) = [x for x in capsys.readouterr().out.splitlines() if "| outline |" in x]
    assert "| zeroshot | outline | 1 |" in row  # one run evaluated four times is one seed

    (run_dir / "config.yaml").write_text(
        (run_dir / "config.yaml").read_text().replace("seed: 0", "seed: 5")
    )
    assert main(["eval", "--run", str(run_dir)]) == 2
    assert "was edited after training" in capsys.readouterr().err
    assert main(["eval", "--run", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_train_from_a_preset_then_report(small_digits, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEECLIP_HOME", str(small_digits))
    preset = tmp_path / "preset.yaml"
    preset.write_text(
        "data: {benchmark: digits, protocol: daml, target: textured}\n"
        "backbone: {name: tiny-vit}\n"
        "method: seeclip\n"
        "train: {epochs: 1, batch_size: 6, selection: val_h}\n"
    )
    runs = tmp_path / "runs"
    argv = ["train", "--config", str(preset), "--runs-dir", str(runs), "--no-progress"]
    assert main([*argv, "label=seeclip_no_rep", "loss.alpha=0", "--seed", "0", "1"]) == 0
    run_dirs = sorted((runs / "digits_daml_textured_seeclip_no_rep").iterdir())
    assert len(run_dirs) == 2  # one folder per seed
    for run_dir in run_dirs:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert cfg["loss"]["alpha"] == 0 and cfg["method"] == "seeclip"
    capsys.readouterr()
    assert main(["report", "--runs-dir", str(runs)]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if "seeclip_no_rep" in line]
    assert len(row) == 1 and "| textured | 2 |" in row[0] and " ± " in row[0]
    assert main(["report", str(runs), "--seeds", "1"]) == 0  # one seed's runs only
    row = [line for line in capsys.readouterr().out.splitlines() if "seeclip_no_rep" in line]
    assert len(row) == 1 and "| textured | 1 |" in row[0] and " ± " not in row[0]
    with pytest.raises(SystemExit):
        main(["train"])  # a preset is required


def test_report_refuses_one_label_for_two_configs(small_digits, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEECLIP_HOME", str(small_digits))
    base = ["eval", "--benchmark", "digits", "--target", "printed", "--method", "zeroshot"]
    base += ["--runs-dir", str(tmp_path), "--no-progress", "label=zs"]
    assert main(base) == 0
    assert main([*base, "zeroshot.threshold_quantile=0.1"]) == 0
    capsys.readouterr()
    assert main(["report", "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    hashes = sorted(
        json.loads(p.read_text())["setting_hash"] for p in tmp_path.glob("*/*/results.jsonl")
    )
    assert "label 'zs'" in err and all(h in err for h in hashes)
    assert "zeroshot.threshold_quantile (0.05 vs 0.1)" in err or "(0.1 vs 0.05)" in err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=-1", "train.epochs must be >= 1, got -1"),
        ("train.selection=best", "train.selection: expected one of last, val_acc, val_h"),
        ("train.pseudo_unknowns=gan", "train.pseudo_unknowns: expected one of none, mixup"),
        ("zeroshot.score=odin", "zeroshot.score: expected one of msp, mcm"),
        ("train.pseudo_unknowns=pool", "needs train.pseudo_pool=PATH"),
    ],
)
def test_bad_choices_fail_when_the_config_is_parsed(override, message, tmp_path, capsys):
    argv = ["train", "--config", "configs/digits.yaml", "--runs-dir", str(tmp_path), override]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing was written


def test_eval_without_a_backbone_uses_the_worlds_tiny_clip(
    small_digits, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("SEECLIP_HOME", str(small_digits))
    argv = [
        "eval",
        "--benchmark",
        "digits",
        "--target",
        "printed",
        "--method",
        "zeroshot",
        "--runs-dir",
        str(tmp_path),
        "--no-progress",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "RANDOM" not in out
    (path,) = tmp_path.glob("*/*/results.jsonl")
    assert json.loads(path.read_text().splitlines()[-1])["backbone"] == "tiny-digits"
    assert main([*argv, "--backbone", "tiny-vit"]) == 0  # naming one still wins
    assert "RANDOM weights" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_trains_three_methods_on_every_target_and_writes_the_report(tmp_path, capsys):
    runs = tmp_path / "demo"
    # the full path on a small draw of the world (the numbers are not the README's)
    small = ["--n-per-class", "6"]
    assert main(["demo", "--runs-dir", str(runs), "--no-progress", "--threads", "1", *small]) == 0
    out = capsys.readouterr().out
    table = out[out.index("| method | handwritten | outline | printed | textured | mean |") :]
    methods = ("zeroshot", "coop", "seeclip", "seeclip_selected")
    assert all(f"| {m} |" in table for m in methods)
    assert str(runs / "report" / "index.html") in out
    assert len(list(runs.glob("digits_full_*/*/done"))) == 16
    # the source-selected SeeCLIP: no pseudo-unknowns, shown under its LODO-calibrated threshold
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    selected = list(runs.glob("digits_full_*_seeclip_selected/*/results.jsonl"))
    assert len(selected) == 4
    for path in selected:
        record = [json.loads(x) for x in path.read_text().splitlines()][-1]
        assert record["config"]["train"]["pseudo_unknowns"] == "none"
        h = 100 * record["rules"]["lodo_threshold"]["h_score"]
        assert f"{h:.1f}" in rows["seeclip_selected"], (h, rows["seeclip_selected"])
    kinds = {p.name.split("_")[0] for p in (runs / "report" / "figures").glob("*.png")}
    assert kinds == {"roc", "scores", "h", "confusion"}
    assert main(["demo", "--runs-dir", str(runs), "--no-progress", *small]) == 0  # all reused
    out = capsys.readouterr().out
    assert "all 12 runs finished earlier" in out and "all 4 runs finished earlier" in out


@pytest.mark.parametrize("command", ["eval", "train", "sweep"])
def test_random_weights_on_a_real_benchmark_are_refused_up_front(command, tmp_path, capsys):
    root = tmp_path / "pacs_images"  # exists; its contents are never read
    root.mkdir()
    argv = {
        "eval": ["eval", "--benchmark", "pacs", "--target", "photo", "--data-root", str(root)],
        "train": ["train", "--config", "pacs", "--target", "photo", "--data-root", str(root),
                  "backbone.pretrained=null"],
        "sweep": ["sweep", f"data.data_root={root}", "backbone.pretrained=null", "--config",
                  "pacs", "--methods", "zeroshot", "--targets", "photo"],
    }[command]  # fmt: skip
    assert main([*argv, "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "pacs with random" in err and "backbone.pretrained=PATH" in err
    assert err.count("\n") == 1 and not (tmp_path / "runs").exists()
    # a shipped tiny model or an explicit checkpoint is not random
    from seeclip.backbone import has_weights

    assert has_weights("tiny-digits", None) and has_weights("ViT-B-16", "/w.safetensors")
    assert not has_weights("ViT-B-16", None) and not has_weights("tiny-vit", None)


@pytest.mark.parametrize("command", [["eval", "--threads", "-3"], ["sweep", "--jobs", "0"]])
def test_threads_and_jobs_must_be_positive(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(command)
    assert exit_.value.code == 2
    assert "expected a whole number >= 1" in capsys.readouterr().err
