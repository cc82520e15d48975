"""`vitas rank -c CONFIG [--ground-truth-epochs E]`: proxies versus supernet ranking study."""
from __future__ import annotations

import argparse
import json

from vitas.commands._common import add_config_args, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `vitas rank`."""
    parser = subparsers.add_parser(
        "rank", help="correlate proxies, cost, inherited and trained accuracy over sampled archs",
        description="Sample proxy.rank_archs architectures evenly across the MACs range, compute "
        "L^E, NTK condition, curvature, params, MACs, inherited hold-out top-1 (from "
        "OUTPUT_DIR/supernet/last.pth when present) and, with E > 0 ground-truth epochs, val top-1 "
        "after training each from scratch. Writes OUTPUT_DIR/rank/{ranking.csv,correlations.json,"
        "*.png} and prints Kendall tau / Spearman rho of every pair of columns; the last line of "
        "stdout is a JSON object {archs, columns, correlations, output}.")
    add_config_args(parser)
    parser.add_argument("--ground-truth-epochs", type=int, default=None, metavar="E",
                        help="train every architecture from scratch for E epochs "
                        "(default proxy.ground_truth_epochs; 0: no training)")
    parser.set_defaults(func=_rank)


def _rank(args: argparse.Namespace) -> None:
    from vitas.core.logs import setup_logging
    from vitas.search.ranking.study import correlation_table, rank

    cfg = config_from_args(args)
    setup_logging()
    result = rank(cfg, args.ground_truth_epochs)
    print(correlation_table(result["correlations"]))
    print(f"outputs in {result['output']}")
    print(json.dumps({"archs": len(result["rows"]), "columns": result["columns"],
                      "correlations": result["correlations"], "output": result["output"]}))
