"""``seeclip list``: benchmarks, methods, pseudo-unknown sources, selection rules, backbones."""

from __future__ import annotations

import argparse

WHAT = ("benchmarks", "methods", "pseudo", "selection", "backbones")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "list", help="benchmarks, methods, pseudo-unknown sources, selection rules, backbones"
    )
    p.add_argument("what", nargs="?", choices=WHAT)
    p.set_defaults(func=run)


def _first_line(obj) -> str:
    return (obj.__doc__ or "").strip().splitlines()[0]


def run(args: argparse.Namespace) -> int:
    from seeclip.backbone import list_backbones
    from seeclip.datasets import BENCHMARKS, describe_benchmark
    from seeclip.methods.registry import METHODS, sections_of
    from seeclip.pseudo import PSEUDO_UNKNOWNS
    from seeclip.selection import SELECTIONS, SETTING_SELECTIONS

    what = args.what
    if what in (None, "benchmarks"):
        print("Benchmarks (seeclip eval --benchmark NAME --protocol P --target T):")
        for name in BENCHMARKS:
            print("  " + describe_benchmark(name).replace("\n", "\n    "))
    if what in (None, "methods"):
        print("Methods (--method NAME; config sections it reads in brackets):")
        for name, factory in METHODS.items():
            print(f"  {name:<14} {_first_line(factory)} [{', '.join(sections_of(factory))}]")
    if what in (None, "pseudo"):
        print("Pseudo-unknown sources (train.pseudo_unknowns=NAME):")
        for name, factory in PSEUDO_UNKNOWNS.items():
            print(f"  {name:<14} {_first_line(factory)}")
    if what in (None, "selection"):
        print("Model selection (train.selection=NAME; source domains only):")
        for name, rule in SELECTIONS.items():
            print(f"  {name:<14} {rule.description}")
        print("Setting selection (train --validate lodo --grid FILE; source domains only):")
        for name, rule in SETTING_SELECTIONS.items():
            print(f"  {name:<14} {rule.description}")
    if what in (None, "backbones"):
        print("Backbones (--backbone NAME [--pretrained TAG|PATH]):")
        for name, desc in list_backbones():
            print(f"  {name:<14} {desc}")
    return 0
