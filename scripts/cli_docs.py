"""Print docs/cli.md, the reference of every ``seeclip`` subcommand, from the argparse parsers.

    python scripts/cli_docs.py > docs/cli.md

``tests/test_docs.py`` checks that docs/cli.md equals this script's output, so the page stays in
step with ``seeclip.cli.build_parser``. The output depends only on the parsers: no usage lines
(their wrapping follows the terminal) and no defaults computed from the machine (see
``MACHINE_DEFAULTS``).
"""

from __future__ import annotations

import argparse
import copy
import re
import sys

from seeclip.cli import build_parser

# Defaults a parser computes from the machine it runs on: (command, option) -> (the values it can
# take, what the page says instead), so the page is the same on every machine.
MACHINE_DEFAULTS = {
    ("generate", "--device"): (("cpu", "cuda"), "`cuda` if torch sees a GPU, else `cpu`"),
}

ANSI = re.compile(r"\x1b\[[0-9;]*m")

HEADER = """\
# Command line reference

Every `seeclip` subcommand and option, generated from the argparse parsers by
`python scripts/cli_docs.py > docs/cli.md` (a test checks that this page is in step with them;
do not edit it by hand). `seeclip COMMAND --help` prints the same. What the commands are for and
how they fit together is in [usage.md](usage.md).
"""


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def _one_line(text: str | None) -> str:
    """``text`` on one line, without the colour codes newer argparse versions may add."""
    return " ".join(ANSI.sub("", text or "").split())


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The action's help with argparse's ``%(default)s``-style fields filled in."""
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    return _one_line(parser._get_formatter()._expand_help(action))


def _name(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """``--opt METAVAR`` (choices are listed apart, so they name no metavar here)."""
    formatter = parser._get_formatter()
    action = copy.copy(action)
    action.choices = None
    if not action.option_strings:
        return formatter._format_args(action, action.dest)
    if action.nargs == 0:
        return ", ".join(action.option_strings)
    args = formatter._format_args(action, action.dest.upper())
    return ", ".join(f"{opt} {args}" for opt in action.option_strings)


def _default(command: str, action: argparse.Action) -> str | None:
    for opt in action.option_strings:
        if (command, opt) in MACHINE_DEFAULTS:
            values, text = MACHINE_DEFAULTS[command, opt]
            if action.default in values:
                return text
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
        return None
    if isinstance(action.default, list | tuple):
        return " ".join(f"`{v}`" for v in action.default) or None
    return f"`{action.default}`"


def _option_line(command: str, parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    parts = [f"- `{_name(parser, action)}`"]
    notes = []
    if action.required and action.option_strings:
        notes.append("required")
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        notes.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
    default = _default(command, action)
    if default is not None:
        notes.append(f"default {default}")
    if notes:
        parts.append(f"({'; '.join(notes)})")
    text = " ".join(parts)
    help_ = _help(parser, action)
    return f"{text}: {help_}" if help_ else text


def _command_section(name: str, help_: str, parser: argparse.ArgumentParser) -> list[str]:
    lines = [f"## `{name}`", ""]
    if help_:
        lines += [help_[:1].upper() + help_[1:] + ".", ""]
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    positionals = [a for a in actions if not a.option_strings]
    optionals = [a for a in actions if a.option_strings]
    command = name.split()[-1]
    for title, group in (("Arguments", positionals), ("Options", optionals)):
        if group:
            lines += [f"{title}:", ""]
            lines += [_option_line(command, parser, a) for a in group]
            lines.append("")
    return lines


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The Markdown page for ``parser`` (default: ``seeclip.cli.build_parser()``)."""
    parser = parser or build_parser()
    sub = _subparsers(parser)
    helps = {a.dest: _one_line(a.help) for a in sub._choices_actions} if sub else {}
    lines = [HEADER, f"`{parser.prog}`: {_one_line(parser.description)}", ""]
    lines += ["| command | what it does |", "|---|---|"]
    for name in sub.choices if sub else ():
        what = helps.get(name, "").replace("|", "\\|")
        lines.append(f"| [`{parser.prog} {name}`](#{parser.prog}-{name}) | {what} |")
    lines.append("")
    for name, subparser in sub.choices.items() if sub else ():
        lines += _command_section(f"{parser.prog} {name}", helps.get(name, ""), subparser)
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
