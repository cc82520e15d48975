"""Arguments shared by the stage commands: `-c CONFIG` and trailing `key=value` overrides."""
from __future__ import annotations

import argparse

from vitas.core.config import Config, load_config


def add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """`-c/--config FILE` and positional `section.key=value` overrides."""
    parser.add_argument("-c", "--config", required=required, help="experiment YAML")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override any config key, e.g. search.population=30")


def config_from_args(args: argparse.Namespace) -> Config:
    """The resolved Config for a parsed command line."""
    return load_config(args.config, args.overrides)
