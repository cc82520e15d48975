"""`vitas export`: write a subnet of a superformer checkpoint, or a retrained model, as a timm folder."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from vitas.core.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `vitas export --checkpoint CKPT [--arch A] OUT_DIR`."""
    parser = subparsers.add_parser(
        "export", help="export a model as a timm folder (config.json + model.safetensors)",
        description="Export a subnet of a superformer checkpoint (with --arch) or a retrained model "
        "as a folder that timm.create_model('local-dir:OUT_DIR', pretrained=True) loads (import "
        "supernet first for non-uniform architectures, which export as vitas_vit, and for As-ViT "
        "models, which export as vitas_asvit).")
    parser.add_argument("--checkpoint", required=True, help="superformer or retrain checkpoint (.pth)")
    parser.add_argument("--arch", metavar="FILE_OR_JSON",
                        help="architecture to extract (required for a superformer checkpoint)")
    parser.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder to write")
    parser.set_defaults(func=_export)


def _data_config(state: dict) -> dict | None:
    """Preprocessing recorded with the exported weights, from the checkpoint's config."""
    from vitas.core.config import config_from_dict

    if "config" not in state:
        return None
    data = config_from_dict(state["config"]).data
    return dict(mean=tuple(data.mean), std=tuple(data.std), interpolation=data.interpolation,
                crop_pct=data.crop_pct)


def _export(args: argparse.Namespace) -> None:
    from vitas.core.checkpoint import load_checkpoint, model_weights
    from vitas.core.config import config_from_dict
    from vitas.supernet.export import export
    from vitas.supernet.model import Superformer
    from vitas.supernet.models import model_from_args
    from vitas.supernet.space import SearchSpace, load_arch

    state = load_checkpoint(args.checkpoint)
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{args.checkpoint} holds no 'model' state")
    if "arch" in state and "model_args" in state:
        static = model_from_args(state["model_args"])  # StaticViT, or AsViT for a hierarchical arch
        if args.arch is not None and load_arch(args.arch) != static.arch:
            raise UserError(f"--arch differs from the architecture recorded in {args.checkpoint}")
        static.load_state_dict(model_weights(state, args.checkpoint, args.ema))
        target = static
    elif "config" in state and "space" in state:
        if args.arch is None:
            raise UserError("--arch is required to export from a superformer checkpoint")
        space = SearchSpace(config_from_dict(state["config"]).space)
        space.check_spec(state["space"], str(args.checkpoint))
        weights = model_weights(state, args.checkpoint, args.ema)
        head = weights.get("head.weight")
        if head is None:
            raise UserError(f"{args.checkpoint}: the model state has no 'head.weight'")
        supernet = Superformer(space, num_classes=head.shape[0])
        try:
            supernet.load_state_dict(weights)
        except RuntimeError as exc:
            raise UserError(f"{args.checkpoint} does not fit the superformer of its space: "
                            f"{str(exc).splitlines()[0]}") from None
        target = (supernet, space.validate(load_arch(args.arch)))
    else:
        raise UserError(f"{args.checkpoint} is neither a superformer checkpoint ('config', 'space') "
                        "nor a retrain checkpoint ('arch', 'model_args')")
    out = export(target, args.out_dir, data_config=_data_config(state))
    config = json.loads((out / "config.json").read_text())
    print(f"exported {config['architecture']} to {out}")
    print(json.dumps({"out_dir": str(out.resolve()), "architecture": config["architecture"],
                      "arch": config["vitas_arch"]}))
