"""The table of pipeline stages: it drives the CLI subcommands, `vitas submit` and the submitit
job alike. Each entry names a `vitas.core.stage.Stage` object ("module:attribute")."""
from __future__ import annotations

import argparse

from vitas.core.config import Config, load_config
from vitas.core.launch import resolve_entry
from vitas.core.stage import Stage

STAGES: dict[str, str] = {
    "train-supernet": "vitas.supernet.train:STAGE",
    "search": "vitas.search.runner:STAGE",
    "rank": "vitas.search.ranking.study:STAGE",
    "scale": "vitas.search.scaling:STAGE",
    "retrain": "vitas.retrain.train:STAGE",
    "evaluate": "vitas.inference.evaluate:STAGE",
}


def get_stage(name: str) -> Stage:
    """The Stage registered as `name`."""
    return resolve_entry(STAGES[name])


def add_stage_args(parser: argparse.ArgumentParser, stage: Stage) -> None:
    """`-c CONFIG`, the stage's own options and trailing `section.key=value` overrides."""
    parser.add_argument("-c", "--config", required=stage.config_required, help="experiment YAML")
    for opt in stage.options:
        if opt.is_flag:
            parser.add_argument(opt.flag, action="store_true", default=None,
                                help=f"{opt.help} (sets {opt.key}=true)")
        else:
            parser.add_argument(opt.flag, metavar=opt.metavar, help=f"{opt.help} (sets {opt.key})")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override any config key, e.g. search.population=30")


def stage_config(args: argparse.Namespace, stage: Stage) -> Config:
    """The resolved Config of a stage's command line: the YAML, then its options, then overrides."""
    options = []
    for opt in stage.options:
        value = getattr(args, opt.flag.lstrip("-").replace("-", "_"))
        if value is not None:
            options.append(f"{opt.key}=true" if opt.is_flag else (opt.key, value))
    return load_config(args.config, [o for o in options if isinstance(o, str)] + list(args.overrides),
                       values=[o for o in options if isinstance(o, tuple)])


def records(args: argparse.Namespace, stage: Stage) -> bool:
    """Whether a command-line run is recorded in its stage folder: always, except for a stage
    that runs without a config (evaluate) when neither a config nor output_dir was given."""
    return stage.config_required or args.config is not None or any(
        o.startswith("output_dir=") for o in args.overrides)
