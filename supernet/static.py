"""`StaticViT`: a plain ViT whose layers may differ in width and heads, registered with timm.

This is what `Superformer.extract` returns and what retraining trains. Keys follow timm's
VisionTransformer (patch_embed.proj, cls_token, pos_embed, blocks.i.{norm1, attn.qkv, attn.proj,
norm2, mlp.fc1, mlp.fc2}, norm, head), so a uniform architecture maps onto timm one to one.
Options that published models need (`inference.convert` sets them): LayerNorm eps of the blocks
and of the final norm (AutoFormer keeps torch's 1e-5, ViTAS mixes 1e-6 and 1e-5), ViTAS's
attention scale taken from embed_dim // heads, and DeiT's distillation token with its second head.
Their defaults are timm's, so models saved before the options existed rebuild unchanged.
Importing this module registers the timm model `vitas_vit`, so that
`timm.create_model('local-dir:DIR', pretrained=True)` rebuilds an exported folder.
"""
from __future__ import annotations

import math

from typing import Iterable, Optional, Sequence, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from vitas.supernet.layers import RelativePosition2D, attend, merge_heads, split_heads

ARCH_KEYS = ("patch_size", "embed_dim", "depth", "num_heads", "attn_dim", "mlp_dim")
SCALES = ("head_dim", "embed_dim")

# The options beyond the architecture, at the values that make StaticViT a timm VisionTransformer.
TIMM_OPTIONS = {"norm_eps": 1e-6, "final_norm_eps": 1e-6, "attn_scale": "head_dim", "distilled": False}


def _square(img_size: Union[int, Sequence[int]]) -> int:
    if isinstance(img_size, int):
        return img_size
    h, w = img_size
    if h != w:
        raise ValueError(f"StaticViT needs a square image size, got {tuple(img_size)}")
    return int(h)


