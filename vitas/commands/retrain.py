"""`vitas retrain -c CONFIG [--arch FILE_OR_JSON] [key=value ...]`: train the chosen architecture."""
from __future__ import annotations

import argparse

from vitas.commands._common import add_config_args, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `vitas retrain`."""
    parser = subparsers.add_parser(
        "retrain", help="train the chosen architecture (from scratch or superformer weights)",
        description="Train the static ViT of an architecture with the DeiT recipe (all settings in "
        "the config's retrain/data sections): from scratch or from the superformer's weights "
        "(retrain.init=supernet), EMA, AMP on GPU, progressive re-tokenization (retrain.retokenize), "
        "val accuracy after every epoch, auto-resume from OUTPUT_DIR/retrain/last.pth. The "
        "architecture is --arch, else retrain.arch, else OUTPUT_DIR/search/arch.json. The last line "
        'of stdout is {"top1", "top5", "images"}; OUTPUT_DIR/retrain/summary.json has the rest.')
    add_config_args(parser)
    parser.add_argument("--arch", metavar="FILE_OR_JSON",
                        help="architecture to train: an arch.json file or inline JSON")
    parser.set_defaults(func=_retrain)


def _retrain(args: argparse.Namespace) -> None:
    from vitas.retrain.train import run

    cfg = config_from_args(args)
    if args.arch is not None:
        cfg.retrain.arch = args.arch
    run(cfg)
