"""`vitas scale -c CONFIG --seed-arch FILE_OR_JSON`: As-ViT's training-free auto-scaling."""
from __future__ import annotations

import argparse
import json

from vitas.commands._common import add_config_args, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `vitas scale`."""
    parser = subparsers.add_parser(
        "scale", help="grow a seed architecture by L^E and NTK condition (As-ViT Algorithm 2)",
        description="Training-free auto-scaling: from the seed architecture, each step tries 4 "
        "depth moves (one more layer in one quarter of the network) x 4 width ratios "
        "{1.05, 1.1, 1.15, 1.2} and keeps the best rank sum of L^E (descending) and NTK "
        "condition (ascending), until proxy.scaling_param_limit parameters. Writes "
        "OUTPUT_DIR/scale/trajectory.json (every grown architecture with proxies, params, MACs); "
        "a rerun continues it. The last line of stdout is a JSON object {arch, params, macs, "
        "steps, output}.")
    add_config_args(parser)
    parser.add_argument("--seed-arch", metavar="FILE_OR_JSON",
                        help="seed architecture: arch.json or inline JSON (may lie outside the "
                        "space); default proxy.scaling_seed_arch")
    parser.set_defaults(func=_scale)


def _scale(args: argparse.Namespace) -> None:
    from vitas.core.logs import setup_logging
    from vitas.search.scaling import run

    cfg = config_from_args(args)
    if args.seed_arch is not None:
        cfg.proxy.scaling_seed_arch = args.seed_arch
    setup_logging()
    traj = run(cfg)
    print(f"{'step':>4} {'depth':>5} {'embed':>5} {'params':>12} {'macs':>14} {'L^E':>10} {'kappa':>10}")
    for s in traj["steps"]:
        a = s["arch"]
        print(f"{s['step']:>4} {a['depth']:>5} {a['embed_dim']:>5} {s['params']:>12,} {s['macs']:>14,} "
              f"{s['length_distortion']:>10.4g} {s['ntk_condition'] or float('nan'):>10.4g}")
    last = traj["steps"][-1]
    print(json.dumps({"arch": last["arch"], "params": last["params"], "macs": last["macs"],
                      "steps": len(traj["steps"]) - 1, "output": str(cfg.stage_dir("scale") / "trajectory.json")}))
