"""Write the reference files of tests/data/convert/ by running the ORIGINAL AutoFormer and ViTAS code
once (see README.md). Never run by the tests, which only read the files it writes.

    python tests/data/convert/make_reference.py CREAM_AUTOFORMER_DIR VITAS_DIR

CREAM_AUTOFORMER_DIR is microsoft/Cream's `AutoFormer/` folder, VITAS_DIR the root of xiusu/ViTAS.
Weights are random (fixed seed), stored in float16 in the foreign layout; the logits are those
of the original models in float64 on those very values.
"""
from __future__ import annotations

import argparse
import collections.abc
import sys
import types
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


def randomize(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random float16 values for every tensor (LayerNorm weights near 1), loaded into `model`."""
    gen = torch.Generator().manual_seed(seed)
    norms = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    state = {}
    for name, value in model.state_dict().items():
        noise = torch.randn(value.shape, generator=gen, dtype=torch.float64)
        state[name] = ((1.0 if name in norms else 0.0) + 0.2 * noise).to(torch.float16)
    model.load_state_dict({k: v.double() for k, v in state.items()})
    return state


def autoformer(root: Path) -> None:
    """A tiny AutoFormer supernet (32 px, patch 8, super 128 wide, 2 blocks, heads {1, 2} of 64,
    MLP ratio up to 2, relative positions clipped at 2, --gp --change_qkv)."""
    sys.modules["torch._six"] = types.SimpleNamespace(container_abcs=collections.abc)
    sys.path.insert(0, str(root))
    from model.supernet_transformer import Vision_TransformerSuper

    model = Vision_TransformerSuper(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, mlp_ratio=2.0,
                                    qkv_bias=True, num_classes=10, gp=True, relative_position=True,
                                    change_qkv=True, max_relative_position=2).double().eval()
    state = randomize(model, seed=0)
    args = argparse.Namespace(gp=True, change_qkv=True, relative_position=True, max_relative_position=2,
                              post_norm=False, no_abs_pos=False, input_size=32, patch_size=8, nb_classes=10,
                              mode="super", cfg="tiny.yaml", lr=5e-4, opt_betas=None)
    torch.save({"model": state, "epoch": 4, "args": args}, HERE / "autoformer_tiny.pth")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    subnets = [
        {"embed_dim": 128, "depth": 2, "num_heads": [2, 2], "mlp_ratio": [2.0, 2.0]},
        {"embed_dim": 64, "depth": 1, "num_heads": [1], "mlp_ratio": [1.0]},
        {"embed_dim": 96, "depth": 2, "num_heads": [1, 2], "mlp_ratio": [2.0, 1.5]},
        {"embed_dim": 128, "depth": 2, "num_heads": [2, 1], "mlp_ratio": [1.5, 1.0]},
    ]
    logits, params = [], []
    with torch.no_grad():
        for s in subnets:
            config = {"embed_dim": [s["embed_dim"]] * s["depth"], "mlp_ratio": s["mlp_ratio"],
                      "layer_num": s["depth"], "num_heads": s["num_heads"]}
            model.set_sample_config(config)
            logits.append(model(images))
            params.append(int(model.get_sampled_params_numel(config)))
    torch.save({"images": images, "subnets": subnets, "logits": logits, "params": params},
               HERE / "autoformer_tiny_logits.pt")


def vitas(root: Path) -> None:
    """Two tiny ViTAS models at 224 px (ViTAS builds every stem for 224): one like ViTAS-C (no
    net_id), one like ViTAS-A/B (net_id: per-layer heads and widths, an identity layer)."""
    sys.path.insert(0, str(root))
    from core.search_space import init_model

    configs = {
        "block": {"backbone": {"init_stem": [1, 3, [16], [], 46, [], [], True, ["Patch_init"]],
                               "Block": [2, 46, [3], 72, 46, 90, 46, True, ["Block"]],
                               "Norm": [1, 46, [], [], [], [], [], "token", ["Norm"]],
                               "FC": [1, 46, [], [], 10, [], [], False, ["FC"]]},
                  "drop_path_rate": 0.0, "depth": 2},
        "net_id": {"backbone": {"init_stem": [1, 3, [32, 16], [], 48, [], [], True, ["Patch_init"]],
                                "Block": [3, 48, [2, 3, 4, 6], 144, 48, 144, 48, True, ["Block", "id"]],
                                "Norm": [1, 48, [], [], [], [], [], "token", ["Norm"]],
                                "FC": [1, 48, [], [], 10, [], [], False, ["FC"]]},
                   "net_id": "1 0 4 2 0 0 2 1 3 0 0 3 0", "channel_percent": [0.25, 0.5, 0.75, 1.0],
                   "model_len": 6, "drop_path_rate": 0.0, "depth": 3},
    }
    archs = {  # what ViTAS builds from these configs, in vitas's format
        "block": {"patch_size": 16, "embed_dim": 46, "depth": 2, "num_heads": [3, 3], "attn_dim": [24, 24],
                  "mlp_dim": [90, 90]},
        "net_id": {"patch_size": 16, "embed_dim": 36, "depth": 2, "num_heads": [2, 4], "attn_dim": [24, 48],
                   "mlp_dim": [144, 36]},
    }
    small = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    images = small.repeat_interleave(32, dim=2).repeat_interleave(32, dim=3)
    out = {"small_images": small, "archs": archs, "logits": {}}
    for seed, (name, cfg) in enumerate(configs.items()):
        net = init_model(dict(cfg)).double().eval()
        state = randomize(net, seed=10 + seed)
        with torch.no_grad():
            x = images
            for block in net:  # ViTAS's Net.normal_step
                x = block[0](x)
        out["logits"][name] = x
        weights = {f"module.net.{k}": v for k, v in state.items()}
        optimizer = {"state": {}, "param_groups": [{"lr": 1e-3, "weight_decay": 0.05, "betas": (0.9, 0.999),
                                                    "params": list(range(len(weights)))}]}
        torch.save({"epoch": 300, "model": weights, "optimizer": optimizer}, HERE / f"vitas_{name}.pth.tar")
    torch.save(out, HERE / "vitas_logits.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    autoformer(Path(sys.argv[1]).resolve())
    vitas(Path(sys.argv[2]).resolve())
