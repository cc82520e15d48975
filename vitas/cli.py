"""The `vitas` command: one subcommand per module in `vitas/commands/`.

Each command module defines `register(subparsers)`, which adds its parser and sets `func`
(called with the parsed namespace; returns an exit code or None). User errors print one line
`vitas: error: ...` and exit 2; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from core.errors import UserError
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        code = args.func(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"vitas: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitas: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
