"""Published checkpoints converted exactly: AutoFormer, NNI, ViTAS and timm/DeiT layouts.

Each layout is written here as its own code writes it (keys, shapes, qkv interleaving, dtype, the
`args` Namespace) from random weights; its logits are compared, in float64, with a reference
forward written below from the layout's documented maths (independent of vitas's layers), and
with outputs the original AutoFormer and ViTAS code recorded once (tests/data/convert/README.md).
No foreign code is imported or run here.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitas.cli import main
from vitas.core.config import ChannelsConfig, Config, SpaceConfig, config_from_dict, load_config
from vitas.core.errors import UserError
from vitas.inference.convert import convert, convert_file, load_any_checkpoint
from vitas.inference.convert.common import single_arch_space
from vitas.inference.evaluate import evaluate_checkpoint
from vitas.supernet.complexity import arch_cost
from vitas.supernet.checkpoint import read_superformer
from vitas.supernet.model import Superformer
from vitas.supernet.pretrained import check_timm_init, init_from_timm
from vitas.supernet.space import SearchSpace
from vitas.supernet.static import StaticViT

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data" / "convert"
F64 = torch.float64


def rand(gen: torch.Generator, *shape: int, std: float = 0.02, mean: float = 0.0) -> torch.Tensor:
    return mean + std * torch.randn(*shape, generator=gen, dtype=F64)


def images(n: int = 2, size: int = 16, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=F64)


def static_model(ckpt: dict) -> StaticViT:
    model = StaticViT(**ckpt["model_args"]).to(F64).eval()
    model.load_state_dict(ckpt["model"])
    return model


def honour_norm_eps(model: nn.Module, eps: float) -> nn.Module:
    """What Superformer does once it reads space.norm_eps (the lead's wiring): every LayerNorm."""
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = eps
    return model


# ----------------------------------------------------------------------------- reference maths
def ln(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def rel_index(grid: int, reach: int) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoFormer's table rows for every (query, key) token pair: 0 with the class token, else
    the clipped row / column distance (key minus query) shifted by reach + 1."""
    n = grid * grid + 1
    iv, ih = torch.zeros(n, n, dtype=torch.long), torch.zeros(n, n, dtype=torch.long)
    for q in range(1, n):
        for k in range(1, n):
            dv = (k - 1) // grid - (q - 1) // grid
            dh = (k - 1) % grid - (q - 1) % grid
            iv[q, k] = max(-reach, min(reach, dv)) + reach + 1
            ih[q, k] = max(-reach, min(reach, dh)) + reach + 1
    return iv, ih


def reference(model: dict, x: torch.Tensor) -> torch.Tensor:
    """A pre-norm ViT written out: `model` holds the stem, per-layer q/k/v/proj/MLP weights with
    heads, scale and optional relative tables, the eps values and the pooling."""
    p = model["patch"]
    t = F.conv2d(x, model["conv_w"], model["conv_b"], stride=p).flatten(2).transpose(1, 2)
    B = t.shape[0]
    prefix = [model["cls"].expand(B, -1, -1)] + ([model["dist"].expand(B, -1, -1)] if "dist" in model else [])
    t = torch.cat(prefix + [t], dim=1) + model["pos"]
    N = t.shape[1]
    for layer in model["layers"]:
        y = ln(t, *layer["norm1"], model["eps"])
        h = layer["heads"]
        q, k, v = (y @ layer[n][0].T + layer[n][1] for n in ("q", "k", "v"))
        q, k, v = (z.reshape(B, N, h, -1).permute(0, 2, 1, 3) for z in (q, k, v))
        logits = torch.einsum("bhnd,bhmd->bhnm", q, k)
        if "rel_k" in layer:
            iv, ih = layer["rel_index"]
            rk = layer["rel_k"][0][iv] + layer["rel_k"][1][ih]  # (N, N, head_dim)
            logits = logits + torch.einsum("bhnd,nmd->bhnm", q, rk)
        attn = torch.softmax(logits * layer["scale"], dim=-1)
        out = torch.einsum("bhnm,bhmd->bhnd", attn, v)
        if "rel_v" in layer:
            iv, ih = layer["rel_index"]
            rv = layer["rel_v"][0][iv] + layer["rel_v"][1][ih]
            out = out + torch.einsum("bhnm,nmd->bhnd", attn, rv)
        out = out.permute(0, 2, 1, 3).reshape(B, N, -1)
        t = t + out @ layer["proj"][0].T + layer["proj"][1]
        y = ln(t, *layer["norm2"], model["eps"])
        t = t + gelu(y @ layer["fc1"][0].T + layer["fc1"][1]) @ layer["fc2"][0].T + layer["fc2"][1]
    t = ln(t, *model["norm"], model["final_eps"])
    if "dist" in model:
        return (t[:, 0] @ model["head"][0].T + model["head"][1] + t[:, 1] @ model["head_dist"][0].T
                + model["head_dist"][1]) / 2
    pooled = t[:, 1:].mean(1) if model["pool"] == "mean" else t[:, 0]
    return pooled @ model["head"][0].T + model["head"][1]


# ----------------------------------------------------------------------------- AutoFormer layout
AF = dict(S=128, M=256, depth=2, patch=4, grid=4, reach=2, classes=5)


def autoformer_space(**changes) -> SpaceConfig:
    base = dict(name="af-test", img_size=16, patch_size=[4], embed_dim=[64, 96, 128], depth=[1, 2],
                num_heads=[1, 2], head_dim=64, mlp_ratio=[1.0, 2.0], super_embed_dim=128, super_depth=2,
                super_attn_dim=128, super_mlp_dim=256, rel_pos=True, rel_pos_max=2, pool="mean", norm_eps=1e-5,
                qkv_bias_slice="prefix")
    return SpaceConfig(**{**base, **changes})


def autoformer_file(path: Path, seed: int = 0, dtype: torch.dtype = F64, args: bool = True, **sizes) -> dict:
    """An AutoFormer supernet file as Cream's supernet_train.py saves it (model, optimizer and
    scheduler state, epoch, args)."""
    s = {**AF, **sizes}
    S, M, g = s["S"], s["M"], torch.Generator().manual_seed(seed)
    w = {"patch_embed_super.proj.weight": rand(g, S, 3, s["patch"], s["patch"], std=0.1),
         "patch_embed_super.proj.bias": rand(g, S), "cls_token": rand(g, 1, 1, S),
         "pos_embed": rand(g, 1, s["grid"] ** 2 + 1, S)}
    for i in range(s["depth"]):
        b = f"blocks.{i}."
        w.update({b + "attn.qkv.weight": rand(g, 3 * S, S), b + "attn.qkv.bias": rand(g, 3 * S),
                  b + "attn.proj.weight": rand(g, S, S), b + "attn.proj.bias": rand(g, S)})
        for rel in ("k", "v"):
            for d in ("v", "h"):
                w[f"{b}attn.rel_pos_embed_{rel}.embeddings_table_{d}"] = rand(g, 2 * s["reach"] + 2, 64, std=0.1)
        for norm in ("attn_layer_norm", "ffn_layer_norm"):
            w[f"{b}{norm}.weight"], w[f"{b}{norm}.bias"] = rand(g, S, mean=1.0), rand(g, S)
        w.update({b + "fc1.weight": rand(g, M, S), b + "fc1.bias": rand(g, M),
                  b + "fc2.weight": rand(g, S, M), b + "fc2.bias": rand(g, S)})
    w.update({"norm.weight": rand(g, S, mean=1.0), "norm.bias": rand(g, S),
              "head.weight": rand(g, s["classes"], S), "head.bias": rand(g, s["classes"])})
    w = {k: v.to(dtype) for k, v in w.items()}
    state = {"model": w, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
             "lr_scheduler": {"t_initial": 500, "base_values": [1e-3]}, "epoch": 9, "scaler": {"scale": 65536.0}}
    if args:
        state["args"] = argparse.Namespace(gp=True, change_qkv=True, relative_position=True,
                                           max_relative_position=s["reach"], post_norm=False, no_abs_pos=False,
                                           input_size=s["grid"] * s["patch"], patch_size=s["patch"],
                                           cfg="supernet-tiny.yaml", lr=1e-3, opt_betas=None)
    torch.save(state, path)
    return w


def autoformer_reference(w: dict, arch: dict, x: torch.Tensor, reach: int = AF["reach"]) -> torch.Tensor:
    """AutoFormer's subnet maths: prefixes of every super tensor; q, k, v weight rows 3c, 3c+1,
    3c+2 of the first 3a rows; bias[:3a] cut into q, k, v chunks of a; tables shared by heads,
    both terms scaled by 64^-0.5; LayerNorm eps 1e-5; mean of the patch tokens."""
    E = arch["embed_dim"]
    w = {k: v.to(F64) for k, v in w.items()}
    grid = int(round((w["pos_embed"].shape[1] - 1) ** 0.5))
    model = {"patch": arch["patch_size"], "conv_w": w["patch_embed_super.proj.weight"][:E],
             "conv_b": w["patch_embed_super.proj.bias"][:E], "cls": w["cls_token"][..., :E],
             "pos": w["pos_embed"][..., :E], "eps": 1e-5, "final_eps": 1e-5, "pool": "mean",
             "norm": (w["norm.weight"][:E], w["norm.bias"][:E]), "head": (w["head.weight"][:, :E], w["head.bias"]),
             "layers": []}
    for i, (h, m) in enumerate(zip(arch["num_heads"], arch["mlp_dim"])):
        b, a = f"blocks.{i}.", 64 * h
        qkv_w, qkv_b = w[b + "attn.qkv.weight"][:3 * a, :E], w[b + "attn.qkv.bias"][:3 * a]
        tables = lambda r: (w[f"{b}attn.rel_pos_embed_{r}.embeddings_table_v"],  # noqa: E731
                            w[f"{b}attn.rel_pos_embed_{r}.embeddings_table_h"])
        model["layers"].append({
            "heads": h, "scale": 64 ** -0.5, "rel_index": rel_index(grid, reach),
            "q": (qkv_w[0::3], qkv_b[:a]), "k": (qkv_w[1::3], qkv_b[a:2 * a]), "v": (qkv_w[2::3], qkv_b[2 * a:]),
            "rel_k": tables("k"), "rel_v": tables("v"),
            "proj": (w[b + "attn.proj.weight"][:E, :a], w[b + "attn.proj.bias"][:E]),
            "norm1": (w[b + "attn_layer_norm.weight"][:E], w[b + "attn_layer_norm.bias"][:E]),
            "norm2": (w[b + "ffn_layer_norm.weight"][:E], w[b + "ffn_layer_norm.bias"][:E]),
            "fc1": (w[b + "fc1.weight"][:m, :E], w[b + "fc1.bias"][:m]),
            "fc2": (w[b + "fc2.weight"][:E, :m], w[b + "fc2.bias"][:E])})
    return reference(model, x)


def af_arch(embed: int, heads: list[int], ratios: list[float]) -> dict:
    return {"patch_size": 4, "embed_dim": embed, "depth": len(heads), "num_heads": heads,
            "attn_dim": [64 * h for h in heads], "mlp_dim": [int(embed * r) for r in ratios]}


AF_SUBNETS = [af_arch(128, [2, 2], [2.0, 2.0]), af_arch(64, [1], [1.0]), af_arch(96, [1, 2], [2.0, 1.0]),
              af_arch(128, [2, 1], [1.0, 2.0])]
AF_MAX_HEADS = [af_arch(128, [2, 2], [2.0, 1.0]), af_arch(64, [2], [1.0]), af_arch(96, [2, 2], [1.0, 2.0])]


@pytest.mark.parametrize("arch", AF_SUBNETS, ids=lambda a: f"E{a['embed_dim']}-h{a['num_heads']}")
def test_autoformer_subnet_converts_exactly(tmp_path: Path, arch: dict):
    w = autoformer_file(tmp_path / "supernet.pth")
    converted = convert(tmp_path / "supernet.pth", arch=arch)
    assert (converted.layout.name, converted.kind) == ("autoformer", "static")
    ckpt = converted.checkpoint
    assert ckpt["model_args"]["norm_eps"] == ckpt["model_args"]["final_norm_eps"] == 1e-5
    x = images()
    with torch.no_grad():
        got, want = static_model(ckpt)(x), autoformer_reference(w, arch, x)
    assert (got - want).abs().max() < 1e-6
    # the options are what makes it exact: timm's eps moves these small-weight logits visibly
    wrong = StaticViT(**{**ckpt["model_args"], "norm_eps": 1e-6, "final_norm_eps": 1e-6}).to(F64).eval()
    wrong.load_state_dict(ckpt["model"])
    with torch.no_grad():
        assert (wrong(x) - want).abs().max() > 1e-6


@pytest.mark.parametrize("arch,layout", [(a, "shared") for a in AF_MAX_HEADS]
                         + [(AF_MAX_HEADS[-1], "norms"), (AF_MAX_HEADS[-1], "blocks")],
                         ids=lambda a: f"E{a['embed_dim']}-d{a['depth']}" if isinstance(a, dict) else a)
def test_autoformer_supernet_becomes_a_superformer(tmp_path: Path, arch: dict, layout: str):
    """Every subnet computes what AutoFormer's does, also when the space keeps its LayerNorms or
    its blocks per patch size (under other keys: AutoFormer's one patch size)."""
    w = autoformer_file(tmp_path / "supernet.pth")
    cfg = Config(space=autoformer_space(**({} if layout == "shared" else {layout: "per_patch"})))
    converted = convert(tmp_path / "supernet.pth", cfg=cfg)
    ckpt = converted.checkpoint
    assert converted.kind == "superformer" and ckpt["epoch"] == 10 and ckpt["ema"] is None
    space = SearchSpace(config_from_dict(ckpt["config"]).space)
    space.check_spec(ckpt["space"])
    model = honour_norm_eps(Superformer(space, ckpt["num_classes"]).to(F64).eval(), 1e-5)
    model.load_state_dict(ckpt["model"])
    model.set_active(arch)
    x = images()
    with torch.no_grad():
        assert (model(x) - autoformer_reference(w, arch, x)).abs().max() < 1e-6


def test_converted_superformer_is_read_like_a_trained_one(tmp_path: Path):
    autoformer_file(tmp_path / "supernet.pth")
    cfg = Config(space=autoformer_space())
    converted, out = convert_file(tmp_path / "supernet.pth", tmp_path / "superformer.pth", cfg=cfg)
    cfg.supernet.checkpoint = str(out)
    model, info = read_superformer(cfg, SearchSpace(cfg.space), num_classes=5)  # what search reads
    assert (info.weights, info.epoch, info.num_classes) == ("raw", 10, 5)
    assert all(torch.equal(model.state_dict()[k], v.float()) for k, v in converted.checkpoint["model"].items())


def test_autoformer_superformer_fewer_heads(tmp_path: Path):
    w = autoformer_file(tmp_path / "supernet.pth")
    ckpt = convert(tmp_path / "supernet.pth", cfg=Config(space=autoformer_space())).checkpoint
    model = honour_norm_eps(Superformer(SearchSpace(autoformer_space()), 5).to(F64).eval(), 1e-5)
    model.load_state_dict(ckpt["model"])
    arch = af_arch(96, [1, 2], [2.0, 1.0])
    model.set_active(arch)
    x = images()
    with torch.no_grad():
        assert (model(x) - autoformer_reference(w, arch, x)).abs().max() < 1e-6


def test_superformer_reads_norm_eps_from_its_space():
    model = Superformer(SearchSpace(autoformer_space()), 5)
    assert {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)} == {1e-5}


def test_autoformer_file_of_another_space_is_refused(tmp_path: Path):
    autoformer_file(tmp_path / "s.pth", S=192, M=384)  # an AutoFormer-S-like file into the T-like space
    with pytest.raises(UserError, match=r"'patch_embed_super.proj.weight'.*192.*128.*another space"):
        convert(tmp_path / "s.pth", cfg=Config(space=autoformer_space()))
    autoformer_file(tmp_path / "g.pth", grid=5)  # a 5x5 position table (20 px)
    with pytest.raises(UserError, match=r"'pos_embed' holds 1 \+ 5x5 positions"):
        convert(tmp_path / "g.pth", cfg=Config(space=autoformer_space()))
    autoformer_file(tmp_path / "r.pth", reach=3)
    with pytest.raises(UserError, match=r"embeddings_table_v' reaches distance 3"):
        convert(tmp_path / "r.pth", cfg=Config(space=autoformer_space()))
    autoformer_file(tmp_path / "ok.pth")
    with pytest.raises(UserError, match=r"space.channels.embed is 'cyclic'"):
        convert(tmp_path / "ok.pth", cfg=Config(space=autoformer_space(channels=ChannelsConfig(embed="cyclic"))))
    with pytest.raises(UserError, match=r"space.norm_eps is None"):
        convert(tmp_path / "ok.pth", cfg=Config(space=autoformer_space(norm_eps=None)))
    with pytest.raises(UserError, match=r"give its space with -c"):
        convert(tmp_path / "ok.pth")
    with pytest.raises(UserError, match=r"--arch layer 0 .* not an AutoFormer subnet"):
        convert(tmp_path / "ok.pth", arch={**af_arch(64, [1], [1.0]), "attn_dim": [32]})


def test_autoformer_needs_its_args(tmp_path: Path):
    autoformer_file(tmp_path / "bare.pth", args=False)
    with pytest.raises(UserError, match=r"no 'args' entry"):
        convert(tmp_path / "bare.pth", arch=af_arch(64, [1], [1.0]))


def test_recorded_autoformer_outputs():
    """tests/data/convert: a float16 supernet and logits the original AutoFormer code computed."""
    ref = torch.load(DATA / "autoformer_tiny_logits.pt", weights_only=True)
    for sub, logits, params in zip(ref["subnets"], ref["logits"], ref["params"]):
        E = sub["embed_dim"]
        arch = {"patch_size": 8, "embed_dim": E, "depth": sub["depth"], "num_heads": sub["num_heads"],
                "attn_dim": [64 * h for h in sub["num_heads"]], "mlp_dim": [int(E * r) for r in sub["mlp_ratio"]]}
        ckpt = convert(DATA / "autoformer_tiny.pth", arch=arch).checkpoint
        assert {v.dtype for v in ckpt["model"].values()} == {torch.float16}  # the file's dtype is kept
        model = static_model(ckpt)
        with torch.no_grad():
            assert (model(ref["images"]) - logits).abs().max() < 1e-6, sub  # AutoFormer's GELU runs in float32
        assert sum(p.numel() for p in model.parameters()) == params  # AutoFormer's own count


# ----------------------------------------------------------------------------- NNI layout
def nni_file(path: Path, heads: list[int], embed: int = 64, mlp: tuple[int, ...] = (128, 64), seed: int = 1) -> dict:
    """NNI's frozen AutoFormer subnet state dict (16 px, patch 4, tables reaching the grid side 4)."""
    g = torch.Generator().manual_seed(seed)
    E = embed
    w = {"patch_embed.weight": rand(g, E, 3, 4, 4, std=0.1), "patch_embed.bias": rand(g, E),
         "cls_token.cls_token": rand(g, 1, 1, E), "pos_embed.pos_embed": rand(g, 1, 17, E)}
    for i, (h, m) in enumerate(zip(heads, mlp)):
        b, a = f"blocks.{i}.", 64 * h
        for n in ("q", "k", "v"):
            w[f"{b}attn.{n}.weight"], w[f"{b}attn.{n}.bias"] = rand(g, a, E), rand(g, a)
        w[b + "attn.proj.weight"], w[b + "attn.proj.bias"] = rand(g, E, a), rand(g, E)
        for r in ("k", "v"):
            for d in ("v", "h"):
                w[f"{b}attn.rel_pos_embed_{r}.embeddings_table_{d}"] = rand(g, 10, 64, std=0.1)
        for norm in ("attn_layer_norm", "ffn_layer_norm"):
            w[f"{b}{norm}.weight"], w[f"{b}{norm}.bias"] = rand(g, E, mean=1.0), rand(g, E)
        w.update({b + "fc1.weight": rand(g, m, E), b + "fc1.bias": rand(g, m),
                  b + "fc2.weight": rand(g, E, m), b + "fc2.bias": rand(g, E)})
    w.update({"norm.weight": rand(g, E, mean=1.0), "norm.bias": rand(g, E),
              "head.weight": rand(g, 7, E), "head.bias": rand(g, 7)})
    torch.save(w, path)
    return w


def nni_reference(w: dict, heads: list[int], x: torch.Tensor) -> torch.Tensor:
    """NNI's AutoFormer maths: separate q, k, v; 64-wide heads; tables reaching 4; eps 1e-5; mean."""
    def tables(b: str, r: str) -> tuple[torch.Tensor, torch.Tensor]:
        return w[f"{b}attn.rel_pos_embed_{r}.embeddings_table_v"], w[f"{b}attn.rel_pos_embed_{r}.embeddings_table_h"]

    model = {"patch": 4, "conv_w": w["patch_embed.weight"], "conv_b": w["patch_embed.bias"],
             "cls": w["cls_token.cls_token"], "pos": w["pos_embed.pos_embed"], "eps": 1e-5, "final_eps": 1e-5,
             "pool": "mean", "norm": (w["norm.weight"], w["norm.bias"]), "head": (w["head.weight"], w["head.bias"]),
             "layers": []}
    for i, h in enumerate(heads):
        b = f"blocks.{i}."
        pair = lambda name: (w[name + ".weight"], w[name + ".bias"])  # noqa: E731
        model["layers"].append({
            "heads": h, "scale": 64 ** -0.5, "rel_index": rel_index(4, 4),
            "q": pair(b + "attn.q"), "k": pair(b + "attn.k"), "v": pair(b + "attn.v"), "proj": pair(b + "attn.proj"),
            "rel_k": tables(b, "k"), "rel_v": tables(b, "v"),
            "norm1": pair(b + "attn_layer_norm"), "norm2": pair(b + "ffn_layer_norm"),
            "fc1": pair(b + "fc1"), "fc2": pair(b + "fc2")})
    return reference(model, x)


@pytest.mark.parametrize("heads", [[1, 2], [2, 1]])
def test_nni_autoformer_converts_exactly(tmp_path: Path, heads: list[int]):
    w = nni_file(tmp_path / "nni.pth", heads)
    converted = convert(tmp_path / "nni.pth")
    assert converted.layout.name == "nni-autoformer"
    assert converted.checkpoint["arch"]["num_heads"] == heads  # from the tables' 64-wide heads
    x = images()
    with torch.no_grad():
        assert (static_model(converted.checkpoint)(x) - nni_reference(w, heads, x)).abs().max() < 1e-6


# ----------------------------------------------------------------------------- ViTAS layout
def vitas_file(path: Path, layers: list, embed: int = 30, seed: int = 2) -> dict:
    """A ViTAS retrained model as its trainer saves it: {epoch, model (DDP `module.net.` keys),
    optimizer}. `layers` holds (attn width, mlp width) per block, None for an identity layer."""
    g = torch.Generator().manual_seed(seed)
    E, pre = embed, "module.net.backbone_"
    stem = pre + "init_stem_Patch_init_0.0."
    w = {stem + "cls_token": rand(g, 1, 1, E), stem + "pos_embed": rand(g, 1, 17, E),
         stem + "patch_embed.proj.weight": rand(g, E, 3, 4, 4, std=0.1), stem + "patch_embed.proj.bias": rand(g, E)}
    for i, layer in enumerate(layers):
        if layer is None:
            continue
        a, m = layer
        b = f"{pre}Block_Block_{i}.0."
        w.update({b + "norm1.weight": rand(g, E, mean=1.0), b + "norm1.bias": rand(g, E),
                  b + "attn.qkv.weight": rand(g, 3 * a, E), b + "attn.qkv.bias": rand(g, 3 * a),
                  b + "attn.proj.weight": rand(g, E, a), b + "attn.proj.bias": rand(g, E),
                  b + "norm2.weight": rand(g, E, mean=1.0), b + "norm2.bias": rand(g, E),
                  b + "mlp.fc1.weight": rand(g, m, E), b + "mlp.fc1.bias": rand(g, m),
                  b + "mlp.fc2.weight": rand(g, E, m), b + "mlp.fc2.bias": rand(g, E)})
    w.update({pre + "Norm_Norm_0.0.weight": rand(g, E, mean=1.0), pre + "Norm_Norm_0.0.bias": rand(g, E),
              pre + "FC_FC_0.0.module.0.weight": rand(g, 6, E), pre + "FC_FC_0.0.module.0.bias": rand(g, 6)})
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                 "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": list(range(len(w)))}]}
    torch.save({"epoch": 300, "model": w, "optimizer": optimizer}, path)
    return w


