"""Typed experiment configs: frozen dataclasses, YAML presets, ``key=value`` overrides.

Only the CLI and the runner see a whole :class:`RunConfig`; every other module takes explicit
arguments. Unknown keys are an error that lists the allowed ones, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml

from seeclip.generate.feature_config import FeatureDiffusionConfig
from seeclip.records import run_folder, run_name

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not match the config dataclasses."""


def _check_choices(cfg: Any, section: str) -> None:
    """Every ``Literal`` field of dataclass ``cfg`` holds one of its choices."""
    for name, tp in typing.get_type_hints(type(cfg)).items():
        if typing.get_origin(tp) is Literal and getattr(cfg, name) not in get_args(tp):
            choices = ", ".join(map(str, get_args(tp)))
            raise ConfigError(
                f"{section}.{name}: expected one of {choices}, got {getattr(cfg, name)!r}"
            )


def _check_min(name: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value}")


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), got {value}")


def absolute_path(value: str | None) -> str | None:
    """``value`` as an absolute, normalised path (``~`` expanded); None stays None."""
    return None if value is None else os.path.abspath(os.path.expanduser(str(value)))


def existing_path(value: str | None) -> str | None:
    """A name that is a file or folder here becomes absolute; a tag or hub name is kept."""
    if value is None or not os.path.exists(os.path.expanduser(str(value))):
        return value
    return absolute_path(value)


@dataclass(frozen=True)
class DataConfig:
    benchmark: str = "digits"  # a name from `seeclip list` (benchmarks)
    protocol: str = "full"  # split family: full | daml (| medic where defined)
    target: str | None = None  # held-out target domain; None = each target in turn
    data_root: str | None = None  # dataset folder; None = the embedded benchmark's own folder
    classes_file: str | None = None  # YAML naming known/unknown classes (benchmark `folder` only)
    val_fraction: float = 0.1  # held-out share of each source domain, for selection/thresholds
    val_seed: int = 0  # which images form that held-out share

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        # absolute, so that a run folder works from anywhere and one dataset has one hash
        for key in ("data_root", "classes_file"):
            object.__setattr__(self, key, absolute_path(getattr(self, key)))


@dataclass(frozen=True)
class BackboneConfig:
    name: str = "tiny-vit"  # shipped name, open_clip architecture, or hf-hub:org/repo
    pretrained: str | None = None  # open_clip tag or checkpoint path; None = random weights

    def __post_init__(self) -> None:
        object.__setattr__(self, "pretrained", existing_path(self.pretrained))


@dataclass(frozen=True)
class ZeroShotConfig:
    score: Literal["msp", "mcm"] = "msp"  # msp (max softmax prob.) | mcm (max concept matching)
    mcm_temperature: float = 1.0  # softmax temperature on cosines for mcm (Ming et al. 2022)
    threshold_quantile: float = 0.05  # share of source-val known images allowed to be rejected
    template: str | None = None  # prompt template with one {}; None = the benchmark's

    def __post_init__(self) -> None:
        _check_choices(self, "zeroshot")
        _check_unit("zeroshot.threshold_quantile", self.threshold_quantile)
        if self.mcm_temperature <= 0:
            raise ConfigError(f"zeroshot.mcm_temperature must be > 0, got {self.mcm_temperature}")
        if self.template is not None and self.template.count("{}") != 1:
            raise ConfigError(f"zeroshot.template needs exactly one {{}}, got {self.template!r}")


@dataclass(frozen=True)
class PromptConfig:
    n_ctx: int = 4  # learned context vectors per prompt (CoOp, CoCoOp)
    k: int = 4  # SeeCLIP semantic tokens (queries over patch tokens); paper's best of 2..8
    m: int = 4  # learnable vectors of the "unknown" prompt
    semantic_tokens: bool = True  # False = ablation: plain learned context instead
    threshold_quantile: float = 0.05  # methods without an unknown prompt: MSP threshold on val
    # the frozen text tower's arithmetic while training prompts: fp32 | bf16 (torch.autocast;
    # error and speed in docs/performance.md)
    text_precision: Literal["fp32", "bf16"] = "fp32"

    def __post_init__(self) -> None:
        _check_choices(self, "prompt")
        for name in ("n_ctx", "k", "m"):
            _check_min(f"prompt.{name}", getattr(self, name), 1)
        _check_unit("prompt.threshold_quantile", self.threshold_quantile)


