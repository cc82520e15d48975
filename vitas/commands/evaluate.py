"""`vitas evaluate --checkpoint PATH_OR_URL --data DIR`: top-1/top-5 on the val split."""
from __future__ import annotations

import argparse
import json

from vitas.core.config import load_config
from vitas.core.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `vitas evaluate`."""
    parser = subparsers.add_parser(
        "evaluate", help="top-1/top-5 of a trained model on a val split",
        description="Evaluate a retrain checkpoint (a file, or an http(s)/file URL downloaded into "
        "the cache and checked against --sha256 or a torch.hub-style hash in its name) or an "
        "exported folder on DIR/val, across all ranks under torchrun. The last line of stdout is "
        '{"top1", "top5", "images"}.')
    parser.add_argument("--checkpoint", help="retrain checkpoint, URL, or exported folder "
                        "(default: inference.checkpoint)")
    parser.add_argument("--data", metavar="DIR",
                        help="data folder with train/ and val/ (default: data.root)")
    parser.add_argument("--sha256", help="expected sha256 of a downloaded checkpoint")
    parser.add_argument("--cache-dir", help="download cache (default: inference.cache_dir, "
                        "$VITAS_CACHE_DIR or ~/.cache/vitas)")
    parser.add_argument("--split", default="val", help="folder to evaluate on (default: val)")
    parser.add_argument("--ema", action="store_true", default=None,
                        help="evaluate the checkpoint's EMA weights (default: inference.ema)")
    parser.add_argument("-c", "--config", help="experiment YAML (inference.* and data.* settings)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys")
    parser.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> None:
    from vitas.core import dist
    from vitas.inference.evaluate import evaluate_checkpoint

    cfg = load_config(args.config, args.overrides)
    checkpoint = args.checkpoint or cfg.inference.checkpoint
    data = args.data or cfg.data.root
    if not checkpoint:
        raise UserError("give --checkpoint (or inference.checkpoint)")
    if not data:
        raise UserError("give --data DIR (or data.root)")
    result = evaluate_checkpoint(checkpoint, data, args.sha256 or cfg.inference.sha256,
                                 args.cache_dir or cfg.inference.cache_dir, cfg.inference.batch_size,
                                 cfg.data.workers, args.split,
                                 cfg.inference.ema if args.ema is None else args.ema)
    if dist.is_main():
        print(f"{checkpoint} on {data}/{args.split}: top1 {result['top1']:.2f}% "
              f"top5 {result['top5']:.2f}% ({result['images']} images)")
        print(json.dumps(result), flush=True)
    dist.cleanup()