def vitas_reference(w: dict, layers: list, heads: list[int], x: torch.Tensor) -> torch.Tensor:
    """ViTAS's maths: timm's [q; k; v] rows, logits scaled by (embed // heads)^-0.5, block
    LayerNorms eps 1e-6, the final one 1e-5, class token."""
    pre = "module.net.backbone_"
    stem = pre + "init_stem_Patch_init_0.0."
    E = w[stem + "cls_token"].shape[-1]
    model = {"patch": 4, "conv_w": w[stem + "patch_embed.proj.weight"], "conv_b": w[stem + "patch_embed.proj.bias"],
             "cls": w[stem + "cls_token"], "pos": w[stem + "pos_embed"], "eps": 1e-6, "final_eps": 1e-5,
             "pool": "cls", "norm": (w[pre + "Norm_Norm_0.0.weight"], w[pre + "Norm_Norm_0.0.bias"]),
             "head": (w[pre + "FC_FC_0.0.module.0.weight"], w[pre + "FC_FC_0.0.module.0.bias"]), "layers": []}
    kept = [(i, layer) for i, layer in enumerate(layers) if layer is not None]
    for (i, (a, _)), h in zip(kept, heads):
        b = f"{pre}Block_Block_{i}.0."
        pair = lambda name: (w[name + ".weight"], w[name + ".bias"])  # noqa: E731
        qkv_w, qkv_b = w[b + "attn.qkv.weight"], w[b + "attn.qkv.bias"]
        model["layers"].append({
            "heads": h, "scale": (E // h) ** -0.5,
            "q": (qkv_w[:a], qkv_b[:a]), "k": (qkv_w[a:2 * a], qkv_b[a:2 * a]), "v": (qkv_w[2 * a:], qkv_b[2 * a:]),
            "proj": pair(b + "attn.proj"), "norm1": pair(b + "norm1"), "norm2": pair(b + "norm2"),
            "fc1": pair(b + "mlp.fc1"), "fc2": pair(b + "mlp.fc2")})
    return reference(model, x)


def test_vitas_release_converts_exactly(tmp_path: Path):
    layers = [(24, 60), None, (36, 30), (24, 90)]  # an identity layer at 1, like ViTAS-A/B
    heads = [2, 3, 4]
    w = vitas_file(tmp_path / "epoch_299_ckpt.pth.tar", layers)
    arch = {"num_heads": heads}
    converted = convert(tmp_path / "epoch_299_ckpt.pth.tar", arch=arch)
    ckpt = converted.checkpoint
    assert converted.layout.name == "vitas-release"
    assert ckpt["arch"] == {"patch_size": 4, "embed_dim": 30, "depth": 3, "num_heads": heads,
                            "attn_dim": [24, 36, 24], "mlp_dim": [60, 30, 90]}
    assert config_from_dict(ckpt["config"]).data.interpolation == "bilinear"
    x = images()
    want = vitas_reference(w, layers, heads, x)
    with torch.no_grad():
        assert (static_model(ckpt)(x) - want).abs().max() < 1e-6
    for quirk in ({"attn_scale": "head_dim"}, {"final_norm_eps": 1e-6}):  # each quirk is needed
        wrong = StaticViT(**{**ckpt["model_args"], **quirk}).to(F64).eval()
        wrong.load_state_dict(ckpt["model"])
        with torch.no_grad():
            assert (wrong(x) - want).abs().max() > 1e-6, quirk


def test_vitas_release_needs_head_counts(tmp_path: Path):
    vitas_file(tmp_path / "v.pth.tar", [(24, 60)])
    with pytest.raises(UserError, match=r"does not record its head counts.*--heads"):
        convert(tmp_path / "v.pth.tar")
    with pytest.raises(UserError, match=r"--arch field 'embed_dim' is 32.*give 30"):
        convert(tmp_path / "v.pth.tar", arch={"embed_dim": 32, "num_heads": [2]})
    assert convert(tmp_path / "v.pth.tar", heads=3).checkpoint["arch"]["num_heads"] == [3]


def test_recorded_vitas_outputs():
    """tests/data/convert: ViTAS models built by the original code and the logits it computed."""
    ref = torch.load(DATA / "vitas_logits.pt", weights_only=True)
    x = ref["small_images"].repeat_interleave(32, dim=2).repeat_interleave(32, dim=3)  # ViTAS is 224 px only
    for name, arch in ref["archs"].items():
        ckpt = convert(DATA / f"vitas_{name}.pth.tar", arch={"num_heads": arch["num_heads"]}).checkpoint
        assert ckpt["arch"] == arch
        with torch.no_grad():
            assert (static_model(ckpt)(x) - ref["logits"][name]).abs().max() < 1e-6, name


# ----------------------------------------------------------------------------- timm / DeiT layout
def timm_model(distilled: bool = False, embed: int = 128, classes: int = 10, seed: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    model = cls(img_size=16, patch_size=4, embed_dim=embed, depth=2, num_heads=embed // 64, mlp_ratio=2.0,
                num_classes=classes).to(F64).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("distilled", [False, True])
def test_timm_deit_converts_exactly(tmp_path: Path, distilled: bool):
    model = timm_model(distilled)
    torch.save({"model": model.state_dict()}, tmp_path / "deit.pth")  # DeiT's release format
    converted = convert(tmp_path / "deit.pth")
    assert converted.layout.name == "timm-vit" and converted.checkpoint["model_args"]["distilled"] == distilled
    x = images()
    with torch.no_grad():
        assert (static_model(converted.checkpoint)(x) - model(x)).abs().max() < 1e-12


def test_timm_safetensors_and_odd_heads(tmp_path: Path):
    from safetensors.torch import save_file

    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=48, depth=1, num_heads=4, num_classes=3).eval()
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(UserError, match=r"width 48 is not a multiple of 64.*--heads"):
        convert(tmp_path / "model.safetensors")
    ckpt = convert(tmp_path / "model.safetensors", heads=4).checkpoint
    x = images().float()
    with torch.no_grad():
        assert torch.allclose(static_model(ckpt).float()(x), model(x), atol=1e-6)


def test_timm_with_unknown_parts_is_refused(tmp_path: Path):
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=1, num_heads=1, num_classes=3,
                              init_values=1e-5)  # layer scale
    torch.save({"model": model.state_dict()}, tmp_path / "ls.pth")
    with pytest.raises(UserError, match=r"no place for tensor\(s\) blocks.0.ls1.gamma, blocks.0.ls2.gamma"):
        convert(tmp_path / "ls.pth")