@dataclass(frozen=True)
class LossConfig:
    alpha: float = 1.0  # weight of L_rep (repulsion of the unknown prompt)
    beta: float = 0.5  # weight of L_coh (cohesion of unknown and known prompts)
    gamma: float = 0.01  # weight of L_reg (L1 on F_key)
    margin: float = 0.5  # L_rep hinge margin on cos(t_u, t_y)
    # L_reg over the F_key entries: mean (gamma independent of the widths; gamma L_reg ~5e-4 on
    # tiny-digits) or sum (the paper's L1 norm as written; at gamma 0.01 it dominates L_ali)
    reg_reduction: Literal["mean", "sum"] = "mean"

    def __post_init__(self) -> None:
        _check_choices(self, "loss")
        for name in ("alpha", "beta", "gamma"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20  # passes over the source training images
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 1e-5  # AdamW weight decay
    batch_size: int = 16  # images per step, pseudo-unknowns included
    grad_clip: float = 1.0  # max gradient norm
    # label-C samples: none | mixup | pool | diffusion | images | sd_images (`seeclip list pseudo`)
    pseudo_unknowns: Literal["none", "mixup", "pool", "diffusion", "images", "sd_images"] = "mixup"
    pseudo_fraction: float = 0.1  # share of each source domain's slots given to pseudo-unknowns
    pseudo_pool: str | None = None  # images: a manifest.csv; pool: a feature pool folder
    # val_h with a stored pool (images | pool): one made from source-val images only (--from val)
    val_pseudo_pool: str | None = None
    # sd_images: the text-to-image model (shipped name, diffusers folder or cached repo id) and
    # the positive prompt, {domain} = the source domain (the paper's "a {domain} of an unknown
    # object"); diffusion.sigma, .guidance, .k and .pool_per_domain apply too
    sd_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    sd_prompt: str = "a {domain} of an unknown object"
    # sd_images: how semantic tokens enter the text conditioning: random (a seeded
    # semi-orthogonal map) | text_inverse (pseudo-inverse of the backbone's text projection;
    # the model's text encoder must be the backbone's text tower, as tiny-glyphs-sd's is)
    sd_projection: Literal["random", "text_inverse"] = "random"
    # sd_images: 1.0 = text-to-image from noise (the paper's); below 1 = SDEdit, each sample
    # starts from its source image noised to this share of the schedule (near misses)
    sd_strength: float = 1.0
    # sd_images: side of the generated images in px (a multiple of 8); None = the model's own
    # (512 for SD-1.5). Lower is much cheaper on a CPU; the CLIP resizes them anyway
    sd_image_size: int | None = None
    # model selection (seeclip.selection): last | val_acc (source-val closed-set accuracy) |
    # val_h (H of source-val knowns and pseudo-unknowns made from source-val images)
    selection: Literal["last", "val_acc", "val_h"] = "last"

    def __post_init__(self) -> None:
        for key in ("pseudo_pool", "val_pseudo_pool", "sd_model"):
            object.__setattr__(self, key, existing_path(getattr(self, key)))
        _check_choices(self, "train")
        _check_min("train.epochs", self.epochs, 1)
        _check_min("train.batch_size", self.batch_size, 1)
        for name in ("lr", "grad_clip"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _check_unit("train.pseudo_fraction", self.pseudo_fraction)
        if self.sd_image_size is not None and (self.sd_image_size < 8 or self.sd_image_size % 8):
            raise ConfigError(
                f"train.sd_image_size must be a multiple of 8 (or null), got {self.sd_image_size}"
            )
        if not 0.0 < self.sd_strength <= 1.0:
            raise ConfigError(f"train.sd_strength must be in (0, 1], got {self.sd_strength}")
        if "{domain}" not in self.sd_prompt:
            raise ConfigError(f"train.sd_prompt needs a {{domain}}, got {self.sd_prompt!r}")
        if self.pseudo_unknowns in ("images", "pool") and not self.pseudo_pool:
            raise ConfigError(
                f"train.pseudo_unknowns={self.pseudo_unknowns} needs train.pseudo_pool=PATH "
                f"(a manifest.csv or pool folder written by `seeclip generate`)"
            )


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
        _check_min("encode_batch_size", self.encode_batch_size, 1)

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
    ("prompt", "text_precision"): "fp32",
}


def _hashed(cfg: RunConfig) -> dict[str, Any]:
    data = to_dict(cfg)
    for (section, key), neutral in HASH_NEUTRAL.items():
        if data[section].get(key) == neutral:
            del data[section][key]
    return data


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: Mapping[str, Any], *, where: str = "") -> T:
    """Build dataclass ``cls`` from a nested mapping; unknown keys raise :class:`ConfigError`."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"allowed: {', '.join(prefix + k for k in fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        sub = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], value, sub)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where=where)
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{where}: expected one of {', '.join(map(str, choices))}, got {value!r}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin in (tuple, Sequence):
        return tuple(value)
    if tp in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            value = tp(value)
        except ValueError:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _parse_scalar(text: str) -> Any:
    """Parse the right-hand side of ``key=value`` with YAML rules (1e-3, true, null, [a, b])."""
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    """Return ``cfg`` with dotted ``key=value`` overrides applied, e.g. ``data.target=printed``."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. data.target=printed)")
        key, text = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown config key {key!r}: {part!r} is not a section")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"unknown config key {key!r}; allowed here: {', '.join(node)}")
        node[parts[-1]] = _parse_scalar(text)
    return from_dict(type(cfg), data)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML preset (missing keys keep their defaults) and apply overrides."""
    path = preset_path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    return apply_overrides(from_dict(RunConfig, raw, where=""), overrides)


PRESETS = Path(__file__).parent / "presets"  # shipped presets (the repo's configs/ links here)


def preset_path(name: str | Path) -> Path:
    """A config file, or the name of a shipped preset (``digits`` -> presets/digits.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = PRESETS / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") or str(path.parent) == "configs":
        if shipped.is_file():
            return shipped
    names = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
    raise ConfigError(f"config file {path} does not exist (shipped presets: {names})")


def save_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
