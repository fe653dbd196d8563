"""`seeclip generate` end to end on a reduced digits benchmark with tiny models (no download)."""

import pytest

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
    assert "SD weights not found locally" in err and "--sd-model" in err


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
