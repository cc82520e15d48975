"""One subcommand per pipeline stage (`vitas train-supernet`, `search`, `rank`, `scale`,
`retrain`, `evaluate`), all built from the stage table and run through `execute`.

The same command runs in one process, under `torchrun --nproc_per_node N`, or as Slurm tasks
(`srun`); running it again with the same output_dir continues from the stage's last.pth.
"""
from __future__ import annotations

import argparse
import json
import os

from vitas.stages import STAGES, add_stage_args, get_stage, records, stage_config


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add every stage of the table as a subcommand."""
    for name in STAGES:
        stage = get_stage(name)
        parser = subparsers.add_parser(name, help=stage.help, description=stage.description)
        add_stage_args(parser, stage)
        parser.set_defaults(func=_run, stage_name=name)


def _run(args: argparse.Namespace) -> None:
    from vitas.core import dist
    from vitas.core.stage import execute

    stage = get_stage(args.stage_name)
    dist.export_env()  # the rank is known before execute joins (and, at the end, leaves) the group
    summary = execute(stage, stage_config(args, stage), record=records(args, stage))
    if int(os.environ.get("RANK", "0")) == 0:
        for line in stage.report(summary) if stage.report else ():
            print(line)
        print(json.dumps(stage.stdout_summary(summary)), flush=True)
