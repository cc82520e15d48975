"""`vitas convert SRC OUT`: a published checkpoint (AutoFormer, NNI, ViTAS, timm/DeiT) as a vitas one."""
from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `vitas convert`."""
    parser = subparsers.add_parser(
        "convert", help="convert a published checkpoint (AutoFormer, NNI, ViTAS, timm/DeiT)",
        description="Detect the layout of SRC from its keys and shapes and write OUT as a vitas "
        "checkpoint: a static model (vitas evaluate, predict, export) or, for an AutoFormer supernet "
        "without --arch, a superformer of the -c space (vitas search with supernet.checkpoint=OUT). "
        "Layouts: autoformer (microsoft/Cream), nni-autoformer, vitas-release (xiusu/ViTAS), timm-vit "
        "(timm and DeiT, distilled too). The last line of stdout is "
        '{"layout", "kind", "out", "params", "arch"}. See docs/CONVERT.md.')
    parser.add_argument("src", metavar="SRC", help="foreign checkpoint (.pth/.pth.tar/.safetensors)")
    parser.add_argument("out", metavar="OUT", help="vitas checkpoint to write")
    parser.add_argument("-c", "--config", help="experiment YAML: the space of an AutoFormer supernet "
                        "(e.g. yamls/autoformer-T.yaml), or the space and data settings to record")
    parser.add_argument("--arch", metavar="FILE_OR_JSON", help="subnet of an AutoFormer supernet, or "
                        "the head counts of a model that does not record them (e.g. yamls/archs/*.json)")
    parser.add_argument("--heads", type=int, metavar="N", help="head count of every layer (ViTAS, timm)")
    parser.add_argument("--layout", metavar="NAME",
                        help="check that SRC is in this layout instead of detecting it")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys")
    parser.set_defaults(func=_convert)


def _convert(args: argparse.Namespace) -> None:
    from vitas.core.config import load_config
    from vitas.inference.convert import convert_file
    from vitas.supernet.space import load_arch

    cfg = load_config(args.config, args.overrides) if args.config or args.overrides else None
    arch = load_arch(args.arch) if args.arch else None
    converted, out = convert_file(args.src, args.out, args.layout, arch, args.heads, cfg)
    ckpt = converted.checkpoint
    what = (f"static model {json.dumps(ckpt['arch'])}" if converted.kind == "static"
            else f"superformer of space {ckpt['space']['name']!r}")
    print(f"{args.src}: {converted.layout.title} -> {what}")
    for note in converted.notes:
        print(f"note: {note}")
    print(json.dumps({"layout": converted.layout.name, "kind": converted.kind, "out": str(out.resolve()),
                      "params": converted.params, "arch": ckpt.get("arch")}))
