"""`vitas train-supernet -c CONFIG [key=value ...]`: train the superformer.

The same command runs in one process, under `torchrun --nproc_per_node N`, or as Slurm tasks
(`srun`); running it again with the same output_dir resumes from `<output_dir>/supernet/last.pth`.
"""
from __future__ import annotations

import argparse
import json
import os

from vitas.commands._common import add_config_args, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `vitas train-supernet`."""
    parser = subparsers.add_parser(
        "train-supernet", help="train the superformer (one process, torchrun or srun)",
        description="Train the superformer of the config's search space on data.root with "
        "supernet.sampling (uniform, autoslim, bcnet, sandwich). Writes OUTPUT_DIR/supernet/"
        "{config.yaml,last.pth,log.jsonl,summary.json} and TensorBoard events; a second run "
        "with the same OUTPUT_DIR resumes from last.pth. Under torchrun or srun every process "
        "runs this same command; supernet.batch_size is the global batch. The last line of "
        "stdout is a JSON object {max_top1, min_top1, epochs, steps, output}.")
    add_config_args(parser)
    parser.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> None:
    from vitas.supernet.train import STAGE, run

    cfg = config_from_args(args)
    summary = run(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"max_top1": summary["max_top1"], "min_top1": summary["min_top1"],
                          "epochs": summary["epochs"], "steps": summary["steps"],
                          "output": str(cfg.stage_dir(STAGE))}))
