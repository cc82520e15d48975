"""Seconds per architecture of every training-free proxy on a DeiT-Ti-sized ViT at 224 px, each
beside its floor.

Each proxy is timed through `zoo.compute_proxies([name], ...)` on a subnet of a superformer with
the default `proxy.*` settings (5 re-drawn initialisations; re-initialisation and extraction
included), and its floor is the passes it cannot avoid, timed in the same run on the extracted
model (per initialisation):
- length_distortion: one forward of 20 images (10 angles x 2 central-difference offsets);
- curvature: one float64 forward of 30 images (10 angles x 3 offsets);
- ntk_condition: 16 single-image forward+backward passes (every init: As-ViT averages kappa);
- snip, zico (one pass serves both): forward+backward of 2 batches of 8 images;
- synflow, dss (one pass serves both): one float64 single-image forward+backward;
- nwot: one forward of 16 images;
- params, macs: analytic, no floor.
The search's pair (L^E + kappa, `proxy.names` default) is timed too, against the sum of its
floors (target ratio <= 1.5). Prints a table and writes bench/results/proxy_cost.json
(BENCH_REPEATS runs, interleaved, best of each; BENCH_THREADS sets torch's thread count).
As-ViT's seed topology at 224 px (its own `AsViT`, scored as `search.scoring.proxy` and
`vitas scale` score it) is timed the same way, the search pair against the same floors, with the
NTK by per-image loop (`yamls/asvit-imagenet.yaml`) and by vmap: bench/results/proxy_cost_asvit.json
(`python bench/proxy_cost.py asvit` runs only this case).
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from vitas.core.config import ProxyConfig, SpaceConfig
from vitas.search.proxies import measures as P
from vitas.search.proxies.zoo import NAMES, compute_proxies
from vitas.supernet.asvit import AsViT
from vitas.supernet.model import Superformer
from vitas.supernet.space import SearchSpace, load_arch

DEIT_TI = {"patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": [3] * 12,
           "attn_dim": [192] * 12, "mlp_dim": [768] * 12}
TARGET = 1.5
REPEATS = int(os.environ.get("BENCH_REPEATS", "2"))
# One thread by default: on a shared 2-core machine, two OpenMP threads per process spin against
# other processes and single-image passes slow down 2-10x at random (BENCH_THREADS=0: torch's own).
THREADS = int(os.environ.get("BENCH_THREADS", "1"))
SEARCH_PAIR = ("length_distortion", "ntk_condition")


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def floors(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: ProxyConfig
           ) -> dict[str, Optional[Callable[[], None]]]:
    """The unavoidable passes of each proxy over all initialisations (None: nothing to pass)."""
    n, side = cfg.inits, images.shape[-1]

    def forward(rows: int, dtype: torch.dtype = torch.float32) -> Callable[[], None]:
        def run() -> None:
            model.to(dtype)
            with torch.no_grad():
                for _ in range(n):
                    model(torch.randn(rows, 3, side, side, dtype=dtype))
            model.float()
        return run

    def ntk() -> None:
        for _ in range(n if cfg.ntk_average else 1):
            for x in images:
                model(x[None]).sum().backward()

    def loss() -> None:
        for _ in range(n):
            for b in range(cfg.zico_batches):
                F.cross_entropy(model(images[b::cfg.zico_batches]), labels[b::cfg.zico_batches]).backward()

    def linearised() -> None:
        model.double()
        for _ in range(n):
            model(torch.ones(1, 3, side, side, dtype=torch.float64)).sum().backward()
        model.float()

    shared = {"snip": loss, "zico": loss, "synflow": linearised, "dss": linearised}
    return {"length_distortion": forward(2 * cfg.thetas), "curvature": forward(3 * cfg.thetas, torch.float64),
            "ntk_condition": ntk, "nwot": forward(len(images)), "params": None, "macs": None, **shared}


def main() -> dict:
    if THREADS:
        torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    space = SearchSpace(SpaceConfig(name="deit-ti", img_size=224, patch_size=[16], embed_dim=[192],
                                    depth=[12], num_heads=[3], head_dim=64, mlp_ratio=[4.0]))
    superformer = Superformer(space, 1000).eval()
    images, labels = torch.randn(16, 3, 224, 224), torch.arange(16) % 1000
    cfg = ProxyConfig()  # the defaults: 5 inits, 10 angles, 16 images, features NTK averaged
    model = superformer.extract(DEIT_TI).eval()
    floor_fns = floors(model, images, labels, cfg)
    ours: dict[str, list[float]] = {n: [] for n in (*NAMES, "search_pair")}
    floor: dict[str, list[float]] = {n: [] for n, fn in floor_fns.items() if fn is not None}
    for _ in range(REPEATS):  # interleaved, so that load from other processes hits both alike
        for name in NAMES:
            if floor_fns[name] is not None:
                floor[name].append(seconds(floor_fns[name]))
                model.zero_grad(set_to_none=True)
            ours[name].append(seconds(lambda: compute_proxies([name], superformer, DEIT_TI, images, cfg, labels)))
        ours["search_pair"].append(seconds(lambda: compute_proxies(SEARCH_PAIR, superformer, DEIT_TI, images, cfg)))
    best = {n: min(v) for n, v in ours.items()}
    best_floor = {n: min(v) for n, v in floor.items()}
    best_floor["search_pair"] = sum(best_floor[n] for n in SEARCH_PAIR)
    per_proxy = {n: {"seconds_per_arch": best[n], "floor_seconds": best_floor.get(n),
                     "ratio": best[n] / best_floor[n] if n in best_floor else None} for n in best}
    pair = per_proxy["search_pair"]
    result = {
        "arch": "DeiT-Ti (192, 12 layers, 3 heads, MLP 768), 224 px, 1000 classes",
        "settings": {"inits": cfg.inits, "thetas": cfg.thetas, "ntk_images": len(images),
                     "ntk_average": cfg.ntk_average, "ntk_output": cfg.ntk_output, "velocity": cfg.velocity,
                     "ntk_method": cfg.ntk_method, "zico_batches": cfg.zico_batches},
        "per_proxy": per_proxy, "runs_seconds": {"proxies": ours, "floors": floor},
        "target_ratio": TARGET, "search_pair_meets_target": pair["ratio"] <= TARGET,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "repeats": REPEATS,
        "as_vit_reference": "12.8 s per topology for L^E alone on a V100 (As-ViT Table 2)",
    }
    print(f"{'proxy':<20} {'s/arch':>8} {'floor s':>8} {'ratio':>6}")
    for name, row in per_proxy.items():
        fl = "-" if row["floor_seconds"] is None else f"{row['floor_seconds']:8.2f}"
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:6.2f}"
        print(f"{name:<20} {row['seconds_per_arch']:8.2f} {fl:>8} {ratio:>6}")
    out = Path(__file__).resolve().parent / "results" / "proxy_cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"search_pair_seconds": pair["seconds_per_arch"], "search_pair_ratio": pair["ratio"],
                      "meets_target": result["search_pair_meets_target"]}))
    return result


ASVIT_SEED = Path(__file__).resolve().parents[1] / "yamls" / "archs" / "asvit-seed.json"


def asvit_main() -> dict:
    """The search pair on As-ViT's seed topology at 224 px against its floors, NTK by loop and vmap."""
    if THREADS:
        torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = AsViT(load_arch(str(ASVIT_SEED)), num_classes=1000, img_size=224).eval()
    images, labels = torch.randn(16, 3, 224, 224), torch.arange(16) % 1000
    settings = {method: ProxyConfig(ntk_method=method) for method in ("loop", "vmap")}
    floor_fns = floors(model, images, labels, settings["loop"])  # the passes do not depend on the method
    ours: dict[str, list[float]] = {m: [] for m in settings}
    floor: list[float] = []
    for _ in range(REPEATS):
        floor.append(sum(seconds(floor_fns[n]) for n in SEARCH_PAIR))
        model.zero_grad(set_to_none=True)
        for method, cfg in settings.items():
            ours[method].append(seconds(lambda: P.proxy_scores(model, None, images, cfg, curvature=False)))
    best_floor = min(floor)
    per_method = {m: {"seconds_per_arch": min(v), "floor_seconds": best_floor, "ratio": min(v) / best_floor}
                  for m, v in ours.items()}
    result = {
        "arch": "As-ViT seed topology 8,2,3|4,1,2|4,1,4|4,1,6|32 at C = 32, one block per stage, 224 px, "
                "1000 classes", "settings": {"inits": 5, "thetas": 10, "ntk_images": len(images), "ntk_average": True},
        "search_pair_by_ntk_method": per_method, "runs_seconds": {"search_pair": ours, "floor": floor},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "repeats": REPEATS,
        "as_vit_reference": "12.8 s per topology for L^E alone on a V100 (As-ViT Table 2)",
    }
    for method, row in per_method.items():
        print(f"As-ViT seed, NTK by {method:<4} {row['seconds_per_arch']:8.2f} s/arch, floor "
              f"{row['floor_seconds']:8.2f} s, ratio {row['ratio']:6.2f}")
    out = Path(__file__).resolve().parent / "results" / "proxy_cost_asvit.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    if sys.argv[1:] != ["asvit"]:
        main()
    asvit_main()
