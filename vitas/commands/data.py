"""`vitas data`: build the digits or the synthetic counting data set, or check a folder data set
(ImageNet layout)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path



def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `vitas data digits DIR`, `vitas data counting DIR` and `vitas data check DIR`."""
    parser = subparsers.add_parser("data", help="prepare or check a data set",
                                   description="Prepare or check a folder data set.")
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    digits = sub.add_parser("digits", help="write scikit-learn's digits as 32x32 RGB PNGs",
                            description="Write scikit-learn's handwritten digits (1,797 images, "
                            "10 classes) as DIR/train/<class>/*.png and DIR/val/<class>/*.png.")
    digits.add_argument("dir", type=Path, metavar="DIR", help="output folder (usable as data.root)")
    digits.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    digits.add_argument("--val-fraction", type=float, default=0.2, help="share of images in val/")
    digits.set_defaults(func=_digits)
    counting = sub.add_parser(
        "counting", help="write the synthetic counting task (how many green objects?)",
        description="Write a synthetic task on which architecture matters: 7 to 9 objects on "
        "clutter, the class is the number of green ones (1 to 6); deterministic from --seed. "
        "Writes DIR/train/green-<n>/*.png and DIR/val/green-<n>/*.png (see docs/FIDELITY.md).")
    counting.add_argument("dir", type=Path, metavar="DIR", help="output folder (usable as data.root)")
    counting.add_argument("--seed", type=int, default=0, help="seed of every scene (default 0)")
    counting.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    counting.add_argument("--train-per-class", type=int, default=3500, metavar="N",
                          help="training images per class (default 3500, 6 classes)")
    counting.add_argument("--val-per-class", type=int, default=500, metavar="M",
                          help="val images per class (default 500)")
    counting.add_argument("--workers", type=int, default=2,
                          help="processes that render (default 2; the files do not depend on it)")
    counting.set_defaults(func=_counting)
    check = sub.add_parser("check", help="count images and classes of a folder data set",
                           description="Read DIR/train and DIR/val as vitas does and count them.")
    check.add_argument("dir", metavar="DIR", help="data.root: a folder with train/ and val/")
    check.set_defaults(func=_check)


# core.data imports timm: loaded only when a data command runs, to keep `vitas --help` quick.
def _digits(args: argparse.Namespace) -> None:
    from vitas.core.data import write_digits

    counts = write_digits(args.dir, val_fraction=args.val_fraction, seed=args.seed)
    print(f"wrote {counts['train']} train and {counts['val']} val images to {args.dir}")
    print(json.dumps({"root": str(args.dir.absolute()), **counts}))


def _counting(args: argparse.Namespace) -> None:
    from vitas.core.synthetic import write_counting

    counts = write_counting(args.dir, seed=args.seed, size=args.size,
                            train_per_class=args.train_per_class,
                            val_per_class=args.val_per_class, workers=args.workers)
    print(f"wrote {counts['train']} train and {counts['val']} val images to {args.dir}")
    print(json.dumps({"root": str(args.dir.absolute()), **counts}))


def _check(args: argparse.Namespace) -> None:
    from vitas.core.config import DataConfig
    from vitas.core.data import build_dataset, class_names

    cfg = DataConfig(root=args.dir)
    counts = {split: len(build_dataset(cfg, split, 32, is_training=False))
              for split in ("train", "val")}
    print(json.dumps({"root": args.dir, "classes": len(class_names(cfg)), **counts}))
