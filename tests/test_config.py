import pytest

from seeclip.config import ConfigError, apply_overrides, from_dict
from seeclip.run_config import RunConfig, load_config, save_config


def test_overrides_parse_yaml_scalars_and_nested_keys():
    cfg = apply_overrides(
        RunConfig(),
        [
            "data.target=printed",
            "zeroshot.threshold_quantile=1e-1",
            "seed=3",
            "backbone.pretrained=null",
        ],
    )
    assert cfg.data.target == "printed"
    assert cfg.zeroshot.threshold_quantile == pytest.approx(0.1)
    assert cfg.seed == 3
    assert cfg.backbone.pretrained is None


def test_unknown_key_is_an_error_that_lists_allowed_keys():
    with pytest.raises(
        ConfigError, match=r"unknown config key\(s\) data\.taget; allowed: .*data\.target"
    ):
        from_dict(RunConfig, {"data": {"taget": "x"}})
    with pytest.raises(ConfigError, match="unknown config key 'zeroshot.scor'"):
        apply_overrides(RunConfig(), ["zeroshot.scor=mcm"])
    with pytest.raises(ConfigError, match="not key=value"):
        apply_overrides(RunConfig(), ["seed"])


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="seed: expected int"):
        apply_overrides(RunConfig(), ["seed=abc"])


def test_yaml_round_trip_and_stable_hash(tmp_path):
    cfg = apply_overrides(RunConfig(), ["data.protocol=daml", "zeroshot.score=mcm"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert again.hash() == cfg.hash()
    assert apply_overrides(cfg, ["seed=1"]).hash() != cfg.hash()


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/preset.yaml")


def test_shipped_presets_by_name_and_hash_neutral_keys():
    import hashlib
    import json

    from seeclip.config import apply_overrides, to_dict
    from seeclip.run_config import RunConfig, load_config

    by_name = load_config("digits")
    assert by_name == load_config("configs/digits.yaml")
    with pytest.raises(ConfigError, match="shipped presets: digits, glyphs"):
        load_config("nope")
    # a key added later stays out of the hash at its neutral value: old run folders keep names
    cfg = RunConfig()
    data = to_dict(cfg)
    del data["train"]["sd_strength"]
    del data["train"]["sd_image_size"]
    del data["prompt"]["text_precision"]
    del data["train"]["sd_every"]
    del data["prompt"]["shared_prefix"]
    old = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
    assert cfg.hash() == old
    assert apply_overrides(cfg, ["train.sd_every=0"]).hash() != old
    assert apply_overrides(cfg, ["prompt.shared_prefix=false"]).hash() != old
    assert apply_overrides(cfg, ["train.sd_strength=0.6"]).hash() != old
    assert apply_overrides(cfg, ["prompt.text_precision=bf16"]).hash() != old
    assert apply_overrides(cfg, ["train.sd_image_size=256"]).hash() != old
    with pytest.raises(ConfigError, match="sd_strength must be in"):
        apply_overrides(cfg, ["train.sd_strength=0"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.alpha=nan", "loss.alpha: expected a finite number, got nan"),
        ("train.lr=.inf", "train.lr: expected a finite number, got inf"),
        ("train.lr=-.inf", "train.lr: expected a finite number, got -inf"),
        ("train.epochs=true", "train.epochs: expected int, got True"),
        ("diffusion.sigma=false", "diffusion.sigma: expected float, got False"),
    ],
)
def test_non_finite_and_boolean_numbers_are_refused_with_the_key(override, message):
    from seeclip.run_config import RunConfig

    with pytest.raises(ConfigError, match=message):
        apply_overrides(RunConfig(), [override])
