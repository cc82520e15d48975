"""How well every training-free proxy, #params, MACs and the proxy ensembles rank the 100
AutoFormer-Ti subnets of ViT-Bench-101 (Auto-Prox, AAAI 2024) on its 7 accuracy targets.

Two steps, both resumable:

    nice -n 10 nohup python bench/proxy_fidelity.py compute --variant scratch > scratch.log &
    nice -n 10 nohup python bench/proxy_fidelity.py compute --variant super > super.log &
    python bench/proxy_fidelity.py report

`compute` scores each architecture with every proxy of `search.proxies.zoo` under the default
`proxy.*` settings (5 re-drawn initialisations, 10 angles, 16 images, As-ViT's NTK on the pooled
features averaged over the inits), at 224 px (the benchmark's `MODEL.IMG_SIZE`, patch 16), and
caches the values per architecture in bench/results/proxy_fidelity_values_<variant>.json
(rewritten atomically after each; a rerun continues). Each target is scored on the architecture that was
trained for it:
- `scratch` (the six `*_base`/`*_kd` targets, trained from scratch): attention width = embedding
  width (head_dim = embed / heads), no relative positions, mean pooling, as the benchmark's
  `AutoFormerSub`; a plain StaticViT re-drawn whole per init.
- `super` (`imagenet_super`, inherited from an AutoFormer supernet): head_dim 64 and relative
  positions, the subnet of this project's AutoFormer-T superformer (yamls/autoformer-T.yaml).
The proxy batch is 16 digits of `vitas data digits` (no image of CIFAR-100, Flowers, Chaoyang or
ImageNet is available here), resized to 224 px without cropping, with their 10 labels and a
10-way head; the head is not searched, so it is the same for every architecture of a target.
#params and MACs are counted with the head each target was trained with (100, 102, 4, 1000).

`report` computes Kendall tau and Spearman rho with 95% bootstrap intervals of every score
against every target, globally and within equal-count MACs bands (`search.ranking.stats`),
top-k overlap and regret, plus two ensembles fixed before any result was seen: `ensemble_rank`
(equal-weight rank aggregation of the seven non-cost proxies in their papers' directions, no
fitting) and `ensemble_ridge` (ridge regression on every proxy, #params and MACs, fitted per
target with 10-fold cross-validation: each architecture is scored by a model that never saw
it). Writes bench/results/proxy_fidelity.json and prints the table.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from vitas.core.checkpoint import write_json
from vitas.core.config import ProxyConfig, load_config
from vitas.core.data import write_digits
from vitas.search.proxies.measures import proxy_batch
from vitas.search.proxies.zoo import NAMES, architecture_cost, compute_proxies
from vitas.supernet.model import Superformer
from vitas.supernet.space import space_from_config
from vitas.supernet.static import StaticViT

REPO = Path(__file__).resolve().parents[1]
DATA = Path("/work/shared/data/vitbench101_autoformer_100.json")
RESULTS = REPO / "bench" / "results"
IMG = 224
CLASSES = {"c100": 100, "flower": 102, "chaoyang": 4, "imagenet": 1000}  # heads the targets trained
PROXY_CLASSES = 10  # the digits' classes: the head the proxies are taken with
log = logging.getLogger("proxy_fidelity")


def target_variant(target: str) -> str:
    """`super` for the supernet-inherited target, `scratch` for the ones trained from scratch."""
    return "super" if target == "imagenet_super" else "scratch"


def scratch_arch(arch: dict) -> dict:
    """The benchmark's from-scratch model: attention width = embedding width in every layer."""
    return dict(arch, attn_dim=[arch["embed_dim"]] * arch["depth"])


def scratch_model(arch: dict, classes: int) -> StaticViT:
    return StaticViT(scratch_arch(arch), num_classes=classes, img_size=IMG, qkv_bias=True, rel_pos=False,
                     pool="mean").eval()


def setup(digits: Path) -> tuple[Any, torch.Tensor, torch.Tensor, Superformer]:
    """The AutoFormer-T config on the digits at 224 px, the proxy batch and the fresh superformer."""
    if not (digits / "train").is_dir():
        write_digits(digits)
    cfg = load_config(REPO / "yamls" / "autoformer-T.yaml",
                      [f"data.root={digits}", f"data.num_classes={PROXY_CLASSES}", "data.crop_pct=1.0"])
    images, labels = proxy_batch(cfg)
    return cfg, images, labels, Superformer(space_from_config(cfg), PROXY_CLASSES).eval()


def compute(variant: str, cache: Path, digits: Path) -> dict:
    """Every proxy of every architecture of `variant` not yet in `cache`, written after each."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    rows = json.loads(DATA.read_text())
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    cfg, images, labels, superformer = setup(digits)
    settings = {"variant": variant, "proxy": ProxyConfig().__dict__ | {"names": list(NAMES)}, "img_size": IMG,
                "images": "digits (vitas data digits), 16, eval transform at 224 px, crop_pct 1.0",
                "proxy_head_classes": PROXY_CLASSES, "torch": torch.__version__}
    if done.get("settings", settings) != settings:
        raise SystemExit(f"{cache} was computed with other settings: {done['settings']}")
    done["settings"] = settings
    values = done.setdefault("values", {})
    for i, row in enumerate(rows):
        if str(i) in values:
            continue
        start = time.perf_counter()
        if variant == "super":
            rec = compute_proxies(NAMES, superformer, row["arch"], images, cfg.proxy, labels)
        else:
            rec = compute_proxies(NAMES, scratch_model(row["arch"], PROXY_CLASSES), None, images, cfg.proxy, labels)
        rec["seconds"] = time.perf_counter() - start
        values[str(i)] = rec
        write_json(done, cache)
        log.info("%s/%d %.1f s valid=%s", variant, i, rec["seconds"], rec["valid"])
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["compute", "report"])
    parser.add_argument("--variant", choices=["scratch", "super"], help="compute: the architectures to score")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the caches and the report")
    parser.add_argument("--digits", type=Path, default=Path(os.environ.get("VITAS_DIGITS", "/tmp/vitas-digits")))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.step == "compute":
        compute(args.variant, args.results / f"proxy_fidelity_values_{args.variant}.json", args.digits)


if __name__ == "__main__":
    main()
