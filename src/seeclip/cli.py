"""The ``seeclip`` command line: list, prepare, eval, train, report, generate, pretrain-clip."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from seeclip.config import ConfigError, RunConfig, apply_overrides, load_config
from seeclip.hub import WeightsUnavailableError


def _cmd_list(args: argparse.Namespace) -> int:
    from seeclip.backbone import list_backbones
    from seeclip.datasets import BENCHMARKS, describe_benchmark
    from seeclip.methods import METHODS

    what = args.what
    if what in (None, "benchmarks"):
        print("Benchmarks (seeclip eval --benchmark NAME --protocol P --target T):")
        for name in BENCHMARKS:
            print("  " + describe_benchmark(name).replace("\n", "\n    "))
    if what in (None, "methods"):
        print("Methods (--method NAME):")
        for name, factory in METHODS.items():
            doc = (factory.__doc__ or "").strip().splitlines()[0]
            print(f"  {name:<14} {doc}")
    if what in (None, "backbones"):
        print("Backbones (--backbone NAME [--pretrained TAG|PATH]):")
        for name, desc in list_backbones():
            print(f"  {name:<14} {desc}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from seeclip.runner import prepare_benchmark

    manifest = prepare_benchmark(
        args.benchmark,
        args.data_root,
        classes_file=args.classes,
        skip_corrupt=args.skip_corrupt,
        n_per_class=args.n_per_class,
        progress=not args.no_progress,
    )
    counts: dict[str, int] = {}
    for s in manifest.samples:
        counts[s.domain] = counts.get(s.domain, 0) + 1
    print(f"{args.benchmark}: {len(manifest.samples)} images under {manifest.root}")
    for domain, n in counts.items():
        print(f"  {domain:<16} {n}")
    if manifest.n_skipped:
        print(f"  skipped {manifest.n_skipped} unreadable image(s) (--skip-corrupt)")
    return 0


def _eval_configs(args: argparse.Namespace) -> list[RunConfig]:
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
    targets = [args.target] if args.target not in (None, "all") else None
    if targets is None:
        if args.target is None and cfg.data.target:
            targets = [cfg.data.target]
        else:
            from seeclip.datasets import get_benchmark

            spec = get_benchmark(cfg.data.benchmark, classes_file=cfg.data.classes_file)
            targets = list(spec.targets)
    seeds = args.seed if args.seed else [cfg.seed]
    return [
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, target=t), seed=s)
        for s in seeds
        for t in targets
    ]


def _cmd_eval(args: argparse.Namespace) -> int:
    from seeclip.report import summarize
    from seeclip.runner import eval_run, run_eval

    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    if getattr(args, "run", None):
        results = [eval_run(args.run, cache_dir=args.cache_dir, progress=not args.no_progress)]
    else:
        results = (
            run_eval(
                cfg,
                runs_dir=args.runs_dir,
                cache_dir=args.cache_dir,
                force=args.force,
                progress=not args.no_progress,
            )
            for cfg in _eval_configs(args)
        )
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


def _cmd_report(args: argparse.Namespace) -> int:
    from seeclip.report import read_records, summarize

    records = read_records(args.runs_dir)
    if args.benchmark:
        records = [r for r in records if r["benchmark"] == args.benchmark]
    if not records:
        raise FileNotFoundError(f"no finished runs under {args.runs_dir} (folders with `done`)")
    print(summarize(records, per_target=not args.means_only))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    print("seeclip demo: zero-shot CLIP on the embedded `digits` OSDG benchmark, every target.")
    prep = argparse.Namespace(
        benchmark="digits",
        data_root=None,
        classes=None,
        skip_corrupt=False,
        n_per_class=None,
        no_progress=args.no_progress,
    )
    _cmd_prepare(prep)
    ev = argparse.Namespace(
        config=None,
        benchmark="digits",
        protocol="full",
        target="all",
        data_root=None,
        classes=None,
        method="zeroshot",
        backbone=args.backbone,
        pretrained=None,
        overrides=[],
        seed=None,
        runs_dir=args.runs_dir,
        cache_dir=None,
        force=False,
        no_progress=args.no_progress,
    )
    return _cmd_eval(ev)


def _add_run_parser(sub, command: str) -> None:
    helps = {
        "eval": "fit (if needed) and evaluate a method on target domain(s); --run re-evaluates",
        "train": "train a method from a preset on cached features, then evaluate it",
    }
    p = sub.add_parser(command, help=helps[command])
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
    p.add_argument("--cache-dir", help="feature cache folder (default: $SEECLIP_HOME/features)")
    p.add_argument("--force", action="store_true", help="recompute a finished run")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 suits tiny models)")
    p.add_argument(
        "overrides", nargs="*", help="config overrides key=value, e.g. zeroshot.score=mcm"
    )
    p.set_defaults(func=_cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seeclip",
        description="SeeCLIP and baselines for open-set domain generalization (OSDG).",
    )
    sub = p.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("list", help="benchmarks (domains, protocols), methods and backbones")
    ls.add_argument("what", nargs="?", choices=["benchmarks", "methods", "backbones"])
    ls.set_defaults(func=_cmd_list)

    pr = sub.add_parser("prepare", help="validate a dataset tree and write its manifest once")
    pr.add_argument("benchmark")
    pr.add_argument("--data-root", help="folder holding the dataset (not needed for digits)")
    pr.add_argument("--classes", help="YAML naming known/unknown classes (benchmark `folder`)")
    pr.add_argument("--skip-corrupt", action="store_true", help="leave unreadable images out")
    pr.add_argument("--n-per-class", type=int, help="digits only: images per class and domain")
    pr.add_argument("--no-progress", action="store_true")
    pr.set_defaults(func=_cmd_prepare)

    for command in ("eval", "train"):
        _add_run_parser(sub, command)

    from seeclip.generate.command import add_generate_parser
    from seeclip.pretrain import add_pretrain_parser

    add_pretrain_parser(sub)
    add_generate_parser(sub)

    rp = sub.add_parser("report", help="table of finished runs: mean ± std over seeds")
    rp.add_argument("--runs-dir", default="runs")
    rp.add_argument("--benchmark", help="only this benchmark's runs")
    rp.add_argument("--means-only", action="store_true", help="only the mean-over-targets rows")
    rp.set_defaults(func=_cmd_report)

    de = sub.add_parser("demo", help="prepare the embedded benchmark and evaluate zero-shot CLIP")
    de.add_argument("--backbone", default="tiny-digits")
    de.add_argument("--runs-dir", default="runs")
    de.add_argument("--no-progress", action="store_true")
    de.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (
        ConfigError,
        FileNotFoundError,
        FileExistsError,
        KeyError,
        ValueError,
        WeightsUnavailableError,
    ) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"seeclip: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
