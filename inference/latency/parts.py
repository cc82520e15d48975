"""An architecture as parts whose latency a table holds, and as features a regression weighs.

A ViT runs a stem and head (patch conv, class token, position embedding, final norm, pooling,
classifier) and, per block, an attention half (norm1, attention, residual) and an MLP half (norm2,
MLP, residual). The halves depend only on (tokens, embed, attn width, heads) and (tokens, embed,
MLP width), so a space of millions of architectures has a few hundred distinct parts: timing each
once gives a lookup table. Part keys are strings such as `attn/197/192/192/3`.
"""
from __future__ import annotations

import torch
from torch import nn

from vitas.core.config import SpaceConfig
from vitas.inference.latency.measure import ModelFactory, static_model
from vitas.supernet.space import SearchSpace

FEATURES = ("const", "blocks", "linear_macs", "attention_macs", "scores", "stream", "hidden",
            "stem", "head")


def tokens(space: SpaceConfig, patch: int) -> int:
    """Tokens a patch size gives at the space's resolution, class token included."""
    return (space.img_size // patch) ** 2 + 1


def arch_parts(arch: dict, space: SpaceConfig) -> list[str]:
    """The part keys a canonical `arch` runs, in order (one `base`, then two per block)."""
    T, E = tokens(space, arch["patch_size"]), arch["embed_dim"]
    keys = [f"base/{arch['patch_size']}/{E}"]
    for h, a, m in zip(arch["num_heads"], arch["attn_dim"], arch["mlp_dim"]):
        keys += [f"attn/{T}/{E}/{a}/{h}", f"mlp/{T}/{E}/{m}"]
    return keys


def space_parts(space: SearchSpace) -> list[str]:
    """Every part key some architecture of `space` runs (what a lookup table must hold)."""
    keys = []
    for patch in space.patch_sizes:
        T = tokens(space.cfg, patch)
        for E in space.embed_choices:
            keys.append(f"base/{patch}/{E}")
            keys += [f"attn/{T}/{E}/{a}/{h}" for h in space.head_choices for a in space.allowed_attn(h)]
            keys += [f"mlp/{T}/{E}/{m}" for m in sorted(set(space.allowed_mlp(E)))]
    return list(dict.fromkeys(keys))


class AttentionHalf(nn.Module):
    """x + attn(norm1(x)) of a block: the attention half as `StaticViT` runs it."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.norm1, self.attn = block.norm1, block.attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm1(x))


class MlpHalf(nn.Module):
    """x + mlp(norm2(x)) of a block: the MLP half as `StaticViT` runs it."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.norm2, self.mlp = block.norm2, block.mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm2(x))


def part_factory(key: str, space: SearchSpace, num_classes: int, batch: int) -> ModelFactory:
    """A factory of the module a part key stands for and its input shape at batch size `batch`."""
    return lambda: part_model(key, space, num_classes, batch)


def part_model(key: str, space: SearchSpace, num_classes: int, batch: int) -> tuple[nn.Module, tuple[int, ...]]:
    """The module a part key stands for and its input shape at batch size `batch`, taken from a
    one-block static model of the space: `base` is that model with its block removed (stem,
    final norm, pooling, head), the halves are halves of its block."""
    kind, *sizes = key.split("/")
    n = [int(v) for v in sizes]
    c = space.cfg
    if kind == "base":
        (patch, E), (h, a, m) = n, (1, n[1], n[1])
    elif kind == "attn":
        (T, E, a, h), m = n, n[1]
    elif kind == "mlp":
        (T, E, m), h, a = n, 1, n[1]
    else:
        raise ValueError(f"unknown latency part {key!r}")
    if kind != "base":
        patch = next(p for p in space.patch_sizes if tokens(c, p) == T)
    arch = {"patch_size": patch, "embed_dim": E, "depth": 1, "num_heads": [h], "attn_dim": [a], "mlp_dim": [m]}
    model = static_model(arch, space, num_classes)
    if kind == "base":
        model.blocks = nn.ModuleList()
        return model, (batch, c.in_chans, c.img_size, c.img_size)
    half = AttentionHalf(model.blocks[0]) if kind == "attn" else MlpHalf(model.blocks[0])
    return half.eval(), (batch, T, E)


def arch_features(arch: dict, space: SpaceConfig, num_classes: int) -> list[float]:
    """Per-image work of `arch` in the terms of `FEATURES` (the regression's inputs).

    Matmul MACs split by kind (the projections and MLP; QK^T and AV, doubled by relative
    positions; the stem conv; the head), attention scores (softmax elements), the elements the
    norms and residuals touch (`stream`) and those of the split heads and GELU (`hidden`),
    plus a constant and the block count (per-call overheads)."""
    T, E, patch = tokens(space, arch["patch_size"]), arch["embed_dim"], arch["patch_size"]
    rel = 2 if space.rel_pos else 1
    f = dict.fromkeys(FEATURES, 0.0)
    f["const"] = 1.0
    f["blocks"] = float(arch["depth"])
    for h, a, m in zip(arch["num_heads"], arch["attn_dim"], arch["mlp_dim"]):
        f["linear_macs"] += T * E * (4 * a + 2 * m)
        f["attention_macs"] += 2 * rel * T * T * a
        f["scores"] += T * T * h
        f["stream"] += T * E
        f["hidden"] += T * (3 * a + m)
    f["stem"] = (T - 1) * E * space.in_chans * patch * patch + T * E
    f["head"] = E * num_classes
    return [f[k] for k in FEATURES]