# ----------------------------------------------------------------------------- superformer from DeiT
def deit_space(policy: str, qk: str = "entangled", **changes) -> SearchSpace:
    """A DeiT-like space (16 px, patch 4) whose largest subnet is the 128-wide timm model; the
    super sizes exceed the largest choice, so a cyclic window wraps around its ring."""
    base = dict(name="deit-like", img_size=16, patch_size=[4, 8], embed_dim=[64, 128], depth=[1, 2],
                num_heads=[1, 2], attn_dim=[64, 128], mlp_dim=[128, 256], super_embed_dim=160, super_attn_dim=160,
                super_mlp_dim=320, qk=qk, channels=ChannelsConfig(policy, policy, policy))
    return SearchSpace(SpaceConfig(**{**base, **changes}))


@pytest.mark.parametrize("policy,qk,layout", [("left", "entangled", "shared"), ("cyclic", "entangled", "shared"),
                                              ("cyclic", "private", "shared"), ("bilateral", "entangled", "shared"),
                                              ("cyclic", "private", "norms"), ("cyclic", "entangled", "blocks")])
def test_superformer_starts_as_deit(tmp_path: Path, policy: str, qk: str, layout: str):
    deit = timm_model()
    torch.save({"model": deit.state_dict()}, tmp_path / "deit-tiny-like.pth")
    space = deit_space(policy, qk, **({} if layout == "shared" else {layout: "per_patch"}))
    model = Superformer(space, 10).to(F64).eval()
    notes = init_from_timm(model, tmp_path / "deit-tiny-like.pth")
    arch = {"patch_size": 4, "embed_dim": 128, "depth": 2, "num_heads": [2, 2], "attn_dim": [128, 128],
            "mlp_dim": [256, 256]}
    assert space.validate(arch) == space.max_arch()
    if policy == "cyclic":  # the 128-wide window starts after the 64-wide one and wraps past 160
        assert model.policies["embed"].select(128).indices()[:2] == [64, 65]
    model.set_active(arch)
    x = images()
    with torch.no_grad():
        assert (model(x) - deit(x)).abs().max() < 1e-12
    assert ("bilateral dimensions: the weights sit on the left pass" in notes) == (policy == "bilateral")
    if layout == "norms":  # the other patch size's norms start as DeiT's too
        assert torch.equal(model.blocks[1].norm2["8"].weight, model.blocks[1].norm2["4"].weight)
        assert torch.equal(model.norm["8"].bias, model.norm["4"].bias)
    if layout == "blocks":  # and so does the other patch size's block stack (on DeiT's channels)
        four, eight = model.extract(arch).state_dict(), model.extract({**arch, "patch_size": 8}).state_dict()
        blocks = [k for k in four if k.startswith("blocks.")]
        assert blocks and all(torch.equal(four[k], eight[k]) for k in blocks)


