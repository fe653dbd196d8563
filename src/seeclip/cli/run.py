"""``seeclip eval`` and ``seeclip train``: fit and evaluate methods; ``eval --run`` re-evaluates."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterable, Sequence

from seeclip.cli.args import positive_int
from seeclip.config import ConfigError, apply_overrides
from seeclip.run_config import RunConfig, load_config

HELP = {
    "eval": "fit (if needed) and evaluate a method on target domain(s); --run re-evaluates",
    "train": "train a method from a preset on cached features, then evaluate it",
}


def add_parser(sub) -> None:
    for command in ("eval", "train"):
        _add(sub, command)


def _add(sub, command: str) -> None:
    p = sub.add_parser(command, help=HELP[command])
    p.add_argument(
        "--config", required=command == "train", help="YAML preset, e.g. configs/digits.yaml"
    )
    if command == "eval":
        p.add_argument("--run", help="a finished run folder to evaluate again from its checkpoint")
    p.add_argument("--benchmark")
    p.add_argument("--protocol", help="split family: full | daml")
    p.add_argument("--target", help="target domain, or `all` (default) for each in turn")
    p.add_argument("--method")
    p.add_argument("--backbone", help="tiny-vit, an open_clip architecture, or hf-hub:org/repo")
    p.add_argument("--pretrained", help="open_clip pretrained tag, or a local checkpoint path")
    p.add_argument("--data-root")
    p.add_argument("--classes", help="YAML naming known/unknown classes (benchmark `folder`)")
    p.add_argument("--seed", type=int, nargs="+", help="one or more seeds")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument(
        "--cache-dir",
        help="root of the feature cache and pseudo-unknown pools (default: $SEECLIP_HOME)",
    )
    add_verify_cache(p)
    add_device(p)
    p.add_argument("--force", action="store_true", help="recompute a run from scratch")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an unfinished run from its last checkpoint (what happens anyway when "
        "its folder holds train_state.pt; --force starts afresh instead)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        metavar="N",
        help="write the training state every N epochs (default 1; 0: never)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (1 suits tiny models)")
    if command == "train":
        p.add_argument(
            "--validate",
            choices=("lodo",),
            help="also validate on the sources only: leave-one-source-domain-out folds with "
            "held-out known classes; records fold H/AUROC/OSCR and a threshold calibrated on "
            "them (rule lodo_threshold)",
        )
        p.add_argument(
            "--held-out",
            type=float,
            default=0.3,
            help="lodo: share of known classes held out per fold (default 0.3)",
        )
        p.add_argument(
            "--class-splits",
            type=int,
            default=2,
            help="lodo: class splits per pseudo-target domain (default 2)",
        )
        p.add_argument(
            "--grid",
            help="lodo: YAML of labelled variants (variants: {label: [key=value, ...]}); the one "
            "with the best mean fold H, and its operating rule, is trained and evaluated as "
            "<label>:lodo",
        )
    p.add_argument(
        "overrides", nargs="*", help="config overrides key=value, e.g. zeroshot.score=mcm"
    )
    p.set_defaults(func=run)


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="auto",
        help="where the image encoder and the prompt model run: auto (default: this process's "
        "GPU if torch sees one, else the CPU), cpu, cuda or cuda:N; under torchrun each rank "
        "takes cuda:LOCAL_RANK and the processes talk over NCCL (gloo on the CPU)",
    )


def add_verify_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verify-cache",
        action="store_true",
        help="also compare image contents with the feature cache's (reads every image; default: "
        "trust size and mtime)",
    )


def use_verify_cache(args: argparse.Namespace) -> None:
    """``--verify-cache`` as an environment variable, so every process of a run sees it."""
    if args.verify_cache:
        from seeclip.cache import VERIFY_ENV

        os.environ[VERIFY_ENV] = "1"


def expand_configs(
    cfg: RunConfig, targets: Sequence[str] | None, seeds: Sequence[int] | None
) -> list[RunConfig]:
    """One config per (seed, target): ``targets=None`` means every target of the benchmark."""
    if targets is None:
        from seeclip.datasets import get_benchmark

        spec = get_benchmark(
            cfg.data.benchmark, classes_file=cfg.data.classes_file, data_root=cfg.data.data_root
        )
        targets = list(spec.targets)
    return [
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, target=t), seed=s)
        for s in (seeds or [cfg.seed])
        for t in targets
    ]


def configs_from_args(args: argparse.Namespace) -> list[RunConfig]:
    cfg = load_config(args.config) if args.config else RunConfig()
    flags = {
        "data.benchmark": args.benchmark,
        "data.protocol": args.protocol,
        "data.data_root": args.data_root,
        "data.classes_file": args.classes,
        "method": args.method,
        "backbone.name": args.backbone,
        "backbone.pretrained": args.pretrained,
    }
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)
    cfg = apply_overrides(cfg, overrides)
    if not args.config and args.backbone is None and args.pretrained is None:
        from seeclip.run_data import WORLD_BACKBONES

        named = any(o.startswith("backbone.") for o in args.overrides)
        if not named and cfg.data.benchmark in WORLD_BACKBONES:  # not random tiny-vit weights
            cfg = apply_overrides(cfg, [f"backbone.name={WORLD_BACKBONES[cfg.data.benchmark]}"])
    if args.target not in (None, "all"):
        targets = [args.target]
    elif args.target is None and cfg.data.target:
        targets = [cfg.data.target]
    else:
        targets = None
    return expand_configs(cfg, targets, args.seed)


def evaluate_all(
    configs: Iterable[RunConfig],
    *,
    runs_dir: str = "runs",
    cache_dir: str | None = None,
    force: bool = False,
    progress: bool = True,
    validate=None,
    grid: dict | None = None,
    checkpoint_every: int = 1,
) -> int:
    """Run every config (:func:`seeclip.validation.evaluate`), print a line per run and the
    table of this invocation's runs.

    ``validate``: :class:`seeclip.validation.LodoSettings` to validate each run on its sources;
    with ``grid`` (label -> overrides) the setting itself is chosen by those folds.
    """
    from seeclip import distributed
    from seeclip.validation import evaluate

    def one(cfg: RunConfig):
        result, validation = evaluate(
            cfg,
            runs_dir=runs_dir,
            cache_dir=cache_dir,
            force=force,
            progress=progress,
            checkpoint_every=checkpoint_every,
            validate=validate,
            grid=grid,
        )
        if grid is not None:
            _print_selection(cfg, result)
        elif validation is not None:
            _print_validation(cfg, result, validation)
        return result

    if not distributed.is_main():  # torchrun: rank 0 reports
        for cfg in configs:
            one(cfg)
        return 0
    return print_results(one(cfg) for cfg in configs)


def _print_selection(cfg: RunConfig, result) -> None:
    sel = result.record["setting_selection"]
    scores = ", ".join(
        f"{lab} {_num(g['h_score'])}/{_num(g['h_score_lodo_threshold'])}"
        for lab, g in sel["grid"].items()
    )
    print(
        f"{cfg.data.target:<14} seed {cfg.seed}: fold H (own rule/lodo_threshold): {scores}; "
        f"chosen {sel['chosen']} with rule {sel['operating_rule']} -> target H "
        f"{_num(result.record['validated']['h_score'])}"
    )


def _print_validation(cfg: RunConfig, result, validation: dict) -> None:
    from seeclip.validation import RULE

    mean, std = validation["mean"], validation["std"]
    print(
        f"{cfg.data.target:<14} seed {cfg.seed}: LODO on the sources, "
        f"{len(validation['folds'])} folds: H {_num(mean['h_score'])} ± {_num(std['h_score'])}"
        f"  AUROC {_num(mean['auroc'])}  OSCR {_num(mean['oscr'])}; {RULE} threshold "
        f"{validation['threshold']:.4f} -> target H {_num(result.record['rules'][RULE]['h_score'])}"
    )


def print_results(results) -> int:
    from seeclip.report import summarize

    records = []
    for result in results:
        r = result.record
        tag = " (finished earlier, reused)" if result.cached else ""
        print(
            f"{r['target']:<14} seed {r['seed']}: Acc {r['acc_known']:.3f}  "
            f"H {_num(r['h_score'])}  AUROC {_num(r['auroc'])}  -> {result.run_dir}{tag}"
        )
        if r.get("pretrained") is None:
            print(f"  note: backbone {r['backbone']} has RANDOM weights (no --pretrained given)")
        records.append(r)
    print()
    print(summarize(records))
    return 0


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def run(args: argparse.Namespace) -> int:
    from seeclip.runner import eval_run

    use_verify_cache(args)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    if getattr(args, "run", None):
        return print_results([eval_run(args.run, cache_dir=args.cache_dir, progress=progress)])
    validate, grid = None, None
    if getattr(args, "validate", None) == "lodo":
        from seeclip.validation import LodoSettings, load_grid

        validate = LodoSettings(held_out=args.held_out, class_splits=args.class_splits)
        grid = load_grid(args.grid) if args.grid else None
    elif getattr(args, "grid", None):
        raise ConfigError("--grid chooses a setting by validation folds: add --validate lodo")
    if args.resume and args.force:
        raise ConfigError("--resume continues a run and --force restarts it: pass one")
    if args.checkpoint_every < 0:
        raise ConfigError("--checkpoint-every must be >= 0 (0: no checkpoints)")
    return evaluate_all(
        configs_from_args(args),
        runs_dir=args.runs_dir,
        cache_dir=args.cache_dir,
        force=args.force,
        progress=progress,
        validate=validate,
        grid=grid,
        checkpoint_every=args.checkpoint_every,
    )
