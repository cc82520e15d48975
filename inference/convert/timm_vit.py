"""timm VisionTransformer and DeiT checkpoints (DeiT's `{"model": ...}` files, timm's state dicts
and `.safetensors`), distilled DeiT included, into a static model.

StaticViT keeps timm's key names, so the weights carry over unchanged; a distilled DeiT keeps its
`dist_token` and `head_dist` (StaticViT `distilled`: the output is the mean of both heads, as
timm's distilled DeiT in eval). A timm file records every width but not the head counts: they are
taken as DeiT's 64-wide heads unless `--heads`/`--arch` say otherwise. The mapping into a
superformer (`supernet.init`) lives in `vitas.supernet.pretrained`.
"""
from __future__ import annotations

from typing import Optional

from vitas.core.config import Config
from vitas.inference.convert.common import resolve_arch, static_checkpoint
from vitas.inference.convert.load import Foreign
from vitas.supernet.pretrained import Tensors, heads_by_convention, read_timm_vit

NAME = "timm-vit"


def to_static(src: Foreign, arch: Optional[dict] = None, heads: Optional[int] = None,
              cfg: Optional[Config] = None) -> tuple[dict, list[str]]:
    """The static checkpoint of a timm/DeiT ViT."""
    t = Tensors(src.weights, src.source)
    vit = read_timm_vit(t)
    t.finish("a plain timm VisionTransformer (vitas builds no fc_norm, register tokens, layer scale "
             "or q/k norms)")
    notes = []
    default = None
    if arch is None and heads is None:
        default = heads_by_convention(vit.attn_dim, src.source)
        notes.append(f"head counts {sorted(set(default))} taken from 64-wide heads (DeiT's); give "
                     "--heads or --arch for another model")
    found = {k: v for k, v in vit.arch([1] * vit.depth).items() if k != "num_heads"}
    arch = resolve_arch(found, src.source, arch=arch, heads=heads, default_heads=default)
    model_args = dict(arch=arch, num_classes=vit.num_classes, img_size=vit.img_size, in_chans=vit.in_chans,
                      qkv_bias=vit.qkv_bias, distilled=vit.distilled)
    return static_checkpoint(src, NAME, model_args, dict(src.weights), cfg), notes
