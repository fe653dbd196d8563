"""Every shipped preset parses into the typed config and names registered things."""

from pathlib import Path

import pytest

from seeclip.datasets import BENCHMARKS, get_benchmark
from seeclip.methods.registry import METHODS
from seeclip.pseudo import PSEUDO_UNKNOWNS
from seeclip.run_config import load_config

PRESETS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_presets_exist_for_every_real_benchmark():
    names = {p.stem for p in PRESETS}
    assert {"pacs", "vlcs", "office_home", "mini_domainnet", "multi_dataset"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_is_valid(path):
    cfg = load_config(path)
    assert cfg.data.benchmark in BENCHMARKS
    assert cfg.method in METHODS
    assert cfg.train.pseudo_unknowns in PSEUDO_UNKNOWNS
    spec = get_benchmark(cfg.data.benchmark)
    assert cfg.data.protocol in spec.protocols
    assert cfg.train.batch_size >= len(spec.sources_for(spec.targets[0]))


REAL = ("pacs", "vlcs", "office_home", "mini_domainnet", "multi_dataset")


@pytest.mark.parametrize("name", REAL)
def test_real_presets_run_the_papers_online_generator_with_sd15(name):
    cfg = load_config(name)
    assert (cfg.method, cfg.train.pseudo_unknowns, cfg.train.sd_every) == (
        "seeclip",
        "sd_online",
        1,
    )
    assert cfg.train.sd_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert cfg.train.sd_prompt == "a {domain} of an unknown class"
    d = cfg.diffusion
    assert (d.sigma, d.guidance, d.sample_steps) == (0.2, 15.0, 20)


def test_without_sd_weights_a_real_preset_stops_before_any_work(tmp_path, monkeypatch, capsys):
    """Real CLIP weights and the images are there, SD-1.5 is not: one line naming the option
    for a local diffusers folder and the lighter alternative; no run folder, nothing fetched."""
    from seeclip.cli import main

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = tmp_path / "ViT-B-16.safetensors"
    weights.write_bytes(b"never read: the check comes first")
    runs = tmp_path / "runs"
    argv = ["train", "--config", "pacs", "--data-root", str(tmp_path), "--target", "sketch"]
    argv += ["--runs-dir", str(runs), f"backbone.pretrained={weights}", "--no-progress"]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "train.sd_model" in err[0] and "train.pseudo_unknowns=diffusion" in err[0]
    assert not runs.exists() or not any(runs.rglob("config.yaml"))


@pytest.mark.parametrize("method", ["zeroshot", "coop", "cocoop"])
def test_baselines_on_a_real_preset_need_no_sd_weights(method, tmp_path, monkeypatch):
    """The presets' generator setting concerns the methods that train on pseudo-unknowns only:
    the baselines of the same sweep neither need SD-1.5 nor are refused for sd_online."""
    from seeclip.wiring import check_inputs

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))
    weights = tmp_path / "ViT-B-16.safetensors"
    weights.write_bytes(b"never read")
    over = [f"data.data_root={tmp_path}", f"backbone.pretrained={weights}", f"method={method}"]
    check_inputs(load_config("pacs", over))  # no error
    with pytest.raises(Exception, match="train.sd_model"):
        check_inputs(load_config("pacs", over[:2]))  # seeclip itself needs the weights
