"""Overhead of running a subnet inside the superformer, against its extracted static model and
timm's VisionTransformer with the same configuration and weights (forward + backward).

Cases: a DeiT-Ti-sized subnet (192 wide, 12 layers, 3 heads, MLP 768) at 224 px, batch 8, and a
tiny one at 32 px, batch 32, inside a superformer 1.5x wider in every dimension; for each channel
policy (bilateral measured on its right pass; under `cyclic` the DeiT-Ti widths wrap around the
ring, the slowest case). Timing is CPU time on one thread, models round-robin, median kept: this
keeps the ratios steady on a shared machine (wall time there depends on other processes). Targets: active/timm <= 1.10 (left), <= 1.20 (cyclic).
Writes bench/results/subnet_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import timm
import torch

from vitas.core.config import ChannelsConfig, SpaceConfig
from vitas.supernet.export import TIMM_VIT, timm_vit_args
from vitas.supernet.model import Superformer
from vitas.supernet.space import SearchSpace

TARGETS = {"left": 1.10, "bilateral": 1.10, "cyclic": 1.20}
CASES = {  # name: (img_size, patch, batch, base embed, heads, depth, timed repetitions)
    "deit-ti-224": (224, 16, 8, 192, 3, 12, 7),
    "tiny-32": (32, 4, 32, 64, 2, 4, 40),  # ~70 ms a step: more repetitions for a steady median
}


def make_space(policy: str, img: int, patch: int, embed: int, heads: int, depth: int) -> SearchSpace:
    """Widths 0.5x..1.5x of the subnet's in steps of 0.25x: the subnet sits in the middle."""
    steps = [2, 3, 4, 5, 6]
    return SearchSpace(SpaceConfig(
        name=f"bench-{policy}", img_size=img, patch_size=[patch], depth=[depth],
        embed_dim=[embed * s // 4 for s in steps], num_heads=[heads, 2 * heads],
        attn_dim=[embed * s // 4 for s in steps], mlp_dim=[4 * embed * s // 4 for s in steps],
        qk="entangled", channels=ChannelsConfig(policy, policy, policy)))


def fwd_bwd(model: torch.nn.Module, x: torch.Tensor) -> float:
    """CPU seconds of one forward + backward (one thread: CPU time ignores other processes)."""
    start = time.process_time()
    model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return time.process_time() - start


def run_case(name: str, policy: str, reps: int) -> dict:
    img, patch, batch, embed, heads, depth, _ = CASES[name]
    space = make_space(policy, img, patch, embed, heads, depth)
    torch.manual_seed(0)
    supernet = Superformer(space, num_classes=1000).train()
    arch = {"patch_size": patch, "embed_dim": embed, "depth": depth, "num_heads": [heads] * depth,
            "attn_dim": [embed] * depth, "mlp_dim": [4 * embed] * depth}
    side = "right" if policy == "bilateral" else "left"
    supernet.set_active(arch, side=side)
    static = supernet.extract().train()
    vit = timm.create_model(TIMM_VIT, pretrained=False, **timm_vit_args(static.model_args)).train()
    vit.load_state_dict(static.state_dict())
    x = torch.randn(batch, 3, img, img)
    models = {"active": supernet, "static": static, "timm": vit}
    with torch.no_grad():
        ref = vit(x)
        for m in (supernet, static):
            torch.testing.assert_close(m(x), ref, atol=1e-4, rtol=1e-4)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(2):  # warm-up
        for m in models.values():
            fwd_bwd(m, x)
    for _ in range(reps):
        for k, m in models.items():
            times[k].append(fwd_bwd(m, x))
    med = {k: statistics.median(v) for k, v in times.items()}
    wrapped = not supernet.policies["embed"].select(embed, side).contiguous
    return {
        "case": name, "policy": policy, "side": side, "batch": batch, "img_size": img,
        "embed_wraps": wrapped, "seconds": med,
        "active_over_timm": med["active"] / med["timm"], "static_over_timm": med["static"] / med["timm"],
        "active_over_static": med["active"] / med["static"], "target_active_over_timm": TARGETS[policy],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, help="timed repetitions per model (default: per case)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "subnet_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for name in CASES:
        for policy in ("left", "bilateral", "cyclic"):
            r = run_case(name, policy, args.reps or CASES[name][-1])
            results.append(r)
            ok = "ok" if r["active_over_timm"] <= r["target_active_over_timm"] else "MISSED"
            print(f"{name:12s} {policy:9s} active {r['seconds']['active'] * 1e3:7.1f} ms  "
                  f"static {r['seconds']['static'] * 1e3:7.1f} ms  timm {r['seconds']['timm'] * 1e3:7.1f} ms  "
                  f"active/timm {r['active_over_timm']:.3f} (target {r['target_active_over_timm']:.2f} {ok})  "
                  f"static/timm {r['static_over_timm']:.3f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"torch": torch.__version__, "timm": timm.__version__, "threads": torch.get_num_threads(),
               "results": results}
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps({r["case"] + "/" + r["policy"]: round(r["active_over_timm"], 3) for r in results}))


if __name__ == "__main__":
    main()
