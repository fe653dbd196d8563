"""Bad input found by trying seeclip as a new user would: each case gets a one-line error that
names the fix (or is handled), and nothing already computed is lost."""

from __future__ import annotations

import errno
import io
import os
import pickle
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from seeclip import cli
from seeclip.backbone import build_backbone
from seeclip.cache import encode_cached
from seeclip.cli.run import expand_configs
from seeclip.config import apply_overrides
from seeclip.datasets import get_benchmark, prepare
from seeclip.datasets.images import ImageReadError, load_image
from seeclip.datasets.layouts import DataLayoutError
from seeclip.io import NoSpaceError, UnreadableFileError, load_checkpoint, load_tensors
from seeclip.run_config import RunConfig

torch.set_num_threads(1)


def _rgb(path: Path, seed: int = 0, size: int = 24) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _folder_tree(root: Path, n: int = 2) -> None:
    for d in ("art", "photo", "sketch"):
        for i, c in enumerate(("cat", "dog", "horse")):
            for k in range(n):
                _rgb(root / d / c / f"{k}.png", seed=100 * i + k)


def _cli(argv, capsys) -> tuple[int, list[str]]:
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if line.startswith("seeclip: error")]


# ---------------------------------------------------------------------------- images
def test_16_bit_greyscale_png_keeps_its_values(tmp_path):
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = np.asarray(load_image(tmp_path / "g16.png"))
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    expected = np.rint(ramp / 257.0).astype(np.uint8)
    assert np.abs(rgb[..., 0].astype(int) - expected).max() <= 1  # not clipped to white
    assert rgb.min() == 0 and rgb.max() == 255


