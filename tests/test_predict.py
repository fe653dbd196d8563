"""seeclip predict / seeclip.load(run).predict: round trip, inputs, bad files."""

import csv
import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import seeclip
from seeclip.cli import main
from seeclip.datasets import get_benchmark, load_manifest
from seeclip.records import run_dir_of
from seeclip.report import read_records


@pytest.fixture(scope="module")
def trained(small_digits, tmp_path_factory):
    """A finished coop run (learned prompt + threshold) on the small digits benchmark."""
    runs = tmp_path_factory.mktemp("predict_runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("SEECLIP_HOME", str(small_digits))
    argv = [
        "eval",
        "--benchmark",
        "digits",
        "--target",
        "printed",
        "--method",
        "coop",
        "--backbone",
        "tiny-vit",
        "--runs-dir",
        str(runs),
        "--no-progress",
        "train.epochs=1",
        "train.batch_size=8",
    ]
    assert main(argv) == 0
    mp.undo()
    (record,) = read_records(runs)
    return run_dir_of(runs, record), small_digits


def _target_paths(home, run_dir):
    z = np.load(run_dir / "predictions.npz")
    spec = get_benchmark("digits")
    manifest = load_manifest(spec, home / "data" / "digits")
    paths = [manifest.root / s.path for s in manifest.samples if s.domain == "printed"]
    return paths, z


def test_predicting_the_target_reproduces_the_recorded_predictions(trained, monkeypatch):
    run_dir, home = trained
    monkeypatch.setenv("SEECLIP_HOME", str(home))
    paths, z = _target_paths(home, run_dir)
    assert len(paths) == len(z["y_true"])
    rows = seeclip.load(run_dir).predict(paths)
    names = [*z["known_classes"].tolist(), "unknown"]
    assert [r.label for r in rows] == [names[i] for i in z["y_pred"]]
    assert [r.closed_label for r in rows] == [names[i] for i in z["y_pred_closed"]]
    np.testing.assert_array_equal([r.unknown_score for r in rows], z["unknown_score"])
    assert all(r.confidence == pytest.approx(1 - r.unknown_score) for r in rows)


def test_pil_and_tensor_inputs_give_the_same_answer_as_the_file(trained, monkeypatch):
    run_dir, home = trained
    monkeypatch.setenv("SEECLIP_HOME", str(home))
    paths, _ = _target_paths(home, run_dir)
    predictor = seeclip.load(run_dir)
    pil = Image.open(paths[0]).convert("RGB")
    tensor = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255
    by_path, by_pil, by_tensor, *batch = predictor.predict(
        [paths[0], pil, tensor, torch.stack([tensor, tensor])]
    )
    assert by_pil.source == "<image 1>" and len(batch) == 2
    for r in (by_pil, by_tensor, *batch):
        assert (r.label, r.unknown_score) == (by_path.label, by_path.unknown_score)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        predictor.predict([torch.zeros(2, 2)])
    with pytest.raises(TypeError, match="PIL images, tensors or paths"):
        predictor.predict([42])


def test_cli_predict_folder_with_a_corrupt_file(trained, tmp_path, monkeypatch, capsys):
    run_dir, home = trained
    monkeypatch.setenv("SEECLIP_HOME", str(home))
    paths, _ = _target_paths(home, run_dir)
    folder = tmp_path / "mine"
    folder.mkdir()
    for i, p in enumerate(paths[:3]):
        (folder / f"{i}.png").write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not listed: not an image suffix")
    out = tmp_path / "preds.csv"
    assert (
        main(
            [
                "predict",
                "--run",
                str(run_dir),
                str(folder),
                str(tmp_path / "gone.jpg"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "5 images" in captured.out and "2 unreadable" in captured.out
    assert "broken.png" in captured.err and "gone.jpg" in captured.err
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["path"].rsplit("/", 1)[-1] for r in rows] == [
        "0.png",
        "1.png",
        "2.png",
        "broken.png",
        "gone.jpg",
    ]
    good, bad = rows[:3], rows[3:]
    assert all(
        r["prediction"] and not r["error"] and 0 <= float(r["confidence"]) <= 1 for r in good
    )
    assert all(r["error"] and not r["prediction"] for r in bad)
    assert main(["predict", "--run", str(tmp_path), str(folder)]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_an_unfinished_or_diverged_run_is_refused(trained, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file, save_file

    run_dir, home = trained
    monkeypatch.setenv("SEECLIP_HOME", str(home))
    image = str(_target_paths(home, run_dir)[0][0])
    unfinished = tmp_path / "a" / run_dir.parent.name / run_dir.name  # folder name = hash
    shutil.copytree(run_dir, unfinished)
    (unfinished / "done").unlink()
    assert main(["predict", "--run", str(unfinished), image]) == 2
    err = capsys.readouterr().err
    assert "is not a finished run (no done marker)" in err and err.count("\n") == 1
    diverged = tmp_path / "b" / run_dir.parent.name / run_dir.name
    shutil.copytree(run_dir, diverged)
    state = load_file(str(diverged / "model.safetensors"))
    name = next(k for k, v in state.items() if v.is_floating_point() and v.dim() > 0)
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    save_file(state, str(diverged / "model.safetensors"))
    assert main(["predict", "--run", str(diverged), image]) == 2
    err = capsys.readouterr().err
    assert f"holds non-finite values ({name})" in err and "smaller train.lr" in err
    assert main(["predict", "--run", str(run_dir), image]) == 0  # the finished run still serves


def test_predict_uses_the_runs_own_classes_not_the_benchmark_files(trained, monkeypatch):
    """A run keeps its class names and prompts: predict does not re-read the benchmark's spec
    (an edited class YAML would rename the predictions; a moved data root would break it)."""
    from seeclip import predict
    from seeclip.records import final_record

    run_dir, home = trained
    monkeypatch.setenv("SEECLIP_HOME", str(home))
    facts = final_record(run_dir)["classes"]
    assert facts["known"] == ["zero", "one", "two", "three", "four", "five"]
    assert sorted(facts["sources"]) == ["handwritten", "outline", "textured"]  # not printed

    def no_spec(*args, **kwargs):
        raise AssertionError("predict read the benchmark's spec")

    monkeypatch.setattr(predict, "get_benchmark", no_spec)
    paths, z = _target_paths(home, run_dir)
    rows = seeclip.load(run_dir).predict(paths[:6])
    names = [*facts["known"], "unknown"]
    assert [r.label for r in rows] == [names[i] for i in z["y_pred"][:6]]
