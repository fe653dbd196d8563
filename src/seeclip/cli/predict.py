"""``seeclip predict``: a trained run applied to image files or folders, one CSV row each."""

from __future__ import annotations

import argparse
import sys

from seeclip.cli.args import positive_int
from seeclip.cli.run import add_device


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="apply a trained run to images: class or `unknown`")
    p.add_argument("--run", required=True, help="a run folder, runs/<name>/<config-hash>")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--out", help="write the CSV here (default: print it)")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads")
    add_device(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from seeclip.io import write_text
    from seeclip.predict import expand_paths, load, to_csv

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    paths = expand_paths(args.paths)
    if not paths:
        raise FileNotFoundError(f"no image files under {' '.join(args.paths)}")
    rows = load(args.run).predict(paths)
    text = to_csv(rows)
    failed = [r for r in rows if r.error]
    if args.out:
        write_text(args.out, text)
        unknown = sum(r.label == "unknown" for r in rows)
        print(f"{len(rows)} images: {unknown} unknown, {len(failed)} unreadable -> {args.out}")
    else:
        sys.stdout.write(text)
    for r in failed:
        print(f"seeclip: {r.source}: {r.error}", file=sys.stderr)
    return 1 if failed and len(failed) == len(rows) else 0