def test_a_phone_photo_is_read_upright_as_its_exif_orientation_says(tmp_path):
    """A camera stores a portrait shot sideways with an EXIF Orientation tag; viewers (and now
    seeclip, for prepare, training and predict alike) turn it upright."""
    stored = np.zeros((20, 40, 3), dtype=np.uint8)  # landscape as stored, left half white
    stored[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    shown = np.asarray(load_image(tmp_path / "phone.jpg"))
    assert shown.shape == (40, 20, 3)  # portrait
    assert shown[:15].mean() > 200 and shown[-15:].mean() < 50  # the white half is on top
    Image.fromarray(stored).save(tmp_path / "plain.jpg", quality=95)  # no tag: as stored
    assert np.asarray(load_image(tmp_path / "plain.jpg")).shape == (20, 40, 3)


def test_truncated_jpeg_is_caught_by_prepare_and_skipped_with_the_flag(tmp_path):
    root = tmp_path / "data"
    _folder_tree(root)
    buf = io.BytesIO()
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    (root / "art" / "dog" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    with Image.open(root / "art" / "dog" / "cut.jpg") as im:
        im.verify()  # PIL's verify alone passes it: the reason prepare decodes too
    (tmp_path / "c.yaml").write_text("known: [cat, dog]\nunknown: [horse]\n")
    spec = get_benchmark("folder", classes_file=tmp_path / "c.yaml", data_root=root)
    with pytest.raises(DataLayoutError, match=r"art/dog/cut\.jpg.*--skip-corrupt"):
        prepare(spec, root, out=tmp_path / "m.csv")
    manifest = prepare(spec, root, out=tmp_path / "m.csv", skip_corrupt=True)
    assert manifest.skipped == ("art/dog/cut.jpg",) and len(manifest.samples) == 18
    with pytest.raises(ImageReadError, match="--skip-corrupt"):
        load_image(root / "art" / "dog" / "cut.jpg")


def test_image_deleted_after_prepare_says_rerun_prepare(tmp_path):
    with pytest.raises(ImageReadError, match=r"gone since `seeclip prepare`.*rerun `seeclip"):
        load_image(tmp_path / "gone.png")


# ------------------------------------------------------------------ the folder benchmark
def test_macosx_folder_is_not_a_domain_and_a_string_is_not_a_class_list(tmp_path):
    root = tmp_path / "data"
    _folder_tree(root, n=1)
    (root / "__MACOSX" / "art").mkdir(parents=True)
    (root / "art" / "__MACOSX").mkdir()
    (tmp_path / "c.yaml").write_text("known: [cat, dog]\nunknown: [horse]\n")
    spec = get_benchmark("folder", classes_file=tmp_path / "c.yaml", data_root=root)
    assert spec.domains == ("art", "photo", "sketch")
    assert len(prepare(spec, root, out=tmp_path / "m.csv").samples) == 9
    (tmp_path / "s.yaml").write_text("known: tshirt\nunknown: [horse]\n")
    with pytest.raises(ValueError, match=r"`known:` must be a list, e.g. `known: \[tshirt\]`"):
        get_benchmark("folder", classes_file=tmp_path / "s.yaml", data_root=root)


def test_folder_target_all_uses_the_data_root(tmp_path):
    root = tmp_path / "data"
    _folder_tree(root, n=1)
    (tmp_path / "c.yaml").write_text("known: [cat, dog]\nunknown: [horse]\n")
    cfg = apply_overrides(
        RunConfig(),
        [
            "data.benchmark=folder",
            f"data.data_root={root}",
            f"data.classes_file={tmp_path / 'c.yaml'}",
        ],
    )
    assert [c.data.target for c in expand_configs(cfg, None, None)] == ["art", "photo", "sketch"]


def test_relative_and_absolute_paths_give_one_run(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    rel = apply_overrides(RunConfig(), ["data.data_root=data", "data.classes_file=./c.yaml"])
    absolute = apply_overrides(
        RunConfig(), [f"data.data_root={tmp_path / 'data'}", f"data.classes_file={tmp_path}/c.yaml"]
    )
    assert rel.data.data_root == str(tmp_path / "data")  # stored absolute: works from anywhere
    assert rel.hash() == absolute.hash()


# ------------------------------------------------------------------ weights and pickles
class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "last.pt"
    evil.write_bytes(pickle.dumps({"model": _Exploit(marker)}))
    with pytest.raises(UnreadableFileError, match="refused.*could run code"):
        load_checkpoint(evil)
    # every path that loads a file: --pretrained, pretrain-clip's resume file, run weights
    with pytest.raises(UnreadableFileError):
        build_backbone("tiny-rn", pretrained=str(evil))
    from seeclip.zoo.pretrain import default_config, pretrain_clip

    cfg = default_config("digits")
    with pytest.raises(UnreadableFileError):
        pretrain_clip(cfg, tmp_path, progress=False, stop_at=1)
    for name in ("model.safetensors", "pool.safetensors"):
        (tmp_path / name).write_bytes(pickle.dumps(_Exploit(marker)))
        with pytest.raises(UnreadableFileError, match="not a safetensors file"):
            load_tensors(tmp_path / name)
    assert not marker.exists()


def test_non_weights_files_get_one_line(tmp_path, small_digits, monkeypatch, capsys):
    monkeypatch.setenv("SEECLIP_HOME", str(small_digits))
    (tmp_path / "w.safetensors").write_text("hello")
    (tmp_path / "w.pt").write_bytes(b"\x80\x04not a checkpoint at all")
    for name, why in (
        ("w.safetensors", "not a safetensors file"),
        ("w.pt", "not a file of tensors only"),
    ):
        code, err = _cli(
            [
                "eval",
                "--benchmark",
                "digits",
                "--method",
                "zeroshot",
                "--backbone",
                "tiny-rn",
                "--pretrained",
                tmp_path / name,
                "--target",
                "printed",
                "--runs-dir",
                tmp_path / "runs",
                "--no-progress",
            ],
            capsys,
        )
        assert code == 2 and len(err) == 1 and why in err[0], err


def test_broken_yaml_is_one_line(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("method: coop\ntrain:\n  epochs: [1\n")
    code, err = _cli(["train", "--config", tmp_path / "bad.yaml"], capsys)
    assert code == 2 and len(err) == 1
    assert "invalid YAML at line" in err[0] and "fix the file's syntax" in err[0]


@pytest.mark.parametrize(
    ("code", "fix"), [(errno.ENOSPC, "free some space"), (errno.EACCES, "a folder you can write")]
)
def test_os_errors_are_one_line_with_the_fix(code, fix, capsys, monkeypatch):
    def fails(args):
        raise OSError(code, os.strerror(code), "/data/x")

    monkeypatch.setattr(cli.listing, "run", fails)
    status, err = _cli(["list"], capsys)
    assert status == 1 and len(err) == 1 and fix in err[0] and "/data/x" in err[0]


# ---------------------------------------------------------------------- feature cache
@pytest.fixture(scope="module")
def backbone():
    return build_backbone("tiny-vit", seed=0)


@pytest.fixture
def images(tmp_path):
    names = [f"{i}.bmp" for i in range(6)]  # uncompressed: other pixels, same file size
    for i, n in enumerate(names):
        _rgb(tmp_path / "img" / n, seed=i, size=40)
    return tmp_path / "img", names


def test_disk_full_is_checked_before_encoding_and_leaves_nothing(
    backbone, images, tmp_path, monkeypatch
):
    root, names = images
    import shutil as shutil_module

    real = shutil_module.disk_usage
    monkeypatch.setattr("seeclip.io.shutil.disk_usage", lambda p: real(p)._replace(free=10 * 2**20))
    with pytest.raises(NoSpaceError) as info:
        encode_cached(backbone, root, names, cache_dir=tmp_path / "c", name="e", progress=False)
    assert "MiB" in str(info.value) and "free some space" in str(info.value)
    assert [p.name for p in (tmp_path / "c").iterdir() if p.suffix != ".lock"] == []


def test_disk_filling_up_while_reserving_is_an_error_not_a_bus_error(
    backbone, images, tmp_path, monkeypatch
):
    root, names = images

    def no_space(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("seeclip.io.os.posix_fallocate", no_space)
    with pytest.raises(NoSpaceError):
        encode_cached(backbone, root, names, cache_dir=tmp_path / "c", name="e", progress=False)
    assert [p.name for p in (tmp_path / "c").iterdir() if p.suffix != ".lock"] == []


def test_two_builders_of_one_entry_encode_it_once(backbone, images, tmp_path, monkeypatch):
    root, names = images
    seen = []
    encode = backbone.encode_image

    def slow(batch):
        seen.append(batch.shape[0])
        time.sleep(0.2)
        return encode(batch)

    monkeypatch.setattr(backbone, "encode_image", slow)
    out = []

    def build():
        out.append(
            encode_cached(
                backbone,
                root,
                names,
                cache_dir=tmp_path / "c",
                name="e",
                batch_size=2,
                progress=False,
            )
        )

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(seen) == len(names)  # one build; the other waited and read it
    assert len(out) == 2 and out[0].key == out[1].key
    np.testing.assert_array_equal(out[0].global_, out[1].global_)


def test_verify_cache_catches_same_size_same_mtime_replacements(backbone, images, tmp_path):
    root, names = images
    kwargs = {"cache_dir": tmp_path / "c", "name": "e", "progress": False}
    first = encode_cached(backbone, root, names, **kwargs)
    before = np.array(first.global_[0])
    target = root / names[0]
    stat = target.stat()
    _rgb(target, seed=999, size=40)  # other pixels, same format and size
    assert target.stat().st_size == stat.st_size
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    trusted = encode_cached(backbone, root, names, **kwargs)
    np.testing.assert_array_equal(trusted.global_[0], before)  # the documented blind spot
    verified = encode_cached(backbone, root, names, verify=True, **kwargs)
    assert not np.allclose(verified.global_[0], before)


def _prepared_folder(tmp_path, capsys) -> list[str]:
    root = tmp_path / "data"
    _folder_tree(root, n=6)
    (tmp_path / "c.yaml").write_text("known: [cat, dog]\nunknown: [horse]\n")
    argv = ["--benchmark", "folder", "--classes", tmp_path / "c.yaml", "--data-root", root]
    assert cli.main([str(a) for a in ["prepare", "folder", *argv[2:], "--no-progress"]]) == 0
    capsys.readouterr()
    return [
        str(a)
        for a in [
            "eval",
            *argv,
            "--method",
            "zeroshot",
            "--backbone",
            "tiny-vit",
            "--target",
            "art",
            "--runs-dir",
            tmp_path / "runs",
            "--no-progress",
        ]
    ]


def test_image_deleted_or_damaged_after_prepare_is_one_line_at_eval(tmp_path, capsys):
    argv = _prepared_folder(tmp_path, capsys)
    (tmp_path / "data" / "photo" / "dog" / "3.png").unlink()
    code, err = _cli(argv, capsys)
    assert code == 2 and len(err) == 1 and "gone since `seeclip prepare`" in err[0], err
    _rgb(tmp_path / "data" / "photo" / "dog" / "3.png", seed=5)
    png = tmp_path / "data" / "sketch" / "cat" / "2.png"
    png.write_bytes(png.read_bytes()[:60])  # truncated after prepare checked it
    code, err = _cli(argv, capsys)
    assert code == 2 and len(err) == 1 and "sketch/cat/2.png" in err[0], err


def test_a_crafted_training_checkpoint_is_refused(tmp_path):
    from test_trainer import _trainer, synthetic

    marker = tmp_path / "pwned"
    (tmp_path / "train_state.pt").write_bytes(pickle.dumps({"epoch": _Exploit(marker)}))
    feats, labels = synthetic()
    t = _trainer(build_backbone("tiny-vit"), "coop", epochs=1)
    with pytest.raises(ValueError, match="holds more than tensors.*--force") as err:
        t.fit(feats, labels, feats, labels, checkpoint=tmp_path / "train_state.pt")
    assert isinstance(err.value.__cause__, UnreadableFileError)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("key", "name"),
    [("known", "../outside"), ("unknown", "a/b"), ("domains", ".."), ("known", " ")],
)
def test_folder_spec_names_must_be_plain_folder_names(tmp_path, key, name):
    lists = {"domains": ["art", "photo"], "known": ["cat", "dog"], "unknown": ["fox"]}
    lists[key] = [*lists[key], name]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(lists))
    with pytest.raises(ValueError, match=f"`{key}:` entry '{re.escape(name)}' is not a plain"):
        get_benchmark("folder", classes_file=tmp_path / "c.yaml", data_root=tmp_path)


# ---------------------------------------------------------- damaged state, interruptions
def _digits_eval(tmp_path, method="seeclip"):
    return [
        "eval",
        "--benchmark",
        "digits",
        "--method",
        method,
        "--backbone",
        "tiny-vit",
        "--target",
        "printed",
        "--runs-dir",
        tmp_path / "runs",
        "--no-progress",
        "train.epochs=2",
        "train.batch_size=8",
    ]


def test_a_damaged_manifest_names_its_line_and_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEECLIP_HOME", str(tmp_path / "home"))
    assert cli.main(["prepare", "digits", "--n-per-class", "2", "--no-progress"]) == 0
    (manifest,) = (tmp_path / "home" / "manifests").glob("digits-*.csv")
    lines = manifest.read_text().splitlines()
    lines[3] = lines[3][:9]  # a row cut short
    manifest.write_text("\n".join(lines) + "\n")
    code, err = _cli(_digits_eval(tmp_path, "zeroshot"), capsys)
    assert code == 2 and len(err) == 1, err
    assert f"{manifest} line 4 is damaged" in err[0] and "seeclip prepare digits" in err[0]
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_in_training_is_one_line_and_the_rerun_resumes(
    tmp_path, small_digits, monkeypatch, capsys
):
    from seeclip.runner import TRAIN_STATE
    from seeclip.trainer import PromptTrainer

    monkeypatch.setenv("SEECLIP_HOME", str(small_digits))
    real = PromptTrainer._save_checkpoint

    def interrupted_after_epoch_1(self, path, epoch, *args, **kwargs):
        real(self, path, epoch, *args, **kwargs)
        raise KeyboardInterrupt  # as Ctrl-C right after the first epoch's checkpoint

    monkeypatch.setattr(PromptTrainer, "_save_checkpoint", interrupted_after_epoch_1)
    assert cli.main([str(a) for a in _digits_eval(tmp_path)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "seeclip: interrupted; finished runs, caches and checkpoints are kept: rerun the "
        "same command to resume"
    ]
    (state,) = (tmp_path / "runs").rglob(TRAIN_STATE)
    assert torch.load(state, weights_only=True)["epoch"] == 1
    monkeypatch.setattr(PromptTrainer, "_save_checkpoint", real)
    assert cli.main([str(a) for a in _digits_eval(tmp_path)]) == 0  # resumes and finishes
    assert not state.exists() and (state.parent / "done").exists()


def test_a_truncated_training_checkpoint_says_how_to_start_afresh(
    tmp_path, small_digits, monkeypatch, capsys
):
    from seeclip.run_config import RunConfig
    from seeclip.runner import TRAIN_STATE

    monkeypatch.setenv("SEECLIP_HOME", str(small_digits))
    argv = _digits_eval(tmp_path)
    cfg = apply_overrides(
        RunConfig(),
        ["data.target=printed", "method=seeclip", "backbone.name=tiny-vit", *argv[-2:]],
    )
    run_dir = cfg.run_dir(tmp_path / "runs")
    run_dir.mkdir(parents=True)
    (run_dir / TRAIN_STATE).write_bytes(b"PK\x03\x04 cut short")
    code, err = _cli(argv, capsys)
    assert code == 2 and len(err) == 1, err
    assert "is damaged" in err[0] and "--force" in err[0] and "first epoch" in err[0]
    assert cli.main([*map(str, argv), "--force"]) == 0


def test_a_killed_writers_temporary_siblings_go_with_the_next_write(tmp_path):
    """A SIGKILL between writing a temporary sibling and renaming it strands the sibling; the
    next write to the same destination removes it when its writer (host, pid) is gone, and
    leaves a live writer's, another host's and other names alone."""
    import socket
    import subprocess
    import sys

    from seeclip.io import atomic_dir, write_text

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    host = "".join(c if c.isalnum() or c == "-" else "_" for c in socket.gethostname())
    stranded = tmp_path / f".results.tmp-{host}-{dead}-abc123.jsonl"
    live = tmp_path / f".results.tmp-{host}-{os.getpid()}-def456.jsonl"
    remote = tmp_path / f".results.tmp-otherhost-{dead}-ghi789.jsonl"
    for f in (stranded, live, remote):
        f.write_text("partial")
    write_text(tmp_path / "results.jsonl", "whole\n")
    assert (tmp_path / "results.jsonl").read_text() == "whole\n"
    assert not stranded.exists() and live.exists() and remote.exists()
    tree = tmp_path / f".digits.tmp-{host}-{dead}-xyz"
    (tree / "a").mkdir(parents=True)
    with atomic_dir(tmp_path / "digits") as out:
        (out / "meta.json").write_text("{}")
    assert not tree.exists() and (tmp_path / "digits" / "meta.json").is_file()


def test_too_few_images_for_a_validation_split_names_the_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEECLIP_HOME", str(tmp_path / "home"))
    assert cli.main(["prepare", "digits", "--n-per-class", "2", "--no-progress"]) == 0
    code, err = _cli(_digits_eval(tmp_path, "zeroshot"), capsys)
    assert code == 2 and len(err) == 1, err
    assert "source-validation images" in err[0] and "data.val_fraction" in err[0]
