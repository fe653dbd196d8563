"""``seeclip pretrain-diffusion``: train a tiny text-to-image latent diffusion model (CPU).

By default a world's own captioned corpus and shipped CLIP are used (``--world digits`` or
``glyphs``); pass ``--corpus`` and ``--clip`` to train on another corpus folder or with other CLIP
weights (a ``.safetensors`` file or a ``pretrain-clip`` checkpoint ``last.pt``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from seeclip.zoo.pretrain_diffusion import DiffusionPretrainConfig

WORLDS = ("digits", "glyphs")  # the choices of --world; each has an entry in _world_inputs


@dataclass(frozen=True)
class WorldInputs:
    """What a world provides: its corpus (generated on first use) and its CLIP builder."""

    corpus: Callable[[bool], Path]  # progress -> the corpus folder
    clip: Callable[[Path | None], tuple[object, object]]  # weights (None: shipped) -> (model, tok)


def _world_inputs(world: str) -> WorldInputs:
    """The default corpus and CLIP of ``world``: the ones ``pretrain-clip --world`` uses."""
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; choose one of {', '.join(WORLDS)}")
    from seeclip.zoo.pretrain import WORLDS as CLIP_WORLDS
    from seeclip.zoo.pretrain import checkpoint_weights, corpus_for, default_config
    from seeclip.zoo.tiny_clip import TINY_MODELS, build_tiny_clip

    spec = CLIP_WORLDS[world]
    cfg = default_config(world)

    def corpus(progress: bool) -> Path:  # the corpus that pretrain-clip trains on
        return corpus_for(cfg, progress)

    def clip(weights: Path | None) -> tuple[object, object]:
        if weights is not None and Path(weights).suffix == ".pt":  # a pretrain-clip checkpoint
            model, _, tokenizer = build_tiny_clip(spec.model)
            model.load_state_dict(checkpoint_weights(weights))
            return model.eval(), tokenizer
        model, _, tokenizer = build_tiny_clip(
            spec.model, weights or TINY_MODELS[spec.model].weights
        )
        return model, tokenizer

    return WorldInputs(corpus=corpus, clip=clip)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "pretrain-diffusion",
        help="train a tiny text-to-image latent diffusion model (a diffusers SD folder) on CPU",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (resumes if last.pt)")
    p.add_argument(
        "--world",
        choices=WORLDS,
        default="digits",
        help="default corpus and CLIP (default: digits)",
    )
    p.add_argument("--corpus", type=Path, help="corpus folder written by a generate_corpus")
    p.add_argument(
        "--clip",
        type=Path,
        help="weights of the world's CLIP: .safetensors, or a pretrain-clip checkpoint last.pt "
        "(e.g. kept with `pretrain-clip --stop-at`)",
    )
    p.add_argument("--config", type=Path, help="YAML file with DiffusionPretrainConfig keys")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. steps=200 lr=5e-4")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def config_from_args(config: Path | None, overrides: Sequence[str]) -> DiffusionPretrainConfig:
    """The config from an optional YAML file and ``key=value`` overrides (unknown keys fail)."""
    import yaml

    from seeclip.config import ConfigError, apply_overrides, from_dict

    raw = {}
    if config is not None:
        if not Path(config).is_file():
            raise ConfigError(f"config file {config} does not exist")
        raw = yaml.safe_load(Path(config).read_text()) or {}
    return apply_overrides(from_dict(DiffusionPretrainConfig, raw), overrides)


def run(args: argparse.Namespace) -> int:
    from seeclip.zoo.pretrain_diffusion import pretrain_diffusion

    cfg = config_from_args(args.config, args.overrides)
    inputs = _world_inputs(args.world)
    if args.clip is not None and not args.clip.is_file():
        raise FileNotFoundError(f"CLIP weights {args.clip} do not exist")
    if args.corpus is not None and not (args.corpus / "images.npy").is_file():
        raise FileNotFoundError(f"{args.corpus} is not a corpus folder (no images.npy)")
    corpus = args.corpus or inputs.corpus(not args.no_progress)
    model, tokenizer = inputs.clip(args.clip)
    parts = ["seeclip", "pretrain-diffusion", "--out", str(args.out), "--world", args.world]
    for flag, value in (
        ("--corpus", args.corpus),
        ("--clip", args.clip),
        ("--config", args.config),
    ):
        if value is not None:
            parts += [flag, str(value)]
    command = " ".join(parts + list(args.overrides))
    card = pretrain_diffusion(
        cfg, corpus, model, tokenizer, args.out, progress=not args.no_progress, command=command
    )
    print(
        f"vae: {card['vae']['reconstruction_psnr_db']} dB PSNR; unet loss "
        f"{card['unet']['loss_curve'][0]} -> {card['unet']['loss_curve'][-1]}"
    )
    print(f"wrote {args.out / 'pipeline'}, {args.out / 'samples.png'} and {args.out / 'card.json'}")
    return 0
