"""``seeclip report``: tables of finished runs (mean ± std over seeds); with ``--out``, a
folder of tables (md, csv, tex), figures and an index (md and self-contained html)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="tables and plots of finished runs: mean ± std over seeds")
    p.add_argument("runs", nargs="?", metavar="RUNS_DIR", help="runs folder (default: runs)")
    p.add_argument("--runs-dir", help=argparse.SUPPRESS)  # the older spelling of RUNS_DIR
    p.add_argument("--out", help="write tables, figures, index.md and index.html into DIR")
    p.add_argument(
        "--format",
        default="md,csv,tex",
        help="with --out: comma-separated table formats among md, csv, tex (default: all)",
    )
    p.add_argument("--benchmark", help="only this benchmark's runs")
    p.add_argument("--seeds", type=int, nargs="+", help="only these seeds' runs")
    p.add_argument("--means-only", action="store_true", help="only the mean-over-targets rows")
    p.add_argument(
        "--rule",
        default="own",
        choices=("own", "lodo_threshold", "validated"),
        help="decision rule of the metrics: the method's own (default), the threshold "
        "calibrated on LODO folds, or the one a --grid selection chose",
    )
    p.add_argument(
        "--oracle",
        action="store_true",
        help="add H with the threshold chosen on the TARGET test set (DAML/MEDIC's published "
        "convention; an oracle, labelled as such), from the saved predictions",
    )
    p.add_argument("--no-plots", action="store_true", help="with --out: tables only")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from seeclip.report import read_records, summarize, under_rule

    runs_dir = args.runs or args.runs_dir or "runs"
    records = read_records(runs_dir)
    if args.benchmark:
        records = [r for r in records if r["benchmark"] == args.benchmark]
    if args.seeds:
        records = [r for r in records if r["seed"] in args.seeds]
    records = under_rule(records, args.rule)
    if not records:
        raise FileNotFoundError(
            f"no finished runs under {runs_dir} (folders with `done`)"
            + ("" if args.rule == "own" else f" with rule {args.rule}")
        )
    shown = records
    metrics = None
    if args.oracle:
        from seeclip.report import default_metrics
        from seeclip.report_files import ORACLE_NOTE, with_oracle

        shown = with_oracle(records, runs_dir)
        metrics = (*default_metrics(records), "h_score_oracle")
        print(ORACLE_NOTE + "\n")
    print(summarize(shown, metrics=metrics, per_target=not args.means_only))
    hashes = sorted({r["data_hash"][:16] for r in records if r.get("data_hash")})
    if hashes:
        print(f"\ndata: {', '.join(hashes)} (content hash of the images the runs used)")
    if args.out:
        from seeclip.report_files import write_report

        formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
        index = write_report(
            records,
            args.out,
            runs_dir=runs_dir,
            formats=formats,
            oracle=args.oracle,
            plots=not args.no_plots,
        )
        print(f"\nreport: {index} (and index.md, tables.* and figures/ beside it)")
    return 0
