"""`vitas predict --checkpoint PATH_OR_URL IMAGE...`: the most likely classes of each image."""
from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `vitas predict`."""
    parser = subparsers.add_parser(
        "predict", help="top-5 classes with probabilities for images",
        description="Classify images with a retrain checkpoint, URL or exported folder. Class names "
        "come from --data (its train/ class folders), else from the checkpoint, else indices. "
        'The last line of stdout is {"predictions": [{"image", "topk": [{"class", "index", "prob"}]}]}.')
    parser.add_argument("--checkpoint", required=True, help="retrain checkpoint, URL, or exported folder")
    parser.add_argument("--data", metavar="DIR", help="data folder whose train/ names the classes")
    parser.add_argument("--sha256", help="expected sha256 of a downloaded checkpoint")
    parser.add_argument("--cache-dir", help="download cache (default: $VITAS_CACHE_DIR or ~/.cache/vitas)")
    parser.add_argument("--topk", type=int, default=5, help="classes per image (default: 5)")
    parser.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    parser.add_argument("--arch", metavar="FILE_OR_JSON",
                        help="a foreign checkpoint's architecture where the file does not say")
    parser.add_argument("--heads", type=int, metavar="N",
                        help="a foreign checkpoint's head count where the file does not say")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> None:
    from vitas.core.errors import UserError
    from vitas.inference.predict import predict

    if args.topk < 1:
        raise UserError(f"--topk must be >= 1, got {args.topk}")
    results = predict(args.checkpoint, args.images, args.data, args.topk, args.sha256, args.cache_dir,
                      args.ema, args.arch, args.heads)
    for item in results:
        print(item["image"])
        for rank, hit in enumerate(item["topk"], 1):
            print(f"  {rank}. {hit['class']:<20} {100 * hit['prob']:6.2f}%")
    print(json.dumps({"predictions": results}))
