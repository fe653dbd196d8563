"""Typed configs: the machinery (frozen dataclasses from YAML, ``key=value`` overrides) and the
sections every run has (data, backbone, training).

A method's own section lives in its module (``methods/zeroshot.py``: ``ZeroShotConfig``,
``methods/prompt_model.py``: ``PromptConfig``, ``methods/seeclip.py``: ``LossConfig``); the
whole experiment config, :class:`seeclip.run_config.RunConfig`, assembles them at the run
layer. Unknown keys are an error that lists the allowed ones, so a typo never silently falls
back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not match the config dataclasses."""


def check_choices(cfg: Any, section: str) -> None:
    """Every ``Literal`` field of dataclass ``cfg`` holds one of its choices."""
    for name, tp in typing.get_type_hints(type(cfg)).items():
        if typing.get_origin(tp) is Literal and getattr(cfg, name) not in get_args(tp):
            choices = ", ".join(map(str, get_args(tp)))
            raise ConfigError(
                f"{section}.{name}: expected one of {choices}, got {getattr(cfg, name)!r}"
            )


def check_min(name: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value}")


def check_unit(name: str, value: float) -> None:
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
class TrainConfig:
    epochs: int = 20  # passes over the source training images
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 1e-5  # AdamW weight decay
    batch_size: int = 16  # images per step, pseudo-unknowns included
    grad_clip: float = 1.0  # max gradient norm
    # label-C samples (`seeclip list pseudo`): sd_online (the paper's generator, following the
    # model's learned queries) | sd_images (its offline pool, fixed k-means queries) | diffusion
    # (feature space) | mixup | pool | images (stored pools) | none
    pseudo_unknowns: Literal[
        "none", "mixup", "pool", "diffusion", "images", "sd_images", "sd_online"
    ] = "mixup"
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
    # sd_online: how often the generator draws: 1 = every step (the paper's), N = every N steps
    # (steps between reuse the last set), 0 = once per epoch (diffusion.pool_per_domain a domain)
    sd_every: int = 1
    # model selection (seeclip.selection): last | val_acc (source-val closed-set accuracy) |
    # val_h (H of source-val knowns and pseudo-unknowns made from source-val images)
    selection: Literal["last", "val_acc", "val_h"] = "last"

    def __post_init__(self) -> None:
        for key in ("pseudo_pool", "val_pseudo_pool", "sd_model"):
            object.__setattr__(self, key, existing_path(getattr(self, key)))
        check_choices(self, "train")
        check_min("train.epochs", self.epochs, 1)
        check_min("train.batch_size", self.batch_size, 1)
        for name in ("lr", "grad_clip"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        check_unit("train.pseudo_fraction", self.pseudo_fraction)
        check_min("train.sd_every", self.sd_every, 0)
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
    if tp in (int, float) and isinstance(value, bool):  # bool is an int to Python, not here
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if tp in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            value = tp(value)
        except ValueError:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    if tp is float and isinstance(value, int | float):
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
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


def parse_variants(variants: Any, where: str | Path) -> dict[str, tuple[str, ...]]:
    """A file's ``variants:`` mapping, label -> [key=value, ...] (sweeps and selection grids)."""
    if not isinstance(variants, Mapping) or not variants:
        raise ConfigError(f"{where}: variants is a mapping label -> [key=value, ...]")
    out = {}
    for label, overrides in variants.items():
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise ConfigError(f"{where}: variant {label!r} must be a list of key=value strings")
        out[str(label)] = tuple(overrides)
    return out
