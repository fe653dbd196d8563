"""The ``seeclip`` command line: one module per subcommand; each parses, calls the library, prints.

The app sits on top of the library (open_clip's ``open_clip`` / ``open_clip_train`` split):
nothing below :mod:`seeclip.runner` imports from here.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence

import yaml

from seeclip import distributed
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
from seeclip.datasets.images import ImageReadError
from seeclip.hub import WeightsUnavailableError
from seeclip.io import NoSpaceError

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
        if getattr(args, "device", None):
            distributed.use_device(distributed.resolve_device(args.device))
        if distributed.init_from_env() and not distributed.is_main():
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - rank 0 prints the tables
        return args.func(args)
    except (
        ConfigError,
        FileNotFoundError,
        FileExistsError,
        KeyError,
        ValueError,
        WeightsUnavailableError,
        ImageReadError,
    ) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"seeclip: error: {msg}", file=sys.stderr)
        return 2
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        what = getattr(err, "problem", None) or type(err).__name__
        print(f"seeclip: error: invalid YAML{at}: {what}; fix the file's syntax", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, permissions, ...: what failed and what to do
        print(f"seeclip: error: {os_error_message(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: every write is atomic and training checkpoints
        print(
            "seeclip: interrupted; finished runs, caches and checkpoints are kept: rerun the "
            "same command to resume",
            file=sys.stderr,
        )
        return 130
    finally:
        if distributed.world_size() > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def os_error_message(err: OSError) -> str:
    """One line for an operating-system error, with the fix for the common ones."""
    where = f" ({err.filename})" if err.filename else ""
    if isinstance(err, NoSpaceError):
        return str(err)
    if err.errno == errno.ENOSPC:
        return (
            f"no space left on the device{where}; free some space (or point SEECLIP_HOME / "
            "--runs-dir elsewhere) and rerun: finished work is kept"
        )
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied{where}; choose a folder you can write to, or fix its rights"
    return f"{err.strerror or err}{where}"


if __name__ == "__main__":
    sys.exit(main())
