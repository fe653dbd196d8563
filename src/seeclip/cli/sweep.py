"""``seeclip sweep``: every variant x protocol x target x seed of a preset, resumable."""

from __future__ import annotations

import argparse
import dataclasses

from seeclip.cli.args import positive_int
from seeclip.cli.run import add_device, add_verify_cache, use_verify_cache
from seeclip.config import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="run variants x protocols x targets x seeds (finished runs skipped; --jobs N)",
        description="Runs every combination once; a second invocation skips finished runs, and "
        "two invocations at once share the work (a lock per run folder).",
    )
    p.add_argument("--sweep", help="sweep YAML (config, protocols, targets, seeds, variants)")
    p.add_argument("--config", help="preset every variant starts from, e.g. configs/digits.yaml")
    p.add_argument(
        "--methods",
        nargs="+",
        metavar="VARIANT",
        help="METHOD or METHOD:key=value,... e.g. coop seeclip:train.pseudo_unknowns=none "
        "(label=NAME among the overrides names the row)",
    )
    p.add_argument("--protocols", nargs="+", help="split families (default: the sweep's, or full)")
    p.add_argument("--targets", nargs="+", help="target domains, or `all` (default)")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (default: the sweep's, or 0)")
    p.add_argument("--jobs", type=positive_int, default=1, help="processes at once (default 1)")
    p.add_argument(
        "--threads", type=positive_int, default=1, help="torch threads per process (default 1)"
    )
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--cache-dir", help="feature cache and pool root (default: $SEECLIP_HOME)")
    add_verify_cache(p)
    add_device(p)
    p.add_argument(
        "--validate",
        choices=("lodo",),
        help="also validate every run on its sources (rule lodo_threshold in the records)",
    )
    p.add_argument("--held-out", type=float, default=0.3, help="lodo: held-out class share")
    p.add_argument("--class-splits", type=int, default=2, help="lodo: class splits per domain")
    p.add_argument(
        "--report", metavar="DIR", help="write `seeclip report --out DIR` of the sweep's runs"
    )
    p.add_argument("--means-only", action="store_true", help="print only mean-over-target rows")
    p.add_argument("--dry-run", action="store_true", help="list the runs and what is finished")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value applied to every variant")
    p.set_defaults(func=run)


def spec_from_args(args: argparse.Namespace):
    from seeclip.sweep import SweepSpec, load_sweep, parse_variant

    if args.sweep:
        spec = load_sweep(args.sweep)
        changes = {}
        if args.config:
            changes["config"] = args.config
        if args.methods:  # labels of the file select its variants; others are METHOD[:k=v]
            labelled = {v.label: v for v in spec.variants}
            changes["variants"] = tuple(labelled.get(m) or parse_variant(m) for m in args.methods)
    elif args.config and args.methods:
        spec = SweepSpec(config=args.config, variants=tuple(parse_variant(m) for m in args.methods))
        changes = {}
    else:
        raise ConfigError("name the runs: --sweep FILE, or --config PRESET --methods M [M ...]")
    if args.protocols:
        changes["protocols"] = tuple(args.protocols)
    if args.targets:
        changes["targets"] = None if args.targets == ["all"] else tuple(args.targets)
    if args.seeds:
        changes["seeds"] = tuple(args.seeds)
    if args.overrides:
        changes["overrides"] = (*spec.overrides, *args.overrides)
    return dataclasses.replace(spec, **changes)


def run(args: argparse.Namespace) -> int:
    from seeclip.report import summarize
    from seeclip.sweep import is_done, plan, run_sweep

    if args.jobs < 1 or args.threads < 1:
        raise ConfigError("--jobs and --threads must be at least 1")
    use_verify_cache(args)
    spec = spec_from_args(args)
    configs = plan(spec)
    validate = None
    if args.validate == "lodo":
        from seeclip.validation import LodoSettings

        validate = LodoSettings(held_out=args.held_out, class_splits=args.class_splits)
    if args.dry_run:
        for cfg in configs:
            mark = "done" if is_done(cfg, args.runs_dir, validate) else "todo"
            print(f"{mark}  {cfg.run_dir(args.runs_dir)}  seed {cfg.seed}")
        return 0
    result = run_sweep(
        configs,
        runs_dir=args.runs_dir,
        cache_dir=args.cache_dir,
        jobs=args.jobs,
        threads=args.threads,
        validate=validate,
        progress=not args.no_progress,
    )
    if result.records:
        print()
        print(summarize(result.records, per_target=not args.means_only))
    ran = sum(o.status == "ran" for o in result.outcomes)
    print(
        f"\n{len(configs)} runs ({ran} computed now) in {result.seconds:.0f} s; "
        f"records under {args.runs_dir}"
    )
    if args.report:
        from seeclip.report_files import write_report

        index = write_report(result.records, args.report, runs_dir=args.runs_dir)
        print(f"report: {index}")
    for o in result.failed:
        print(f"FAILED {o.run_dir}: {o.error}")
    return 1 if result.failed else 0