def _positive_int(value: object, field: str) -> int:
    """`value` as an int when it is a whole number >= 1, else ValueError naming the field."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value != int(value) or value < 1):
        raise ValueError(f"architecture field '{field}' must be a whole number >= 1, got {value!r}")
    return int(value)


def check_arch(arch: dict) -> dict:
    """A plain-int copy of an architecture dict with consistent per-layer lists (no space needed)."""
    if not isinstance(arch, dict):
        raise ValueError(f"an architecture is a JSON object, got {type(arch).__name__}")
    missing = [k for k in ARCH_KEYS if k not in arch]
    if missing:
        raise ValueError(f"architecture is missing {missing}")
    out = {k: _positive_int(arch[k], k) for k in ARCH_KEYS[:3]}
    for k in ARCH_KEYS[3:]:
        if not isinstance(arch[k], (list, tuple)):
            raise ValueError(f"architecture field '{k}' must be a list (one entry per layer)")
        out[k] = [_positive_int(v, f"{k}[{i}]") for i, v in enumerate(arch[k])]
        if len(out[k]) != out["depth"]:
            raise ValueError(f"architecture field '{k}' has {len(out[k])} entries, depth is {out['depth']}")
    for i, (h, a) in enumerate(zip(out["num_heads"], out["attn_dim"])):
        if a % h:
            raise ValueError(f"architecture layer {i}: num_heads {h} does not divide attn_dim {a}")
    return out


class Attention(nn.Module):
    """Multi-head self-attention of width `attn_dim` on an `embed_dim` stream (timm layout).

    The logits are scaled by head_dim^-0.5, or with `attn_scale="embed_dim"` by
    (embed_dim // num_heads)^-0.5 (what ViTAS's released models compute)."""

    def __init__(self, embed_dim: int, attn_dim: int, num_heads: int, qkv_bias: bool,
                 rel_pos: bool, rel_pos_max: int, attn_scale: str = "head_dim"):
        super().__init__()
        self.num_heads = num_heads
        self.scale = ((attn_dim if attn_scale == "head_dim" else embed_dim) // num_heads) ** -0.5
        self.explicit = False
        self.qkv = nn.Linear(embed_dim, 3 * attn_dim, bias=qkv_bias)
        self.proj = nn.Linear(attn_dim, embed_dim)
        if rel_pos:
            self.rel_pos_k = RelativePosition2D(attn_dim // num_heads, rel_pos_max)
            self.rel_pos_v = RelativePosition2D(attn_dim // num_heads, rel_pos_max)
        self.rel_pos = rel_pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        rel_k = rel_v = None
        if self.rel_pos:
            rel_k, rel_v = self.rel_pos_k(x.shape[1]), self.rel_pos_v(x.shape[1])
        return self.proj(merge_heads(attend(q, k, v, self.scale, rel_k, rel_v, self.explicit)))


class Mlp(nn.Module):
    """fc1, GELU, fc2; the superformer passes its elastic linear layer, so the keys stay alike."""

    def __init__(self, embed_dim: int, hidden: int, linear: type[nn.Linear] = nn.Linear):
        super().__init__()
        self.fc1 = linear(embed_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = linear(hidden, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with stochastic depth."""

    def __init__(self, embed_dim: int, attn_dim: int, num_heads: int, mlp_dim: int, qkv_bias: bool,
                 rel_pos: bool, rel_pos_max: int, drop_path: float, norm_eps: float = 1e-6,
                 attn_scale: str = "head_dim"):
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.attn = Attention(embed_dim, attn_dim, num_heads, qkv_bias, rel_pos, rel_pos_max, attn_scale)
        self.norm2 = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.mlp = Mlp(embed_dim, mlp_dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patches through a strided conv (timm's `patch_embed.proj`)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


NO_DECAY_SUFFIXES = ("cls_token", "dist_token", "pos_embed", "table_v", "table_h")


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names of class tokens, position embeddings and relative-position tables (as in DeiT)."""
    return {n for n, _ in model.named_parameters() if n.endswith(NO_DECAY_SUFFIXES)}


class ExplicitAttention:
    """`explicit_attention` for models with `blocks[i].attn.explicit`: True writes attention out
    (forward-mode AD works), False runs fused SDPA."""

    blocks: nn.ModuleList

    def attention_blocks(self) -> Iterable[nn.Module]:
        """Every block whose `attn.explicit` the switch sets."""
        return self.blocks

    @property
    def explicit_attention(self) -> bool:
        """Whether attention is written out (True) or runs through fused SDPA (False)."""
        return all(b.attn.explicit for b in self.attention_blocks())

    @explicit_attention.setter
    def explicit_attention(self, value: bool) -> None:
        for b in self.attention_blocks():
            b.attn.explicit = bool(value)


class StaticViT(ExplicitAttention, nn.Module):
    """A plain ViT for one architecture dict (DESIGN 2); class token always present.

    `pool` is `cls` (class token after the final norm) or `mean` (final norm, then mean over the
    patch tokens, as AutoFormer). `explicit_attention` writes attention out instead of the fused
    SDPA kernel (forward-mode AD); relative positions always take the explicit path.
    `norm_eps` is the eps of the blocks' LayerNorms, `final_norm_eps` that of the final one
    (None: `norm_eps`); `attn_scale` is `head_dim` or ViTAS's `embed_dim` (see `Attention`);
    `distilled` adds DeiT's distillation token after the class token (keys `dist_token`,
    `head_dist`; the output is the mean of both heads, as timm's distilled DeiT in eval).
    """

    def __init__(
        self,
        arch: dict,
        num_classes: int = 1000,
        img_size: Union[int, Sequence[int]] = 224,
        in_chans: int = 3,
        qkv_bias: bool = True,
        rel_pos: bool = False,
        rel_pos_max: int = 14,
        pool: str = "cls",
        drop_path: float = 0.0,
        explicit_attention: bool = False,
        norm_eps: float = 1e-6,
        final_norm_eps: Optional[float] = None,
        attn_scale: str = "head_dim",
        distilled: bool = False,
    ):
        super().__init__()
        arch = check_arch(arch)
        img_size = _square(img_size)
        if img_size % arch["patch_size"]:
            raise ValueError(f"patch_size {arch['patch_size']} does not divide img_size {img_size}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        if attn_scale not in SCALES:
            raise ValueError(f"attn_scale must be one of {list(SCALES)}, got {attn_scale!r}")
        if distilled and (rel_pos or pool != "cls"):
            raise ValueError("a distillation token needs pool 'cls' and no relative positions")
        final_norm_eps = norm_eps if final_norm_eps is None else final_norm_eps
        self.arch = arch
        self.model_args = dict(arch=arch, num_classes=num_classes, img_size=img_size, in_chans=in_chans,
                               qkv_bias=qkv_bias, rel_pos=rel_pos, rel_pos_max=rel_pos_max, pool=pool,
                               norm_eps=norm_eps, final_norm_eps=final_norm_eps, attn_scale=attn_scale,
                               distilled=distilled)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.pool = pool
        E, depth = arch["embed_dim"], arch["depth"]
        self.num_features = self.embed_dim = E
        self.num_prefix_tokens = 2 if distilled else 1
        tokens = (img_size // arch["patch_size"]) ** 2 + self.num_prefix_tokens
        self.patch_embed = PatchEmbed(arch["patch_size"], in_chans, E)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, E))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, E)) if distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, E))
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(E, arch["attn_dim"][i], arch["num_heads"][i], arch["mlp_dim"][i], qkv_bias,
                  rel_pos, rel_pos_max, rates[i], norm_eps, attn_scale)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(E, eps=final_norm_eps)
        self.head = nn.Linear(E, num_classes)
        self.head_dist = nn.Linear(E, num_classes) if distilled else None
        self.explicit_attention = explicit_attention
        init_vit_weights(self)

    def no_weight_decay(self) -> set[str]:
        """Token and position tables that timm's optimizer factory exempts from weight decay."""
        return no_weight_decay_names(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the final norm, (B, prefix tokens + patches, embed_dim)."""
        x = self.patch_embed(x)
        prefix = [self.cls_token] if self.dist_token is None else [self.cls_token, self.dist_token]
        x = torch.cat([t.expand(x.shape[0], -1, -1) for t in prefix] + [x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Pool the normed tokens and classify."""
        if self.head_dist is not None:
            return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2
        x = x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def full_model_args(model_args: dict) -> dict:
    """`model_args` with every option present: those saved before an option existed take its
    default (compare recorded and current arguments through this)."""
    full = {**TIMM_OPTIONS, **model_args}
    if model_args.get("final_norm_eps") is None:
        full["final_norm_eps"] = full["norm_eps"]
    return full


def init_vit_weights(model: nn.Module) -> None:
    """timm's ViT initialisation: trunc-normal(0.02) linears and position embeddings."""
    for name, p in model.named_parameters():
        if name.endswith("pos_embed"):
            nn.init.trunc_normal_(p, std=0.02)
        elif name.endswith(("cls_token", "dist_token")):
            nn.init.normal_(p, std=1e-6)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


default_cfgs = generate_default_cfgs({
    "vitas_vit": {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head",
    },
})


@register_model
def vitas_vit(pretrained: bool = False, **kwargs) -> StaticViT:
    """timm entry point of `StaticViT` (kwargs are its constructor arguments, `arch` included)."""
    return build_model_with_cfg(StaticViT, "vitas_vit", pretrained, **kwargs)
