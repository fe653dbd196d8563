"""``seeclip pretrain-clip``: pretrain a tiny CLIP on an embedded world's corpus."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from seeclip.zoo.pretrain import WORLDS, PretrainConfig


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "pretrain-clip",
        help="pretrain a tiny CLIP on an embedded world's corpus (tiny-digits, tiny-glyphs; CPU)",
    )
    p.add_argument(
        "--world",
        choices=sorted(WORLDS),
        default="digits",
        help="digits: tiny-digits (default); glyphs: tiny-glyphs",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (resumes if last.pt)")
    p.add_argument("--config", type=Path, help="YAML file with PretrainConfig keys")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. steps=200 lr=5e-4")
    p.add_argument(
        "--stop-at",
        type=int,
        metavar="STEP",
        help="stop after the checkpoint at STEP (rerun without it to resume to the end); "
        "e.g. to keep an early text tower, as tiny-glyphs-sd's (docs/pseudo_unknowns.md)",
    )
    p.add_argument(
        "--init",
        type=Path,
        metavar="WEIGHTS",
        help="first-stage weights (.safetensors written by pretrain-clip): run only the token "
        "stage from them (needs token_steps=N; docs/tiny_clip.md)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def config_from_args(
    config: Path | None, overrides: Sequence[str], world: str = "digits"
) -> PretrainConfig:
    """The world's default config, then an optional YAML file, then ``key=value`` overrides.

    Unknown keys fail.
    """
    import dataclasses

    import yaml

    from seeclip.config import ConfigError, apply_overrides, from_dict
    from seeclip.zoo.pretrain import default_config

    raw = {k: v for k, v in dataclasses.asdict(default_config(world)).items()}
    if config is not None:
        if not Path(config).is_file():
            raise ConfigError(f"config file {config} does not exist")
        raw.update(yaml.safe_load(Path(config).read_text()) or {})
    return apply_overrides(from_dict(PretrainConfig, raw), overrides)


def run(args: argparse.Namespace) -> int:
    from seeclip.zoo.pretrain import pretrain_clip

    cfg = config_from_args(args.config, args.overrides, args.world)
    parts = ["seeclip", "pretrain-clip", "--world", args.world, "--out", str(args.out)]
    if args.config is not None:
        parts += ["--config", str(args.config)]
    if args.init is not None:
        parts += ["--init", str(args.init)]
    command = " ".join(parts + list(args.overrides))
    card = pretrain_clip(
        cfg,
        args.out,
        progress=not args.no_progress,
        command=command,
        stop_at=args.stop_at,
        init=args.init,
    )
    if "zero_shot" not in card:
        print(f"stopped at step {card['step']}: {args.out / 'last.pt'} (rerun to resume)")
        return 0
    zs = card["zero_shot"]["ensemble"]
    print(json.dumps({"mean": zs["mean"], **zs["per_domain"]}, indent=1))
    print(f"wrote {args.out / (card['name'] + '.safetensors')} and {args.out / 'card.json'}")
    return 0