def test_superformer_init_resizes_head_and_refuses_other_grids(tmp_path: Path):
    deit = timm_model(classes=1000)
    torch.save({"model": deit.state_dict()}, tmp_path / "deit.pth")
    model = Superformer(deit_space("left"), 10).to(F64)
    head = model.head.weight.detach().clone()
    notes = init_from_timm(model, tmp_path / "deit.pth")
    assert any("1000 classes in the checkpoint, 10 here" in n for n in notes)
    assert torch.equal(model.head.weight, head)  # freshly initialised head kept
    assert torch.equal(model.stems["4"].cls_token[..., :128], deit.cls_token)
    with pytest.raises(UserError, match=r"'pos_embed' is a 4x4 position table \(16 px\).*8x8"):
        init_from_timm(Superformer(deit_space("left", img_size=32), 10), tmp_path / "deit.pth")
    with pytest.raises(UserError, match=r"'cls_token' has width 128; space.embed_dim offers \[64, 96\]"):
        init_from_timm(Superformer(deit_space("left", embed_dim=[64, 96]), 10), tmp_path / "deit.pth")
    check_timm_init(tmp_path / "deit.pth", deit_space("cyclic"))  # the stage's check, no superformer built
    with pytest.raises(UserError, match=r"'blocks.0.mlp.fc1.weight' has MLP width 256"):
        check_timm_init(tmp_path / "deit.pth", deit_space("left", mlp_dim=[128, 192]))


