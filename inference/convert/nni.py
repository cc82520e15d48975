"""NNI's AutoFormer searched models (`nni.nas.hub.pytorch.AutoFormer.load_searched_model`, weights
converted by NNI from AutoFormer's release) into a static model.

A bare state dict of the frozen subnet: `patch_embed.{weight, bias}` (the conv itself),
`cls_token.cls_token`, `pos_embed.pos_embed`, per block `attn.{q, k, v, proj}.{weight, bias}`
(q, k and v as separate linears of width heads x 64), `attn.rel_pos_embed_{k,v}.embeddings_table_
{v,h}` (2 x grid + 2 rows: NNI's table reaches the grid side), `attn_layer_norm`, `ffn_layer_norm`,
`fc1`, `fc2`, then `norm` and `head`. NNI's AutoFormer defaults hold: pre-norm, torch's
LayerNorm eps 1e-5, exact GELU, mean pooling over the patch tokens, head width 64 (the tables'
width when present), scale head_dim^-0.5 on both q.k and q.table_k.
"""
from __future__ import annotations

from typing import Optional

import torch

from vitas.core.config import Config
from vitas.core.errors import UserError
from vitas.inference.convert.common import resolve_arch, static_checkpoint
from vitas.inference.convert.load import Foreign
from vitas.supernet.pretrained import TIMM_HEAD_DIM, Tensors, heads_by_convention

NAME = "nni-autoformer"
NORM_EPS = 1e-5
NNI_TABLES = ("rel_pos_embed_k.embeddings_table_v", "rel_pos_embed_k.embeddings_table_h",
              "rel_pos_embed_v.embeddings_table_v", "rel_pos_embed_v.embeddings_table_h")
VITAS_TABLES = ("rel_pos_k.table_v", "rel_pos_k.table_h", "rel_pos_v.table_v", "rel_pos_v.table_h")


def to_static(src: Foreign, arch: Optional[dict] = None, heads: Optional[int] = None,
              cfg: Optional[Config] = None) -> tuple[dict, list[str]]:
    """The static checkpoint of an NNI AutoFormer subnet (head counts from `arch`/`heads`, else
    from the relative-position tables' width, else NNI's 64)."""
    t = Tensors(src.weights, src.source)
    if len(t.shape("patch_embed.weight")) != 4:
        raise UserError(f"{src.source}: tensor 'patch_embed.weight' is not a 4-D conv weight")
    E, C, p, _ = t.get("patch_embed.weight").shape
    t.get("patch_embed.bias", (E,))
    t.get("cls_token.cls_token", (1, 1, E))
    grid = int(round(max(t.shape("pos_embed.pos_embed")[1] - 1, 1) ** 0.5))
    t.get("pos_embed.pos_embed", (1, grid * grid + 1, E), "1 + a square number of patches")
    depth = t.count("blocks.{}.attn.q.weight")
    rel = t.has(f"blocks.0.attn.{NNI_TABLES[0]}")
    rel_rows, head_dim = t.shape(f"blocks.0.attn.{NNI_TABLES[0]}") if rel else (0, TIMM_HEAD_DIM)
    qkv_bias = t.has("blocks.0.attn.q.bias")
    state = {"patch_embed.proj.weight": src.weights["patch_embed.weight"],
             "patch_embed.proj.bias": src.weights["patch_embed.bias"],
             "cls_token": src.weights["cls_token.cls_token"], "pos_embed": src.weights["pos_embed.pos_embed"]}
    attn, mlp = [], []
    for i in range(depth):
        b = f"blocks.{i}."
        a, m = t.shape(b + "attn.q.weight")[0], t.shape(b + "fc1.weight")[0]
        parts = [t.get(f"{b}attn.{n}.weight", (a, E)) for n in "qkv"]
        state[b + "attn.qkv.weight"] = torch.cat(parts)
        if qkv_bias:
            state[b + "attn.qkv.bias"] = torch.cat([t.get(f"{b}attn.{n}.bias", (a,)) for n in "qkv"])
        for ours, theirs, shapes in (("norm1", "attn_layer_norm", ((E,), (E,))),
                                     ("norm2", "ffn_layer_norm", ((E,), (E,))),
                                     ("attn.proj", "attn.proj", ((E, a), (E,))),
                                     ("mlp.fc1", "fc1", ((m, E), (m,))), ("mlp.fc2", "fc2", ((E, m), (E,)))):
            state[f"{b}{ours}.weight"] = t.get(f"{b}{theirs}.weight", shapes[0])
            state[f"{b}{ours}.bias"] = t.get(f"{b}{theirs}.bias", shapes[1])
        if rel:
            for ours, theirs in zip(VITAS_TABLES, NNI_TABLES):
                state[f"{b}attn.{ours}"] = t.get(f"{b}attn.{theirs}", (rel_rows, head_dim))
        attn.append(a)
        mlp.append(m)
    state["norm.weight"], state["norm.bias"] = t.get("norm.weight", (E,)), t.get("norm.bias", (E,))
    K = t.shape("head.weight")[0]
    state["head.weight"], state["head.bias"] = t.get("head.weight", (K, E)), t.get("head.bias", (K,))
    t.finish("NNI's AutoFormer layout")
    if rel and (rel_rows < 4 or rel_rows % 2):
        raise UserError(f"{src.source}: tensor 'blocks.0.attn.{NNI_TABLES[0]}' has {rel_rows} rows, "
                        "expected 2 x max distance + 2")
    found = {"patch_size": p, "embed_dim": E, "depth": depth, "attn_dim": attn, "mlp_dim": mlp}
    notes, default = [], None
    if arch is None and heads is None:
        default = heads_by_convention(attn, src.source, head_dim)
        if not rel:
            notes.append("head counts taken from NNI's default 64-wide heads; give --heads or --arch otherwise")
    arch = resolve_arch(found, src.source, arch=arch, heads=heads, default_heads=default)
    model_args = dict(arch=arch, num_classes=K, img_size=grid * p, in_chans=C, qkv_bias=qkv_bias, rel_pos=rel,
                      rel_pos_max=(rel_rows - 2) // 2 if rel else 14, pool="mean", norm_eps=NORM_EPS,
                      final_norm_eps=NORM_EPS)
    return static_checkpoint(src, NAME, model_args, state, cfg), notes
