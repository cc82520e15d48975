"""`vitas arch`: sample, validate and cost architectures of a config's search space."""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from vitas.core.config import Config
from vitas.core.errors import UserError
from vitas.commands._common import add_config_args, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `vitas arch sample|validate|cost`."""
    parser = subparsers.add_parser("arch", help="sample, validate or cost architectures",
                                   description="Work with architectures of the config's search space.")
    sub = parser.add_subparsers(dest="arch_command", metavar="ACTION", required=True)
    sample = sub.add_parser("sample", help="print N random canonical architectures (JSON lines)",
                            description="Sample N architectures uniformly; one canonical JSON per line.")
    add_config_args(sample)
    sample.add_argument("-n", type=int, default=1, help="how many architectures")
    sample.add_argument("--seed", type=int, default=0, help="sampling seed")
    sample.set_defaults(func=_sample)
    validate = sub.add_parser("validate", help="check an architecture against the space",
                              description="Check an architecture and print its canonical form.")
    add_config_args(validate)
    validate.add_argument("--arch", required=True, metavar="FILE_OR_JSON", help="arch.json or inline JSON")
    validate.set_defaults(func=_validate)
    cost = sub.add_parser("cost", help="print params and MACs (and predicted latency) of an architecture",
                          description="Analytic parameters and MACs (DESIGN 4), and the latency "
                          "model's predicted latency in ms per batch when the config has a latency "
                          "model file (latency.model, default <output_dir>/latency/latency.json); "
                          'the last line is {"params": ..., "macs": ..., ["latency_ms": ...]}.')
    add_config_args(cost)
    cost.add_argument("--arch", required=True, metavar="FILE_OR_JSON", help="arch.json or inline JSON")
    cost.set_defaults(func=_cost)


def num_classes(cfg: Config) -> int:
    """`data.num_classes`, else the class folders of `data.root/train`, else 1000 (ImageNet)."""
    if cfg.data.num_classes:
        return cfg.data.num_classes
    train = Path(cfg.data.root).expanduser() / "train" if cfg.data.root else None
    if train is not None and train.is_dir():
        classes = sum(1 for p in train.iterdir() if p.is_dir())
        if classes:
            return classes
    return 1000


def _sample(args: argparse.Namespace) -> None:
    from vitas.supernet.space import space_from_config

    if args.n < 1:
        raise UserError(f"-n must be at least 1, got {args.n}")
    space = space_from_config(config_from_args(args))
    rng = random.Random(args.seed)
    for _ in range(args.n):
        print(json.dumps(space.canonical(space.sample(rng))))


def _validate(args: argparse.Namespace) -> None:
    from vitas.supernet.space import load_arch, space_from_config

    space = space_from_config(config_from_args(args))
    print(json.dumps(space.validate(load_arch(args.arch))))


def _cost(args: argparse.Namespace) -> None:
    from vitas.inference.latency import load_for_config, model_path
    from vitas.supernet.space import load_arch, space_from_config

    cfg = config_from_args(args)
    space = space_from_config(cfg)
    arch = space.validate(load_arch(args.arch))
    cost = space.cost(arch, num_classes(cfg))
    report = {"params": cost.params, "macs": cost.macs}
    if model_path(cfg).is_file():
        model, _ = load_for_config(cfg, num_classes(cfg))
        report["latency_ms"] = model.predict(arch)
    print(json.dumps(report))