# ----------------------------------------------------------------------------- safety and detection
class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": {"cls_token": torch.zeros(1)}, "args": RunsCode(marker)}, f, protocol=2)
    torch.save({"model": {"x": torch.zeros(1)}, "hook": RunsCode(marker)}, tmp_path / "evil-zip.pth")
    for name in ("evil.pth", "evil-zip.pth"):
        with pytest.raises(UserError, match=r"refusing to load .*asks for code"):
            convert(tmp_path / name)
    assert not marker.exists()


def test_layouts_are_detected_never_guessed(tmp_path: Path):
    torch.save({"model": {"encoder.weight": torch.zeros(2, 2)}, "epoch": 1}, tmp_path / "other.pth")
    with pytest.raises(UserError, match=r"unknown checkpoint layout \(tensors at entry 'model': encoder.weight"):
        convert(tmp_path / "other.pth")
    both = {**timm_model(embed=64).state_dict(), "patch_embed_super.proj.weight": torch.zeros(1)}
    torch.save({"model": both}, tmp_path / "both.pth")
    with pytest.raises(UserError, match=r"ambiguous layout, its tensors fit autoformer, timm-vit"):
        convert(tmp_path / "both.pth")
    torch.save({"model": timm_model(embed=64).state_dict()}, tmp_path / "deit.pth")
    with pytest.raises(UserError, match=r"not in the autoformer layout"):
        convert(tmp_path / "deit.pth", layout="autoformer")
    convert_file(tmp_path / "deit.pth", tmp_path / "vitas.pth")
    with pytest.raises(UserError, match=r"already a vitas checkpoint"):
        convert(tmp_path / "vitas.pth")
    torch.save({"model": {"blocks.blocks.0.attn.q.weight": torch.zeros(1)}}, tmp_path / "nni-super.pth")
    with pytest.raises(UserError, match=r"NNI AutoFormer supernet"):
        convert(tmp_path / "nni-super.pth")


