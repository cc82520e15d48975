"""`vitas proxy -c CONFIG --arch FILE_OR_JSON`: As-ViT's training-free proxies of one architecture."""
from __future__ import annotations

import argparse
import json

from vitas.commands._common import add_config_args, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `vitas proxy`."""
    parser = subparsers.add_parser(
        "proxy", help="training-free proxies of an architecture (L^E, NTK condition, curvature)",
        description="Length distortion L^E, NTK condition number and curvature of an architecture "
        "of the config's space at initialisation (As-ViT; options under proxy.*, see "
        "docs/PROXIES.md; in an As-ViT space, space.kind: asvit, on the architecture's own model). "
        "The NTK uses proxy.ntk_images training images of data.root. The last "
        'line of stdout is {"length_distortion", "ntk_condition", "curvature", "valid"}.')
    add_config_args(parser)
    parser.add_argument("--arch", required=True, metavar="FILE_OR_JSON", help="arch.json or inline JSON")
    parser.set_defaults(func=_proxy)


def _proxy(args: argparse.Namespace) -> None:
    from vitas.search.proxies.measures import check_proxy_config
    from vitas.search.scoring.proxy import ProxyScorer
    from vitas.supernet.space import load_arch

    cfg = config_from_args(args)
    check_proxy_config(cfg.proxy)
    scorer = ProxyScorer(cfg, device="cpu")  # flat ViT: a fresh superformer's subnet; As-ViT: its own model
    arch = scorer.space.validate(load_arch(args.arch))
    scores = scorer.compute([arch], curvature=True)[0]
    print(f"architecture: {json.dumps(arch)}")
    shown = {k: "-" if v is None else f"{v:.6g}" for k, v in scores.items() if k != "valid"}
    print(f"  L^E {shown['length_distortion']}  kappa {shown['ntk_condition']}  "
          f"curvature {shown['curvature']}  valid {scores['valid']}")
    print(json.dumps(scores))
