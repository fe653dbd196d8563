"""The ``seeclip`` command line: one module per subcommand; each parses, calls the library, prints.

The app sits on top of the library (open_clip's ``open_clip`` / ``open_clip_train`` split):
nothing below :mod:`seeclip.runner` imports from here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from seeclip.cli import (
    demo,
    generate,
    listing,
    predict,
    prepare,
    pretrain,
    pretrain_diffusion,
    report,
    run,
    sweep,
)
from seeclip.config import ConfigError
from seeclip.hub import WeightsUnavailableError

# in `--help` order
SUBCOMMANDS = (
    listing,
    prepare,
    run,
    sweep,
    report,
    predict,
    generate,
    pretrain,
    pretrain_diffusion,
    demo,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seeclip",
        description="SeeCLIP and baselines for open-set domain generalization (OSDG).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
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
