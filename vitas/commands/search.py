"""`vitas search -c CONFIG [key=value ...]`: architecture search over the trained superformer.

The same command runs in one process, under `torchrun --nproc_per_node N`, or as Slurm tasks
(`srun`); running it again with the same output_dir continues from `<output_dir>/search/last.pth`.
"""
from __future__ import annotations

import argparse
import json

from vitas.commands._common import add_config_args, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `vitas search`."""
    parser = subparsers.add_parser(
        "search", help="search architectures (GA, NSGA-II or RL; inherited accuracy or proxies)",
        description="Search the config's space with search.algorithm (ga: constrained GA, nsga2: "
        "score vs MACs Pareto front, rl: As-ViT REINFORCE) scored by search.scorer (accuracy: "
        "hold-out top-1 with weights inherited from the superformer; proxy: training-free). "
        "Budgets: search.macs_min/max, search.params_min/max. Writes OUTPUT_DIR/search/"
        "{config.yaml,last.pth,result.json,arch.json,pareto.png,retrain.yaml}; a second run with "
        "the same OUTPUT_DIR continues from last.pth. The last line of stdout is a JSON object "
        "{arch, macs, params, scores, output}.")
    add_config_args(parser)
    parser.set_defaults(func=_search)


def _search(args: argparse.Namespace) -> None:
    from vitas.core.dist import is_main
    from vitas.search.runner import run

    summary = run(config_from_args(args))
    if is_main():
        scores = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in summary["scores"].items())
        print(f"chosen architecture: {json.dumps(summary['arch'])}")
        print(f"  macs {summary['macs']:,}  params {summary['params']:,}  {scores}")
        print(f"  outputs in {summary['output']}")
        print(json.dumps({k: summary[k] for k in ("arch", "macs", "params", "scores", "output")}))
