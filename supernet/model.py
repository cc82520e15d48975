"""The superformer: one weight-entangled ViT whose subnets are the architectures of a space.

Mechanisms (DESIGN 3): channel policies per dimension (`supernet.channels`), a private stem
(patch conv, class token, position embedding) per patch size with blocks shared by all patch
sizes or private to each (`space.blocks`), LayerNorms shared by all patch sizes or private to
each (`space.norms`), q/k either entangled in one timm-style qkv (AutoFormer) or private per head
count with a shared v (ViTAS), identity shifting through `SearchSpace.canonical`, the attention
scale of the active head_dim, AutoFormer's 2-D relative positions, and class-token or mean
pooling.
The API follows Once-for-All: `set_active`, `sample`, `set_max`, `set_min`, `extract`.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import torch
from timm.layers import DropPath
from torch import nn

from vitas.supernet.channels import ChannelPolicy, ChannelSet
from vitas.supernet.layers import (ElasticConv2d, ElasticLayerNorm, ElasticLinear, RelativePosition2D,
                             attend, merge_heads, split_heads)
from vitas.supernet.space import SearchSpace
from vitas.supernet.static import ExplicitAttention, Mlp, StaticViT, init_vit_weights, no_weight_decay_names


class SuperStem(nn.Module):
    """Private stem of one patch size: patch conv, class token and position embedding."""

    def __init__(self, patch_size: int, img_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = ElasticConv2d(in_chans, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2 + 1, embed_dim))
        self.embed: Optional[ChannelSet] = None

    def set_channels(self, embed: ChannelSet) -> None:
        """Activate the residual-stream channels."""
        self.embed = embed
        self.proj.set_channels(embed)

    def active_tensors(self) -> dict[str, torch.Tensor]:
        """Active class token and position embedding, keyed as in StaticViT."""
        return {"cls_token": self.embed.take(self.cls_token, 2), "pos_embed": self.embed.take(self.pos_embed, 2)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)
        t = self.active_tensors()
        return torch.cat([t["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + t["pos_embed"]


def layer_norms(space: SearchSpace, per_patch: bool) -> nn.Module:
    """One LayerNorm of the superformer: an ElasticLayerNorm shared by every patch size, or (with
    `per_patch`) a ModuleDict of one per patch size, keyed by the size."""
    if per_patch:
        return nn.ModuleDict({str(p): ElasticLayerNorm(space.super_embed_dim, eps=space.norm_eps)
                              for p in space.patch_sizes})
    return ElasticLayerNorm(space.super_embed_dim, eps=space.norm_eps)


def active_norm(norms: nn.Module, patch_size: int) -> ElasticLayerNorm:
    """The LayerNorm that `layer_norms` built for `patch_size`."""
    return norms[str(patch_size)] if isinstance(norms, nn.ModuleDict) else norms


def superformer_keys(key: str, space: SearchSpace) -> list[str]:
    """The superformer state keys that a key of the shared layout (`blocks.3.norm1.weight`,
    `norm.bias`) stands for in `space`'s superformer: itself; with `space.blocks: per_patch` the
    key in every patch size's stack (`patch_blocks.<patch>.3.norm1.weight`); with `space.norms:
    per_patch` every patch size's copy of a shared block's or the final norm. A weight imported
    from a model of one patch size starts every copy."""
    if space.cfg.blocks == "per_patch" and key.startswith("blocks."):
        return [f"patch_blocks.{p}.{key.removeprefix('blocks.')}" for p in space.patch_sizes]
    name, _, param = key.rpartition(".")
    if space.cfg.norms != "per_patch" or not (name == "norm" or name.rpartition(".")[2] in ("norm1", "norm2")):
        return [key]
    return [f"{name}.{p}.{param}" for p in space.patch_sizes]


def per_patch_state(state: dict[str, torch.Tensor], space: SearchSpace) -> dict[str, torch.Tensor]:
    """A superformer state dict of the shared layout (a converted foreign supernet) under the keys
    of `space`'s superformer (`superformer_keys`)."""
    out = {}
    for key, value in state.items():
        keys = superformer_keys(key, space)
        out.update({k: value.clone() if len(keys) > 1 else value for k in keys})  # copies do not alias
    return out


class SuperAttention(nn.Module):
    """Elastic multi-head attention: entangled qkv or private q/k per head count + shared v."""

    def __init__(self, embed_dim: int, attn_dim: int, head_choices: list[int], qk: str, qkv_bias: bool,
                 rel_pos: bool, head_dim: Optional[int], rel_pos_max: int, bias_prefix: bool = False):
        super().__init__()
        self.private = qk == "private"
        self.bias_prefix = bias_prefix  # AutoFormer: bias[:3a], not the first a of each of q, k, v
        if self.private:
            self.q = nn.ModuleDict({str(h): ElasticLinear(embed_dim, attn_dim, qkv_bias) for h in head_choices})
            self.k = nn.ModuleDict({str(h): ElasticLinear(embed_dim, attn_dim, qkv_bias) for h in head_choices})
            self.v = ElasticLinear(embed_dim, attn_dim, qkv_bias)
        else:
            self.qkv = ElasticLinear(embed_dim, 3 * attn_dim, qkv_bias, out_groups=3)
        self.proj = ElasticLinear(attn_dim, embed_dim)
        self.rel_pos = rel_pos
        if rel_pos:
            self.rel_pos_k = RelativePosition2D(head_dim, rel_pos_max)
            self.rel_pos_v = RelativePosition2D(head_dim, rel_pos_max)
        self.explicit = False
        self.heads = head_choices[-1]
        self.scale = 1.0

    def set_active(self, embed: ChannelSet, attn: ChannelSet, heads: int) -> None:
        """Activate widths and the head count (whose head_dim sets the scale)."""
        self.heads = heads
        self.scale = (attn.width // heads) ** -0.5
        for lin in self._qkv_layers():
            lin.set_channels(embed, attn)
        self.proj.set_channels(attn, embed)

    def _qkv_layers(self) -> list[ElasticLinear]:
        if self.private:
            return [self.q[str(self.heads)], self.k[str(self.heads)], self.v]
        return [self.qkv]

    def active_qkv(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The active fused [q; k; v] (weight, bias), as a static qkv Linear holds it."""
        if not self.private:
            weight, bias = self.qkv.active_weight()
            if self.bias_prefix and bias is not None:
                bias = self.qkv.bias[: weight.shape[0]]
            return weight, bias
        parts = [lin.active_weight() for lin in self._qkv_layers()]
        bias = None if parts[0][1] is None else torch.cat([b for _, b in parts])
        return torch.cat([w for w, _ in parts]), bias

    def active_modules(self) -> list[nn.Module]:
        """The submodules the active head count uses."""
        mods: list[nn.Module] = self._qkv_layers() + [self.proj]
        if self.rel_pos:
            mods += [self.rel_pos_k, self.rel_pos_v]
        return mods

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.active_qkv()
        q, k, v = split_heads(nn.functional.linear(x, weight, bias), self.heads)
        rel_k = rel_v = None
        if self.rel_pos:
            rel_k, rel_v = self.rel_pos_k(x.shape[1]), self.rel_pos_v(x.shape[1])
        return self.proj(merge_heads(attend(q, k, v, self.scale, rel_k, rel_v, self.explicit)))


class SuperBlock(nn.Module):
    """Elastic pre-norm transformer block."""

    def __init__(self, space: SearchSpace, drop_path: float):
        super().__init__()
        c = space.cfg
        E = space.super_embed_dim
        per_patch_norms = c.norms == "per_patch" and c.blocks == "shared"  # private blocks: private norms
        self.norm1 = layer_norms(space, per_patch_norms)
        self.attn = SuperAttention(E, space.super_attn_dim, space.head_choices, c.qk, c.qkv_bias,
                                   c.rel_pos, c.head_dim, c.rel_pos_max, c.qkv_bias_slice == "prefix")
        self.norm2 = layer_norms(space, per_patch_norms)
        self.mlp = Mlp(E, space.super_mlp_dim, linear=ElasticLinear)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.patch_size = space.patch_sizes[0]

    def set_active(self, embed: ChannelSet, attn: ChannelSet, mlp: ChannelSet, heads: int,
                   patch_size: int) -> None:
        """Activate this block's channel sets, head count and the norms of `patch_size`."""
        self.patch_size = patch_size
        for norm in self.active_norms():
            norm.set_channels(embed)
        self.attn.set_active(embed, attn, heads)
        self.mlp.fc1.set_channels(embed, mlp)
        self.mlp.fc2.set_channels(mlp, embed)

    def active_norms(self) -> tuple[ElasticLayerNorm, ElasticLayerNorm]:
        """The active patch size's (norm1, norm2)."""
        return active_norm(self.norm1, self.patch_size), active_norm(self.norm2, self.patch_size)

    def active_modules(self) -> list[nn.Module]:
        """The submodules the active subnet uses."""
        return [*self.active_norms(), self.mlp] + self.attn.active_modules()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm1, norm2 = self.active_norms()
        x = x + self.drop_path(self.attn(norm1(x)))
        return x + self.drop_path(self.mlp(norm2(x)))


class Superformer(ExplicitAttention, nn.Module):
    """Weight-entangled ViT supernet over `space` (see the module docstring)."""

    def __init__(self, space: SearchSpace, num_classes: int, drop_path: float = 0.0):
        super().__init__()
        c = space.cfg
        self.space = space
        self.num_classes = num_classes
        E = space.super_embed_dim
        self.stems = nn.ModuleDict(
            {str(p): SuperStem(p, c.img_size, c.in_chans, E) for p in space.patch_sizes})
        depth = space.super_depth
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        if c.blocks == "per_patch":  # few-shot NAS split by patch size: one stack per token grid
            self.patch_blocks = nn.ModuleDict({str(p): nn.ModuleList(SuperBlock(space, rates[i]) for i in range(depth))
                                               for p in space.patch_sizes})
        else:
            self.blocks = nn.ModuleList(SuperBlock(space, rates[i]) for i in range(depth))
        self.norm = layer_norms(space, c.norms == "per_patch")
        self.head = ElasticLinear(E, num_classes)
        self.policies = {
            dim: ChannelPolicy(getattr(c.channels, dim), space.super_width(dim), space.widths(dim))
            for dim in ("embed", "attn", "mlp")
        }
        init_vit_weights(self)
        self._arch: dict = {}
        self._layers: list[int] = []
        self._side = "left"
        self.set_max()

    def no_weight_decay(self) -> set[str]:
        """Token and position tables that timm's optimizer factory exempts from weight decay."""
        return no_weight_decay_names(self)

    def block_stack(self, patch_size: int) -> nn.ModuleList:
        """The blocks that subnets of `patch_size` run on: `blocks`, or with `space.blocks:
        per_patch` that patch size's own stack."""
        return self.patch_blocks[str(patch_size)] if self.space.cfg.blocks == "per_patch" else self.blocks

    def attention_blocks(self) -> list[nn.Module]:
        """Every block of every stack (what `explicit_attention` switches)."""
        return [m for m in self.modules() if isinstance(m, SuperBlock)]

    # ------------------------------------------------------------------ activation
    def set_active(self, arch: dict, side: str = "left", layers: Optional[Sequence[int]] = None) -> None:
        """Activate `arch` (canonicalised: identities shifted to the end). `side="right"` is the
        bilateral right pass; it changes only dimensions whose policy is `bilateral`. `layers`
        (ascending block indices, one per layer) runs the layers on other blocks than the first
        `depth`: training without identity shifting (`supernet.identity_shift: false`)."""
        arch = self.space.canonical(arch)
        layers = list(range(arch["depth"])) if layers is None else [int(j) for j in layers]
        blocks = self.block_stack(arch["patch_size"])
        if len(layers) != arch["depth"] or layers != sorted(set(layers)) or not 0 <= layers[0] <= layers[-1] < len(blocks):
            raise ValueError(f"layers {layers} are not {arch['depth']} ascending block indices")
        embed = self.policies["embed"].select(arch["embed_dim"], side)
        self.stems[str(arch["patch_size"])].set_channels(embed)
        for i, j in enumerate(layers):
            blocks[j].set_active(
                embed,
                self.policies["attn"].select(arch["attn_dim"][i], side),
                self.policies["mlp"].select(arch["mlp_dim"][i], side),
                arch["num_heads"][i],
                arch["patch_size"],
            )
        active_norm(self.norm, arch["patch_size"]).set_channels(embed)
        self.head.set_channels(embed, None)
        self._arch, self._side, self._layers = arch, side, layers

    def sample(self, rng: Any, side: str = "left") -> dict:
        """Sample an architecture from the space (`random.Random` or NumPy Generator), activate it."""
        arch = self.space.sample(rng)
        self.set_active(arch, side)
        return self._arch

    def set_max(self) -> None:
        """Activate the largest subnet."""
        self.set_active(self.space.max_arch())

    def set_min(self) -> None:
        """Activate the smallest subnet."""
        self.set_active(self.space.min_arch())

    @property
    def active_arch(self) -> dict:
        """The active canonical architecture (a copy)."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self._arch.items()}

    @property
    def active_layers(self) -> list[int]:
        """The blocks the active layers run on (the first `depth` unless `set_active` said others)."""
        return list(self._layers)

    @property
    def active_side(self) -> str:
        """The active pass, `left` or `right`."""
        return self._side

    def active_modules(self) -> list[nn.Module]:
        """Modules the active subnet uses (some only in part)."""
        patch = self._arch["patch_size"]
        mods: list[nn.Module] = [self.stems[str(patch)], active_norm(self.norm, patch), self.head]
        blocks = self.block_stack(patch)
        for j in self._layers:
            mods += blocks[j].active_modules()
        return mods

    def active_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the active subnet touches (each once), for an optimizer that must leave the
        others alone: the active stem, blocks and head count's q/k, norms and head."""
        seen: set[int] = set()
        for mod in self.active_modules():
            for p in mod.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    # ------------------------------------------------------------------ forward
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Active tokens after the final norm."""
        x = self.stems[str(self._arch["patch_size"])](x)
        blocks = self.block_stack(self._arch["patch_size"])
        for j in self._layers:
            x = blocks[j](x)
        return active_norm(self.norm, self._arch["patch_size"])(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = x[:, 0] if self.space.cfg.pool == "cls" else x[:, 1:].mean(dim=1)
        return self.head(x)

    # ------------------------------------------------------------------ extraction

    @torch.no_grad()
    def extract(self, arch: Optional[dict] = None, side: Optional[str] = None) -> StaticViT:
        """A StaticViT of `arch` on pass `side` with COPIED weights; the active subnet is left as
        it was. It computes what this superformer computes with `arch` active (eval).

        Defaults: the active architecture on the active side and blocks; a given `arch` on the
        left side and the first `depth` blocks, so the result never depends on which pass happened
        to be active before."""
        previous = (self._arch, self._side, self._layers)
        if side is None:
            side = self._side if arch is None else "left"
        self.set_active(arch if arch is not None else self._arch, side, self._layers if arch is None else None)
        try:
            static = StaticViT(**self.space.model_args(self._arch, self.num_classes))
            static.load_state_dict(self._active_state_dict())
            static.explicit_attention = self.explicit_attention
        finally:
            self.set_active(*previous)
        return static.to(self.head.weight.device).train(self.training)

    def _active_state_dict(self) -> dict[str, torch.Tensor]:
        """Active slices under StaticViT's keys, copied."""
        stem = self.stems[str(self._arch["patch_size"])]
        out: dict[str, Optional[torch.Tensor]] = dict(stem.active_tensors())
        out["patch_embed.proj.weight"], out["patch_embed.proj.bias"] = stem.proj.active_weight()
        blocks = self.block_stack(self._arch["patch_size"])
        for i, block in enumerate(blocks[j] for j in self._layers):
            pre = f"blocks.{i}."
            norm1, norm2 = block.active_norms()
            out[pre + "norm1.weight"], out[pre + "norm1.bias"] = norm1.active_weight()
            out[pre + "norm2.weight"], out[pre + "norm2.bias"] = norm2.active_weight()
            out[pre + "attn.qkv.weight"], out[pre + "attn.qkv.bias"] = block.attn.active_qkv()
            out[pre + "attn.proj.weight"], out[pre + "attn.proj.bias"] = block.attn.proj.active_weight()
            out[pre + "mlp.fc1.weight"], out[pre + "mlp.fc1.bias"] = block.mlp.fc1.active_weight()
            out[pre + "mlp.fc2.weight"], out[pre + "mlp.fc2.bias"] = block.mlp.fc2.active_weight()
            if block.attn.rel_pos:
                for name in ("rel_pos_k", "rel_pos_v"):
                    for t in ("table_v", "table_h"):
                        out[f"{pre}attn.{name}.{t}"] = getattr(getattr(block.attn, name), t)
        out["norm.weight"], out["norm.bias"] = active_norm(self.norm, self._arch["patch_size"]).active_weight()
        out["head.weight"], out["head.bias"] = self.head.active_weight()
        return {k: v.detach().clone() for k, v in out.items() if v is not None}
