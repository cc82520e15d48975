"""The `vitas` command: one subcommand per module in `vitas/commands/`.

Each command module defines `register(subparsers)`, which adds its parser and sets `func`
(called with the parsed namespace; returns an exit code or None). User errors and file-system
faults (a full disk, a read-only or forbidden path) print one line `vitas: error: ...` and exit 2;
`--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from vitas.core.errors import UserError, fs_fault, one_line
import vitas.commands


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every command module's subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="vitas",
        description="One-shot supernet architecture search for Vision Transformers.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(vitas.commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"vitas.commands.{info.name}")
        module.register(sub)
    _remember_parsers(parser)
    return parser


def _remember_parsers(parser: argparse.ArgumentParser) -> None:
    """Give every (sub)command's namespace its own parser, so that errors print its usage."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                command.set_defaults(command_parser=command)
                _remember_parsers(command)


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse `argv`; `KEY=VALUE` overrides may stand anywhere after the command, before or after
    its options (argparse alone takes only one run of positionals), and `--debug` anywhere."""
    debug = "--debug" in argv
    args, extra = parser.parse_known_args([a for a in argv if a != "--debug"])
    args.debug = debug
    if extra:
        overrides = [a for a in extra if "=" in a and not a.startswith("-")]
        if hasattr(args, "overrides") and len(overrides) == len(extra):
            args.overrides = [*args.overrides, *overrides]
        else:
            (getattr(args, "command_parser", None) or parser).error(
                f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parse(parser, argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        code = args.func(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"vitas: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only or forbidden path: the user's to fix
        message = fs_fault(exc)
        if message is None or args.debug:
            raise
        print(f"vitas: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitas: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
