"""The whole experiment config: every section of a run, its hash, and its YAML presets.

Only the CLI and the experiment layer (:mod:`seeclip.run_data`, :mod:`seeclip.wiring`,
:mod:`seeclip.runner`, :mod:`seeclip.validation`, sweeps) see a :class:`RunConfig`; below them
every module takes explicit arguments or its own section.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from seeclip.config import (
    BackboneConfig,
    DataConfig,
    TrainConfig,
    apply_overrides,
    check_min,
    from_dict,
    preset_path,
    to_dict,
)
from seeclip.generate.feature_config import FeatureDiffusionConfig
from seeclip.methods.prompt_model import PromptConfig
from seeclip.methods.seeclip import LossConfig
from seeclip.methods.zeroshot import ZeroShotConfig
from seeclip.records import run_folder, run_name

__all__ = ["HASH_NEUTRAL", "RunConfig", "load_config", "save_config"]


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: str = "zeroshot"  # a name from `seeclip list` (methods)
    label: str | None = None  # name shown in tables (e.g. an ablation); None = method
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    diffusion: FeatureDiffusionConfig = field(default_factory=FeatureDiffusionConfig)
    seed: int = 0  # seeds everything random in the run
    encode_batch_size: int = 64  # image-encoder batch size when the feature cache is built

    def __post_init__(self) -> None:
        check_min("encode_batch_size", self.encode_batch_size, 1)

    def hash(self) -> str:
        """A short stable hash of every field: the run folder's name."""
        blob = json.dumps(_hashed(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def setting_hash(self) -> str:
        """The hash of every field but the seed and the target: what seeds of one row share."""
        data = _hashed(self)
        data["seed"] = None
        data["data"]["target"] = None
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]

    def run_name(self) -> str:
        d = self.data
        return run_name(d.benchmark, d.protocol, d.target, self.label or self.method)

    def run_dir(self, runs_dir: str | Path) -> Path:
        """This run's folder under ``runs_dir`` (:func:`seeclip.records.run_folder`)."""
        return run_folder(runs_dir, self.run_name(), self.hash())


# Keys added after runs existed: at these values a config is the experiment it was before the
# key existed, so they stay out of the hashes and earlier run folders keep their names.
HASH_NEUTRAL = {
    ("train", "sd_strength"): 1.0,
    ("train", "sd_image_size"): None,
    ("train", "sd_every"): 1,
    ("prompt", "text_precision"): "fp32",
    ("prompt", "shared_prefix"): True,  # exact: the same experiment either way
}


def _hashed(cfg: RunConfig) -> dict[str, Any]:
    data = to_dict(cfg)
    for (section, key), neutral in HASH_NEUTRAL.items():
        if data[section].get(key) == neutral:
            del data[section][key]
    return data


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML preset (missing keys keep their defaults) and apply overrides."""
    path = preset_path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    return apply_overrides(from_dict(RunConfig, raw, where=""), overrides)


def save_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
