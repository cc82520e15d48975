"""Which published layout a checkpoint is in, told from its entries, keys and shapes alone.

Every layout has a signature (tensor names only it has). Exactly one must match: none is an
unknown layout and two are ambiguous; both are one-line errors naming what was found, and
nothing is guessed. A vitas checkpoint (retrain or superformer) is recognised and sent back to
the commands that read it.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

from vitas.core.errors import UserError
from vitas.inference.convert.load import Foreign


class Layout(NamedTuple):
    """A published checkpoint layout: its name (`--layout`), what it is, and its signature."""

    name: str
    title: str
    matches: Callable[[dict], bool]


def _vitas_release(weights: dict) -> bool:
    return any(".backbone_" in k or k.startswith("backbone_") for k in weights)


LAYOUTS = (
    Layout("autoformer", "AutoFormer (microsoft/Cream) supernet or model-zoo file",
           lambda w: "patch_embed_super.proj.weight" in w and "blocks.0.attn.qkv.weight" in w),
    Layout("nni-autoformer", "NNI AutoFormer searched model (AutoFormer.load_searched_model)",
           lambda w: "cls_token.cls_token" in w and "blocks.0.attn.q.weight" in w),
    Layout("vitas-release", "ViTAS released model (xiusu/ViTAS, `module.net.backbone_*`)", _vitas_release),
    Layout("timm-vit", "timm VisionTransformer / DeiT (distilled too)",
           lambda w: "patch_embed.proj.weight" in w and "cls_token" in w and "blocks.0.attn.qkv.weight" in w),
)
BY_NAME = {layout.name: layout for layout in LAYOUTS}

# Recognised layouts that are not converted, with the reason.
REFUSED = (
    (lambda w: "blocks.blocks.0.attn.q.weight" in w,
     "an NNI AutoFormer supernet (blocks.blocks.*, NNI's one-shot space); convert AutoFormer's own "
     "supernet file or an NNI searched model instead"),
)


def _sample(src: Foreign) -> str:
    keys = sorted(src.weights)
    shown = ", ".join(keys[:4]) + (f", ... ({len(keys)} tensors)" if len(keys) > 4 else "")
    where = f"entry '{src.where}'" if src.where else "the top level"
    entries = f"; entries: {', '.join(sorted(map(str, src.entries))[:6])}" if src.where else ""
    return f"tensors at {where}: {shown}{entries}"


def detect(src: Foreign, layout: Optional[str] = None) -> Layout:
    """The one layout `src` is in (with `layout` given: check that it is that one)."""
    if src.where and ("model_args" in src.entries or "space" in src.entries):
        raise UserError(f"{src.source} is already a vitas checkpoint: use it as it is (vitas evaluate, "
                        "predict, export; a superformer with supernet.checkpoint)")
    if layout is not None:
        if layout not in BY_NAME:
            raise UserError(f"unknown --layout {layout!r}; layouts: {', '.join(BY_NAME)}")
        if not BY_NAME[layout].matches(src.weights):
            raise UserError(f"{src.source} is not in the {layout} layout ({_sample(src)})")
        return BY_NAME[layout]
    for matches, reason in REFUSED:
        if matches(src.weights):
            raise UserError(f"{src.source} is {reason}")
    hits = [lay for lay in LAYOUTS if lay.matches(src.weights)]
    if len(hits) > 1:
        raise UserError(f"{src.source}: ambiguous layout, its tensors fit {', '.join(h.name for h in hits)} "
                        f"({_sample(src)}); choose one with --layout")
    if not hits:
        raise UserError(f"{src.source}: unknown checkpoint layout ({_sample(src)}); vitas converts "
                        f"{', '.join(BY_NAME)}")
    return hits[0]
