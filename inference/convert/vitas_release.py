"""ViTAS's released retrained models (xiusu/ViTAS: `{"epoch", "model", "optimizer"}` files whose
weights sit under `module.net.`) into a static model that computes what ViTAS's code computes.

ViTAS builds its network as a list of modules named `backbone_<stage>_<op>_<i>` (op `Patch_init`,
`Block`, `id`, `Norm`, `FC`), each holding its one candidate at index 0:

- `..._Patch_init_0.0.{cls_token, pos_embed, patch_embed.proj.weight, patch_embed.proj.bias}`;
- per block `..._Block_<i>.0.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}` (timm's
  layout: q, k, v as contiguous chunks of the qkv rows, heads as contiguous chunks of each;
  widths per layer); an identity layer (`..._id_<i>`) has no tensors and is skipped;
- `..._Norm_0.0.{weight, bias}` then `..._FC_0.0.module.0.{weight, bias}`, class-token pooling.

Its quirks: the attention logits are scaled by (embed_dim // heads)^-0.5 (not the head width),
the blocks' LayerNorms use eps 1e-6 and the final one torch's 1e-5. The head counts are not in
the file: `--arch` (e.g. yamls/archs/vitas-1.3G-block.json for ViTAS-C) or `--heads` give them.
The evaluation transform is ViTAS's: resize 256 (bilinear), center crop 224.
"""
from __future__ import annotations

import re
from typing import Optional

from vitas.core.config import Config
from vitas.core.errors import UserError
from vitas.inference.convert.common import resolve_arch, static_checkpoint
from vitas.inference.convert.load import Foreign
from vitas.supernet.pretrained import Tensors

NAME = "vitas-release"
MODULE = re.compile(r"^(?P<name>backbone_(?P<stage>.+)_(?P<op>Patch_init|Block|id|Norm|FC)_(?P<i>\d+))"
                    r"\.(?P<candidate>\d+)\.(?P<rest>.+)$")
# ViTAS's supernet attention: q/k per head count (qk0..qk3) or v per head count (v0..v3).
SUPERNET_ATTENTION = re.compile(r"^attn\.(qk\d*|v\d)\.")


def _modules(src: Foreign) -> tuple[str, str, list[str], str, str]:
    """(key prefix, stem, blocks in order, norm, head) module names of a ViTAS state dict."""
    first = next(k for k in src.weights if "backbone_" in k)
    prefix = first[: first.index("backbone_")]
    ops: dict[str, dict[str, int]] = {}
    for key in src.weights:
        found = MODULE.match(key[len(prefix):]) if key.startswith(prefix) else None
        if found is None:
            continue
        if found["candidate"] != "0" or SUPERNET_ATTENTION.search(found["rest"]):
            raise UserError(f"{src.source} is a ViTAS supernet (tensor '{key}': several candidates per "
                            "layer); vitas converts ViTAS's retrained models")
        ops.setdefault(found["op"], {})[found["name"]] = int(found["i"])
    for op in ("Patch_init", "Norm", "FC"):
        if len(ops.get(op, {})) != 1:
            raise UserError(f"{src.source}: expected one ViTAS '{op}' module, found {len(ops.get(op, {}))}")
    blocks = [name for _, name in sorted((i, name) for name, i in ops.get("Block", {}).items())]
    if len({name.rsplit("_Block_", 1)[0] for name in blocks}) > 1:
        raise UserError(f"{src.source}: ViTAS blocks of several stages are not supported")
    (stem,), (norm,), (head,) = ops["Patch_init"], ops["Norm"], ops["FC"]
    return prefix, stem, blocks, norm, head


def to_static(src: Foreign, arch: Optional[dict] = None, heads: Optional[int] = None,
              cfg: Optional[Config] = None) -> tuple[dict, list[str]]:
    """The static checkpoint of a ViTAS released model (head counts from `arch` or `heads`)."""
    prefix, stem, blocks, norm, fc = _modules(src)
    t = Tensors(src.weights, src.source, prefix)
    stem += ".0."
    if len(t.shape(stem + "patch_embed.proj.weight")) != 4:
        raise UserError(f"{src.source}: tensor '{prefix}{stem}patch_embed.proj.weight' is not a 4-D conv weight")
    E, C, p, _ = t.get(stem + "patch_embed.proj.weight").shape
    state = {"patch_embed.proj.weight": t.weights[prefix + stem + "patch_embed.proj.weight"],
             "patch_embed.proj.bias": t.get(stem + "patch_embed.proj.bias", (E,)),
             "cls_token": t.get(stem + "cls_token", (1, 1, E))}
    grid = int(round(max(t.shape(stem + "pos_embed")[1] - 1, 1) ** 0.5))
    state["pos_embed"] = t.get(stem + "pos_embed", (1, grid * grid + 1, E), "1 + a square number of patches")
    attn, mlp = [], []
    for i, name in enumerate(blocks):
        b, out = name + ".0.", f"blocks.{i}."
        rows, m = t.shape(b + "attn.qkv.weight")[0], t.shape(b + "mlp.fc1.weight")[0]
        if rows % 3:
            raise UserError(f"{src.source}: tensor '{prefix}{b}attn.qkv.weight' has {rows} rows, not 3 x a width")
        a = rows // 3
        for key, shape in (("norm1.weight", (E,)), ("norm1.bias", (E,)), ("attn.qkv.weight", (3 * a, E)),
                           ("attn.qkv.bias", (3 * a,)), ("attn.proj.weight", (E, a)), ("attn.proj.bias", (E,)),
                           ("norm2.weight", (E,)), ("norm2.bias", (E,)), ("mlp.fc1.weight", (m, E)),
                           ("mlp.fc1.bias", (m,)), ("mlp.fc2.weight", (E, m)), ("mlp.fc2.bias", (E,))):
            state[out + key] = t.get(b + key, shape)
        attn.append(a)
        mlp.append(m)
    norm, fc = norm + ".0.", fc + ".0.module.0."
    state["norm.weight"], state["norm.bias"] = t.get(norm + "weight", (E,)), t.get(norm + "bias", (E,))
    K = t.shape(fc + "weight")[0]
    state["head.weight"], state["head.bias"] = t.get(fc + "weight", (K, E)), t.get(fc + "bias", (K,))
    t.finish("the ViTAS layout")
    found = {"patch_size": p, "embed_dim": E, "depth": len(attn), "attn_dim": attn, "mlp_dim": mlp}
    arch = resolve_arch(found, src.source, arch=arch, heads=heads,
                        hint=" (ViTAS's released models: yamls/archs/vitas-*.json)")
    model_args = dict(arch=arch, num_classes=K, img_size=grid * p, in_chans=C, qkv_bias=True, pool="cls",
                      norm_eps=1e-6, final_norm_eps=1e-5, attn_scale="embed_dim")
    return static_checkpoint(src, NAME, model_args, state, cfg, interpolation="bilinear"), []