# ----------------------------------------------------------------------------- published subnets
@pytest.mark.parametrize("name,params", [("T", 5_867_944), ("S", 22_891_432), ("B", 53_691_688)])
def test_published_autoformer_subnets_fit_their_spaces(name: str, params: int):
    cfg = load_config(ROOT / "yamls" / f"autoformer-{name}.yaml")
    space = SearchSpace(cfg.space)
    arch = json.loads((ROOT / "yamls" / "archs" / f"autoformer-{name}.json").read_text())
    assert space.validate(arch) == arch
    assert arch_cost(arch, space, 1000).params == params


@pytest.mark.parametrize("name,budget", [("vitas-A-858M", 858e6), ("vitas-B-1.0G", 1.0e9),
                                         ("vitas-1.3G-block", 1.3e9), ("vitas-E-2.7G", 2.7e9),
                                         ("vitas-F-4.9G", 4.9e9)])
def test_vitas_architecture_files_cost_what_vitas_published(name: str, budget: float):
    """ViTAS's count (patch tokens only, the classifier on every token) of the shipped files is
    its published budget; vitas's own count equals the model's parameters."""
    arch = json.loads((ROOT / "yamls" / "archs" / f"{name}.json").read_text())
    E, T = arch["embed_dim"], (224 // arch["patch_size"]) ** 2
    vitas_count = T * 3 * arch["patch_size"] ** 2 * E + T * E * 1000 + sum(
        T * (4 * a * E + 2 * E * m) + 2 * T * T * a for a, m in zip(arch["attn_dim"], arch["mlp_dim"]))
    assert abs(vitas_count / budget - 1) < 0.015
    with torch.device("meta"):
        model = StaticViT(arch, 1000, 224, final_norm_eps=1e-5, attn_scale="embed_dim")
    space = SearchSpace(single_arch_space(model.model_args, name, 1e-6))
    assert arch_cost(space.validate(arch), space, 1000).params == sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- the commands
def test_convert_command_then_evaluate_predict_export(tmp_path: Path, tiny_digits: Path, capsys):
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=1, num_classes=10).eval()
    torch.save({"model": model.state_dict()}, tmp_path / "deit.pth")
    assert main(["convert", str(tmp_path / "deit.pth"), str(tmp_path / "vitas.pth")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["layout"] == "timm-vit" and summary["kind"] == "static"
    assert summary["params"] == sum(p.numel() for p in model.parameters())
    result = evaluate_checkpoint(str(tmp_path / "vitas.pth"), str(tiny_digits), workers=0)
    assert result["images"] == 40
    assert main(["predict", "--checkpoint", str(tmp_path / "vitas.pth"),
                 str(next((tiny_digits / "val" / "3").iterdir()))]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "vitas.pth"), str(tmp_path / "export")]) == 0
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "vitas.pth"), str(tmp_path / "again.pth")]) == 2
    assert "already a vitas checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "again.pth").exists()


