"""``seeclip demo``: prepare the embedded benchmark and evaluate zero-shot CLIP on every target."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="prepare the embedded benchmark and evaluate zero-shot CLIP")
    p.add_argument("--backbone", default="tiny-digits")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from seeclip.cli.prepare import prepare_and_print
    from seeclip.cli.run import evaluate_all, expand_configs
    from seeclip.config import BackboneConfig, DataConfig, RunConfig

    progress = not args.no_progress
    print("seeclip demo: zero-shot CLIP on the embedded `digits` OSDG benchmark, every target.")
    prepare_and_print("digits", progress=progress)
    cfg = RunConfig(
        data=DataConfig(benchmark="digits", protocol="full"),
        backbone=BackboneConfig(name=args.backbone),
        method="zeroshot",
    )
    return evaluate_all(expand_configs(cfg, None, None), runs_dir=args.runs_dir, progress=progress)
