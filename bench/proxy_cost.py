"""Seconds per architecture for the training-free proxies of a DeiT-Ti-sized ViT at 224 px.

Measures `proxy_scores` (L^E over 5 initialisations x 10 angles, NTK condition on 16 images,
including the per-seed re-initialisation and extraction from a superformer) against a floor taken
in the same run on the same extracted model: 5 forward passes of 20 images (the 10 angles x 2
central-difference offsets of each initialisation) plus 16 single-image forward+backward passes.
Target: ratio <= 1.5. Also times the alternatives (NTK per-sample loop vs vmap; L^E by jvp).
Prints a table and writes bench/results/proxy_cost.json (BENCH_REPEATS runs, interleaved, best
of each; BENCH_THREADS sets torch's thread count).
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from vitas.core.config import ProxyConfig, SpaceConfig
from vitas.search.proxies import measures as P
from vitas.supernet.model import Superformer
from vitas.supernet.space import SearchSpace

DEIT_TI = {"patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": [3] * 12,
           "attn_dim": [192] * 12, "mlp_dim": [768] * 12}
TARGET = 1.5
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
# One thread by default: on a shared 2-core machine, two OpenMP threads per process spin against
# other processes and single-image passes slow down 2-10x at random (BENCH_THREADS=0: torch's own).
THREADS = int(os.environ.get("BENCH_THREADS", "1"))


def best_of(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    """Smallest wall time of `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> dict:
    if THREADS:
        torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    space = SearchSpace(SpaceConfig(name="deit-ti", img_size=224, patch_size=[16], embed_dim=[192],
                                    depth=[12], num_heads=[3], head_dim=64, mlp_ratio=[4.0]))
    superformer = Superformer(space, 1000).eval()
    images = torch.randn(16, 3, 224, 224)
    cfg = ProxyConfig()  # fd velocity, vmap NTK, 5 inits, 10 thetas
    model = superformer.extract(DEIT_TI).eval()

    def floor() -> None:
        with torch.no_grad():
            for _ in range(cfg.inits):
                model(torch.randn(2 * cfg.thetas, 3, 224, 224))
        for x in images:
            model(x[None]).sum().backward()

    floors, ours = [], []
    for _ in range(REPEATS):  # interleaved, so that load from other processes hits both alike
        floors.append(best_of(floor, 1))
        model.zero_grad(set_to_none=True)
        ours.append(best_of(lambda: P.proxy_scores(superformer, DEIT_TI, images, cfg, curvature=False), 1))
    floor_s, ours_s = min(floors), min(ours)
    parts = {
        "reinit": best_of(lambda: P.initialised(superformer, DEIT_TI, 0)),
        "extract": best_of(lambda: P.extracted(superformer, DEIT_TI)),
        "length_distortion_fd_one_init": best_of(
            lambda: P.length_distortion(model, (3, 224, 224), 0, cfg, curvature=False)),
        "length_distortion_jvp_one_init": best_of(
            lambda: P.length_distortion(model, (3, 224, 224), 0, dataclasses.replace(cfg, velocity="jvp"),
                                        curvature=False), 1),
        "ntk_vmap": best_of(lambda: P.ntk_spectrum(model, images, "vmap")),
        "ntk_loop": best_of(lambda: P.ntk_spectrum(model, images, "loop")),
        "curvature_fd_float64_one_init": best_of(
            lambda: P.length_distortion(model, (3, 224, 224), 0, cfg, curvature=True), 1),
    }
    result = {
        "arch": "DeiT-Ti (192, 12 layers, 3 heads, MLP 768), 224 px, 1000 classes",
        "settings": {"inits": cfg.inits, "thetas": cfg.thetas, "ntk_images": len(images),
                     "velocity": cfg.velocity, "ntk_method": cfg.ntk_method},
        "seconds_per_arch": ours_s, "floor_seconds": floor_s, "ratio": ours_s / floor_s,
        "runs_seconds": {"proxies": ours, "floor": floors},
        "target_ratio": TARGET, "meets_target": ours_s / floor_s <= TARGET,
        "parts_seconds": parts, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "repeats": REPEATS,
        "as_vit_reference": "12.8 s per topology for L^E alone on a V100 (As-ViT Table 2)",
    }
    print(f"proxies (L^E 5x10 + kappa 16): {ours_s:8.2f} s/arch")
    print(f"floor (5 x fwd20 + 16 x fwd/bwd1): {floor_s:8.2f} s   ratio {ours_s / floor_s:.2f} (target <= {TARGET})")
    for name, secs in parts.items():
        print(f"  {name:<34} {secs:8.2f} s")
    out = Path(__file__).resolve().parent / "results" / "proxy_cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("seconds_per_arch", "floor_seconds", "ratio", "meets_target")}))
    return result


if __name__ == "__main__":
    main()