def test_load_any_checkpoint_converts_on_the_fly(tmp_path: Path):
    layers = [(24, 60)]
    vitas_file(tmp_path / "v.pth.tar", layers)
    ckpt = load_any_checkpoint(str(tmp_path / "v.pth.tar"), heads=2)
    assert ckpt["model_args"]["attn_scale"] == "embed_dim"
    convert_file(tmp_path / "v.pth.tar", tmp_path / "v.pth", heads=2)
    assert load_any_checkpoint(str(tmp_path / "v.pth"))["arch"] == ckpt["arch"]  # a vitas file as it is


def test_evaluate_and_predict_take_a_foreign_checkpoint_directly(tmp_path: Path, tiny_digits: Path, capsys):
    """`vitas evaluate` and `vitas predict` on a DeiT-layout file: converted on the fly, the same
    numbers as through `vitas convert`."""
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=1, num_classes=10).eval()
    torch.save({"model": model.state_dict()}, tmp_path / "deit.pth")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "deit.pth"), "--data", str(tiny_digits)]) == 0
    direct = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["convert", str(tmp_path / "deit.pth"), str(tmp_path / "vitas.pth")]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(tmp_path / "vitas.pth"), "--data", str(tiny_digits)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == direct
    image = str(next((tiny_digits / "val" / "3").iterdir()))
    assert main(["predict", "--checkpoint", str(tmp_path / "deit.pth"), image]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["predictions"][0]["image"] == image


def test_train_supernet_starts_from_deit_weights(tmp_path: Path, tiny_digits: Path, capsys):
    """`supernet.init: DEIT.pth`: checked before anything is written, then loaded into the
    superformer (the max subnet equals the DeiT model before the first step)."""
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2,
                              mlp_ratio=32 / 24, num_classes=10).eval()
    torch.save({"model": model.state_dict()}, tmp_path / "deit.pth")
    space = {"name": "tiny", "img_size": 32, "patch_size": [8], "embed_dim": [16, 24], "depth": [1, 2],
             "num_heads": [1, 2], "attn_dim": [16, 24], "mlp_dim": [16, 32],
             "channels": {"embed": "cyclic", "attn": "left", "mlp": "left"}}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"output_dir": str(tmp_path / "run"), "space": space,
                               "data": {"root": str(tiny_digits), "holdout_per_class": 2, "workers": 0,
                                        "mixup": 0.0, "cutmix": 0.0, "auto_augment": None, "reprob": 0.0},
                               "supernet": {"epochs": 1, "batch_size": 20, "lr": 1e-12, "min_lr": 0.0,
                                            "warmup_lr": 0.0, "warmup_epochs": 0, "weight_decay": 0.0,
                                            "drop_path": 0.0, "amp": False, "val_random_archs": 0}}))
    assert main(["train-supernet", "-c", str(cfg), f"supernet.init={tmp_path / 'nope.pth'}"]) == 2
    assert "supernet.init" in capsys.readouterr().err and not (tmp_path / "run").exists()
    assert main(["train-supernet", "-c", str(cfg), f"supernet.init={tmp_path / 'deit.pth'}"]) == 0
    state = torch.load(tmp_path / "run" / "supernet" / "last.pth", weights_only=True)
    trained = Superformer(SearchSpace(config_from_dict({"space": space}).space), 10)
    trained.load_state_dict(state["model"])
    x = torch.randn(2, 3, 32, 32)
    trained.set_max()
    with torch.no_grad():  # lr 1e-12: one epoch moves nothing visible
        assert torch.allclose(trained.eval()(x), model(x), atol=1e-5)
