"""`seeclip generate` end to end on a reduced digits benchmark with tiny models (no download)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from seeclip.cli import main

TINY_DIFFUSION = [
    "diffusion.train_steps=20",
    "diffusion.width=64",
    "diffusion.depth=1",
    "diffusion.batch_size=32",
    "diffusion.sample_steps=4",
]


def _train_one_run(preset, runs, *overrides) -> bool:
    """`seeclip train` with the preset; True when it exits 0 and leaves one finished run."""
    argv = ["train", "--config", str(preset), "--runs-dir", str(runs), "--no-progress"]
    return main([*argv, *overrides]) == 0 and len(list(runs.glob("*/*/done"))) == 1


def _image_argv(preset, *extra) -> list[str]:
    """`seeclip generate` with the image backend, 2 pseudo-unknowns per source domain."""
    argv = ["generate", "--config", str(preset), "--backend", "image", "--n", "2"]
    return [*argv, "--no-progress", *extra]


@pytest.fixture()
def preset(tmp_path, small_digits, monkeypatch):
    monkeypatch.setenv("SEECLIP_HOME", str(small_digits))
    path = tmp_path / "preset.yaml"
    path.write_text(
        "data: {benchmark: digits, protocol: full, target: outline}\n"
        "backbone: {name: tiny-vit}\nmethod: seeclip\n"
        "train: {epochs: 1, batch_size: 6}\n"
    )
    return path


def test_feature_pool_is_built_once_and_inspected(preset, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [
        "generate",
        "--config",
        str(preset),
        "--backend",
        "feature",
        "--n",
        "8",
        "--no-progress",
        *TINY_DIFFUSION,
    ]
    assert main([*argv, "--inspect"]) == 0
    out = capsys.readouterr().out
    assert "feature pool: 24 pseudo-unknowns" in out  # 8 per source domain, 3 sources
    assert "pseudo-unknown" in out and "already rejects" in out
    assert (tmp_path / "pseudo_unknowns_digits_full_outline.png").stat().st_size > 0
    pool_line = next(line for line in out.splitlines() if line.startswith("feature pool"))
    assert main(argv) == 0  # same key: loaded, not regenerated
    assert pool_line in capsys.readouterr().out


def test_training_uses_the_diffusion_pool(preset, tmp_path, capsys):
    overrides = ["train.pseudo_unknowns=diffusion", "diffusion.pool_per_domain=8"]
    assert _train_one_run(preset, tmp_path / "runs", *overrides, *TINY_DIFFUSION)


def test_image_backend_offline_error_names_the_fix(preset, capsys):
    assert main(_image_argv(preset, "--sd-model", "/nonexistent/sd")) == 2
    err = capsys.readouterr().err
    assert "no Stable Diffusion pipeline at /nonexistent/sd (no such folder)" in err
    assert "--sd-model" in err and err.count("\n") == 1


def test_image_pool_goes_through_the_cache_into_training(preset, tmp_path, capsys, monkeypatch):
    from seeclip.generate import sd_pipeline
    from seeclip.testing import build_tiny_pipeline

    monkeypatch.setattr(sd_pipeline, "load_pipeline", lambda *a, **k: build_tiny_pipeline(0))
    out = tmp_path / "pool"
    assert main(_image_argv(preset, "--out", str(out), "diffusion.guidance=2")) == 0
    assert "image pool: 6 images" in capsys.readouterr().out
    pool = f"train.pseudo_pool={out / 'manifest.csv'}"
    assert _train_one_run(preset, tmp_path / "runs", "train.pseudo_unknowns=images", pool)


def _pool_path(out: str) -> str:
    line = next(x for x in out.splitlines() if x.startswith("train with it"))
    return line.rsplit("=", 1)[1]


def test_stored_feature_pools_train_and_select_with_a_held_out_val_pool(preset, tmp_path, capsys):
    base = ["generate", "--config", str(preset), "--backend", "feature", "--n", "4"]
    assert main([*base, "--no-progress", *TINY_DIFFUSION]) == 0
    train_pool = _pool_path(capsys.readouterr().out)
    assert main([*base, "--from", "val", "--no-progress", *TINY_DIFFUSION]) == 0
    out = capsys.readouterr().out
    assert "train.val_pseudo_pool=" in out
    val_pool = _pool_path(out)
    assert val_pool != train_pool  # made from other images, so another pool
    use = ["train.pseudo_unknowns=pool", f"train.pseudo_pool={train_pool}", "train.selection=val_h"]
    assert main(["train", "--config", str(preset), "--runs-dir", str(tmp_path / "r0"), *use]) == 2
    assert "needs train.val_pseudo_pool=PATH" in capsys.readouterr().err
    assert _train_one_run(preset, tmp_path / "r1", *use, f"train.val_pseudo_pool={val_pool}")


def _training_pool(preset, cache, *overrides):
    """The pool training builds for ``train.pseudo_unknowns``: its source, as a run makes it,
    with its pools under ``cache``."""
    from seeclip.run_config import load_config
    from seeclip.run_data import load_run_data
    from seeclip.wiring import pseudo_sources

    cfg = load_config(preset, list(overrides))
    run = load_run_data(cfg, progress=False)
    return pseudo_sources(cfg, run, cache_dir=cache, progress=False).train()


def _pool_images(manifest) -> list[tuple[str, str, bytes]]:
    from seeclip.generate.image_pool import load_image_pool

    pool = load_image_pool(manifest)
    return [
        (d, s, (pool.root / p).read_bytes())
        for p, d, s in zip(pool.paths, pool.domains, pool.sources, strict=True)
    ]


def test_generate_and_training_draw_the_same_image_pool(preset, tmp_path, capsys, monkeypatch):
    """Every setting of the image generator reaches `seeclip generate` as it reaches training:
    the sample steps, SDEdit strength and diffusion seed included."""
    from seeclip.generate import sd_pipeline
    from seeclip.testing import build_tiny_pipeline

    monkeypatch.setattr(sd_pipeline, "load_pipeline", lambda *a, **k: build_tiny_pipeline(0))
    settings = [
        "diffusion.sample_steps=3",
        "train.sd_strength=0.6",
        "diffusion.seed=7",
        "diffusion.guidance=2",
        "diffusion.pool_per_domain=2",
    ]
    assert main(_image_argv(preset, "--out", str(tmp_path / "pool"), *settings)) == 0
    assert "image pool: 6 images" in capsys.readouterr().out
    generated = _pool_images(tmp_path / "pool")
    _training_pool(preset, tmp_path / "cache", "train.pseudo_unknowns=sd_images", *settings)
    (trained,) = (tmp_path / "cache" / "pools" / "images").glob("sd-*/manifest.csv")
    assert _pool_images(trained) == generated
    assert (
        sorted(d for d, _, _ in generated)
        == ["handwritten"] * 2 + ["printed"] * 2 + ["textured"] * 2
    )  # the sources of target outline, 2 each
    # each setting changes the images, so the equality above is not two pools ignoring it
    for changed in ("diffusion.sample_steps=2", "train.sd_strength=0.8", "diffusion.seed=8"):
        other = [s for s in settings if s.split("=")[0] != changed.split("=")[0]]
        out = tmp_path / changed
        assert main(_image_argv(preset, "--out", str(out), *other, changed)) == 0
        assert [b for *_, b in _pool_images(out)] != [b for *_, b in generated], changed
    # without --out, generate draws into the folder training looks in: training reuses it
    capsys.readouterr()
    cache = tmp_path / "ahead"
    assert main(_image_argv(preset, "--cache-dir", str(cache), *settings)) == 0
    (ahead,) = (cache / "pools" / "images").glob("sd-*/manifest.csv")
    stamps = {p: p.stat().st_mtime_ns for p in ahead.parent.iterdir()}
    _training_pool(preset, cache, "train.pseudo_unknowns=sd_images", *settings)
    assert list((cache / "pools" / "images").iterdir()) == [ahead.parent]
    assert {p: p.stat().st_mtime_ns for p in ahead.parent.iterdir()} == stamps


def test_generate_and_training_draw_the_same_feature_pool(preset, tmp_path, capsys):
    settings = ["diffusion.seed=3", "diffusion.pool_per_domain=4", *TINY_DIFFUSION]
    argv = [
        "generate",
        "--config",
        str(preset),
        "--backend",
        "feature",
        "--cache-dir",
        str(tmp_path / "a"),
        "--no-progress",
        *settings,
    ]
    assert main(argv) == 0
    path = Path(_pool_path(capsys.readouterr().out))
    stored = _training_pool(
        preset, tmp_path, "train.pseudo_unknowns=pool", f"train.pseudo_pool={path}"
    ).features
    # training draws its own pool (another cache root): the same folder name and features
    trained = _training_pool(preset, tmp_path / "b", "train.pseudo_unknowns=diffusion", *settings)
    assert trained.path.name == path.name and trained.path != path
    assert torch.equal(trained.features().global_, stored.global_)
    assert torch.equal(trained.features().tokens, stored.tokens.to(trained.features().tokens))
    assert trained.features().domains == stored.domains


def test_the_printed_train_command_runs_as_printed(preset, tmp_path, capsys, monkeypatch):
    import shlex

    from seeclip.generate import sd_pipeline
    from seeclip.testing import build_tiny_pipeline

    monkeypatch.setattr(sd_pipeline, "load_pipeline", lambda *a, **k: build_tiny_pipeline(0))
    argv = [
        "generate",
        "--config",
        str(preset),
        "--backend",
        "image",
        "--target",
        "printed",
        "--n",
        "2",
        "--no-progress",
        "--out",
        str(tmp_path / "pool"),
        "train.epochs=1",
    ]
    assert main(argv) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("train with it"))
    command = shlex.split(line.removeprefix("train with it: "))
    assert command[:2] == ["seeclip", "train"] and "--target" in command
    assert "train.epochs=1" in command
    runs = tmp_path / "runs"
    assert main([*command[1:], "--runs-dir", str(runs), "--no-progress"]) == 0
    (run,) = runs.glob("*/*/done")
    assert run.parent.parent.name.startswith("digits_full_printed_")
    config = (run.parent / "config.yaml").read_text()
    assert "pseudo_unknowns: images" in config and str(tmp_path / "pool") in config


def test_a_pool_of_other_settings_in_out_is_replaced_only_with_overwrite(
    preset, tmp_path, capsys, monkeypatch
):
    from seeclip.generate import sd_pipeline
    from seeclip.testing import build_tiny_pipeline

    monkeypatch.setattr(sd_pipeline, "load_pipeline", lambda *a, **k: build_tiny_pipeline(0))
    out = ["--out", str(tmp_path / "pool")]
    assert main(_image_argv(preset, *out, "diffusion.sigma=0.2")) == 0
    first = _pool_images(tmp_path / "pool")
    assert main(_image_argv(preset, *out, "diffusion.sigma=0.5")) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _pool_images(tmp_path / "pool") == first  # nothing lost
    assert main(_image_argv(preset, *out, "--overwrite", "diffusion.sigma=0.5")) == 0
    assert _pool_images(tmp_path / "pool") != first


def test_sd_image_size_sets_the_generated_side(preset, tmp_path, monkeypatch):
    from PIL import Image

    from seeclip.config import ConfigError, TrainConfig
    from seeclip.generate import sd_pipeline
    from seeclip.generate.image_pool import load_image_pool
    from seeclip.testing import build_tiny_pipeline

    monkeypatch.setattr(sd_pipeline, "load_pipeline", lambda *a, **k: build_tiny_pipeline(0))
    assert main(_image_argv(preset, "--out", str(tmp_path / "p"), "train.sd_image_size=16")) == 0
    pool = load_image_pool(tmp_path / "p")
    assert {Image.open(pool.root / p).size for p in pool.paths} == {(16, 16)}
    with pytest.raises(ConfigError, match="train.sd_image_size must be a multiple of 8"):
        TrainConfig(sd_image_size=20)


def test_a_missing_generator_stops_the_run_before_any_data_or_folder(
    preset, tmp_path, capsys, monkeypatch
):
    from seeclip import runner

    monkeypatch.setattr(runner, "load_run_data", lambda *a, **k: pytest.fail("data was read"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_index.json").write_text("{}")
    for model, why in [(tmp_path / "nowhere", "no such folder"),
                       (tmp_path / "half", "it has no unet/, vae/, text_encoder/")]:  # fmt: skip
        argv = ["train", "--config", str(preset), "--runs-dir", str(tmp_path / "runs"),
                "train.pseudo_unknowns=sd_images", f"train.sd_model={model}"]  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert why in err and "point train.sd_model" in err and err.count("\n") == 1
        assert not (tmp_path / "runs").exists()


def test_no_progress_silences_the_pipeline_loading_bars(capfd):
    from seeclip.generate.sd_pipeline import load_pipeline

    load_pipeline("tiny-glyphs-sd", progress=False)
    assert "Loading" not in capfd.readouterr().err
    load_pipeline("tiny-glyphs-sd")
    assert "Loading pipeline components" in capfd.readouterr().err  # the default keeps them


def _copied_pipeline(tmp_path):
    from seeclip.generate.sd_pipeline import SHIPPED_SD_MODELS

    folder = tmp_path / "sd"
    shutil.copytree(SHIPPED_SD_MODELS["tiny-glyphs-sd"], folder)
    return folder


def test_a_diffusers_folder_of_mismatched_parts_is_refused_before_any_work(
    preset, tmp_path, capsys
):
    """A tokenizer from another text encoder, or a UNet of another width: one line naming the
    part to replace, read from the config files alone (nothing loaded, no pool folder made)."""
    from seeclip.generate.sd_pipeline import locate_pipeline

    assert locate_pipeline(str(_copied_pipeline(tmp_path / "ok")))[1] is None  # intact: accepted
    folder = _copied_pipeline(tmp_path / "tok")
    config = folder / "tokenizer" / "tokenizer_config.json"
    config.write_text(
        config.read_text().replace('"model_max_length": 24', '"model_max_length": 77')
    )
    assert main(_image_argv(preset, "--sd-model", str(folder))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer/" in err and "copy the text encoder's own" in err
    folder = _copied_pipeline(tmp_path / "unet")
    unet = folder / "unet" / "config.json"
    unet.write_text(json.dumps({**json.loads(unet.read_text()), "cross_attention_dim": 768}))
    assert main(_image_argv(preset, "--sd-model", str(folder))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cross-attends at width 768" in err
    assert not list(tmp_path.rglob("manifest.csv"))
