"""``seeclip report``: a table of finished runs, mean ± std over distinct seeds."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="table of finished runs: mean ± std over seeds")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--benchmark", help="only this benchmark's runs")
    p.add_argument("--means-only", action="store_true", help="only the mean-over-targets rows")
    p.add_argument(
        "--rule",
        default="own",
        choices=("own", "lodo_threshold", "validated"),
        help="decision rule of the metrics: the method's own (default), the threshold "
        "calibrated on LODO folds, or the one a --grid selection chose",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from seeclip.report import read_records, summarize, under_rule

    records = read_records(args.runs_dir)
    if args.benchmark:
        records = [r for r in records if r["benchmark"] == args.benchmark]
    records = under_rule(records, args.rule)
    if not records:
        raise FileNotFoundError(
            f"no finished runs under {args.runs_dir} (folders with `done`)"
            + ("" if args.rule == "own" else f" with rule {args.rule}")
        )
    print(summarize(records, per_target=not args.means_only))
    hashes = sorted({r["data_hash"][:16] for r in records if r.get("data_hash")})
    if hashes:
        print(f"\ndata: {', '.join(hashes)} (content hash of the images the runs used)")
    return 0
