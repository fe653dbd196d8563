"""``seeclip prepare``: validate a dataset tree (or generate an embedded one); write a manifest."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("prepare", help="validate a dataset tree and write its manifest once")
    p.add_argument("benchmark")
    p.add_argument(
        "--data-root", help="folder holding the dataset (not needed for digits and glyphs)"
    )
    p.add_argument("--classes", help="YAML naming known/unknown classes (benchmark `folder`)")
    p.add_argument("--skip-corrupt", action="store_true", help="leave unreadable images out")
    p.add_argument("--n-per-class", type=int, help="embedded only: images per class and domain")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="embedded only: data seed, another draw of the world (not 0: data/<name>-seed<N>; "
        "pass that folder as --data-root to runs)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def prepare_and_print(
    benchmark: str,
    data_root: str | None = None,
    *,
    classes: str | None = None,
    skip_corrupt: bool = False,
    n_per_class: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> int:
    from seeclip.run_data import data_hash, prepare_benchmark

    manifest = prepare_benchmark(
        benchmark,
        data_root,
        classes_file=classes,
        skip_corrupt=skip_corrupt,
        n_per_class=n_per_class,
        seed=seed,
        progress=progress,
    )
    counts: dict[str, int] = {}
    for s in manifest.samples:
        counts[s.domain] = counts.get(s.domain, 0) + 1
    digest, kind = data_hash(manifest)
    print(f"{benchmark}: {len(manifest.samples)} images under {manifest.root}")
    print(f"  manifest {manifest.path}")
    print(f"  data hash ({kind}) {digest[:16]}")
    for domain, n in counts.items():
        print(f"  {domain:<16} {n}")
    if manifest.n_skipped:
        print(f"  skipped {manifest.n_skipped} unreadable image(s) (--skip-corrupt)")
    return 0


def run(args: argparse.Namespace) -> int:
    return prepare_and_print(
        args.benchmark,
        args.data_root,
        classes=args.classes,
        skip_corrupt=args.skip_corrupt,
        n_per_class=args.n_per_class,
        seed=args.seed,
        progress=not args.no_progress,
    )
