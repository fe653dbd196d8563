"""``seeclip pretrain-clip``: pretrain the tiny-digits CLIP on the embedded digits corpus."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from seeclip.pretrain import PretrainConfig


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "pretrain-clip", help="pretrain the tiny-digits CLIP on the embedded digits corpus (CPU)"
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (resumes if last.pt)")
    p.add_argument("--config", type=Path, help="YAML file with PretrainConfig keys")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. steps=200 lr=5e-4")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def config_from_args(config: Path | None, overrides: Sequence[str]) -> PretrainConfig:
    """PretrainConfig from an optional YAML file and ``key=value`` overrides (unknown keys fail)."""
    import yaml

    from seeclip.config import ConfigError, apply_overrides, from_dict

    raw = {}
    if config is not None:
        if not Path(config).is_file():
            raise ConfigError(f"config file {config} does not exist")
        raw = yaml.safe_load(Path(config).read_text()) or {}
    return apply_overrides(from_dict(PretrainConfig, raw), overrides)


def run(args: argparse.Namespace) -> int:
    from seeclip.pretrain import pretrain_clip

    cfg = config_from_args(args.config, args.overrides)
    parts = ["seeclip", "pretrain-clip", "--out", str(args.out)]
    if args.config is not None:
        parts += ["--config", str(args.config)]
    command = " ".join(parts + list(args.overrides))
    card = pretrain_clip(cfg, args.out, progress=not args.no_progress, command=command)
    zs = card["zero_shot"]["ensemble"]
    print(json.dumps({"mean": zs["mean"], **zs["per_domain"]}, indent=1))
    print(f"wrote {args.out / 'tiny-digits.safetensors'} and {args.out / 'card.json'}")
    return 0
