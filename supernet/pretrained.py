"""Pretrained timm/DeiT weights: their architecture read from keys and shapes, and their placement
into a superformer (`supernet.init`), so that the subnet of the same widths starts as that model.

A timm `VisionTransformer` state dict (DeiT's released files hold it under `model`) records every
width but not the head count; DeiT and timm's ViT-Ti/S/B/L use 64-wide heads. Distilled DeiT adds
`dist_token` (a second prefix token, so `pos_embed` has one more row) and `head_dist`.

Placement follows each dimension's channel policy (`supernet.channels`): a checkpoint width w goes
onto exactly the channels, in their order, that the subnet of width w uses (`left`: [0, w);
`cyclic`: its window on the ring; `bilateral`: its left pass), so that subnet computes what the
pretrained model computes wherever the space allows it (same pooling and LayerNorm eps). With
private q/k the pretrained q and k go to every head count; relative-position tables of the mapped
blocks start at zero (the pretrained model has none); a head of another class count stays freshly
initialised. Everything else keeps the superformer's own initialisation.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from vitas.core.checkpoint import load_checkpoint
from vitas.core.errors import UserError
from vitas.supernet.model import superformer_keys

# Entries under which checkpoint files keep their weights, tried in this order.
WEIGHT_ENTRIES = ("model", "state_dict", "module")

TIMM_BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
                   "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
                   "mlp.fc2.bias")
TIMM_HEAD_DIM = 64


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


class Tensors:
    """The weights of a foreign checkpoint, taken one by one and checked as they are taken: a
    missing tensor, or one of another shape, is a UserError naming it; `finish()` refuses any
    tensor no rule took (refuse to guess what it was)."""

    def __init__(self, weights: dict[str, torch.Tensor], source: str, prefix: str = ""):
        self.weights = weights
        self.source = source
        self.prefix = prefix
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        """Whether the checkpoint holds `key` (after the prefix)."""
        return self.prefix + key in self.weights

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of `key` (UserError when missing)."""
        return _shape(self._find(key))

    def _find(self, key: str) -> torch.Tensor:
        full = self.prefix + key
        if full not in self.weights:
            raise UserError(f"{self.source}: tensor '{full}' is missing")
        value = self.weights[full]
        if not torch.is_tensor(value):
            raise UserError(f"{self.source}: entry '{full}' is a {type(value).__name__}, not a tensor")
        return value

    def get(self, key: str, shape: Optional[Sequence[int]] = None, expected_by: str = "") -> torch.Tensor:
        """Tensor `key`, marked as used; with `shape` it must have exactly that shape."""
        value = self._find(key)
        if shape is not None and _shape(value) != tuple(shape):
            by = f" ({expected_by})" if expected_by else ""
            raise UserError(f"{self.source}: tensor '{self.prefix + key}' has shape {list(_shape(value))}, "
                            f"expected {list(shape)}{by}")
        self.used.add(self.prefix + key)
        return value

    def skip(self, key: str) -> None:
        """Mark `key` as deliberately left out."""
        self._find(key)
        self.used.add(self.prefix + key)

    def count(self, pattern: str) -> int:
        """How many consecutive i from 0 have `pattern.format(i)` in the checkpoint."""
        n = 0
        while self.has(pattern.format(n)):
            n += 1
        return n

    def finish(self, what: str) -> None:
        """UserError naming the tensors that `what` has no place for."""
        left = sorted(k for k in self.weights if k not in self.used)
        if left:
            more = f" and {len(left) - 4} more" if len(left) > 4 else ""
            raise UserError(f"{self.source}: {what} has no place for tensor(s) {', '.join(left[:4])}{more}")


def weights_of(entries: Any, source: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(entry name, weights) of a loaded checkpoint file: a bare state dict (entry "") or the
    first of `model`, `state_dict`, `module` that maps names to tensors."""
    if not isinstance(entries, dict) or not entries:
        raise UserError(f"{source} holds no weights (it is a {type(entries).__name__})")
    if all(isinstance(k, str) and torch.is_tensor(v) for k, v in entries.items()):
        return "", entries
    for key in WEIGHT_ENTRIES:
        value = entries.get(key)
        if isinstance(value, dict) and value and all(torch.is_tensor(v) for v in value.values()):
            return key, value
    found = ", ".join(sorted(str(k) for k in entries)[:8])
    raise UserError(f"{source} holds no weights under {', '.join(WEIGHT_ENTRIES)} nor at the top "
                    f"level (entries: {found})")


def read_weights_file(path: str | os.PathLike) -> dict:
    """A checkpoint file's entries: safetensors through safetensors, anything else through
    `torch.load(weights_only=True)` (`core.checkpoint.load_checkpoint`)."""
    path = Path(path).expanduser()
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not path.is_file():
            raise UserError(f"checkpoint not found: {path}")
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise UserError(f"cannot read safetensors file {path}: {exc}") from None
    return load_checkpoint(path)


@dataclass(frozen=True)
class TimmViT:
    """The architecture a timm VisionTransformer state dict records (no head counts)."""

    patch_size: int
    embed_dim: int
    attn_dim: list[int]
    mlp_dim: list[int]
    img_size: int
    in_chans: int
    num_classes: int
    distilled: bool
    qkv_bias: bool

    @property
    def depth(self) -> int:
        """Number of blocks."""
        return len(self.attn_dim)

    def arch(self, num_heads: Sequence[int]) -> dict:
        """The architecture dict with the given per-layer head counts."""
        return {"patch_size": self.patch_size, "embed_dim": self.embed_dim, "depth": self.depth,
                "num_heads": [int(h) for h in num_heads], "attn_dim": list(self.attn_dim),
                "mlp_dim": list(self.mlp_dim)}


def read_timm_vit(t: Tensors) -> TimmViT:
    """Read (and check) a timm ViT's widths from its tensors, marking them used; tensors a plain
    ViT does not have (fc_norm, register tokens, layer scale, q/k norms, ...) stay unused, so that
    `t.finish` names them."""
    if len(t.shape("patch_embed.proj.weight")) != 4:
        raise UserError(f"{t.source}: tensor 'patch_embed.proj.weight' is not a 4-D conv weight")
    E, C, p, q = t.shape("patch_embed.proj.weight")
    if p != q:
        raise UserError(f"{t.source}: tensor 'patch_embed.proj.weight' has a {p}x{q} kernel; vitas "
                        "builds square patches")
    t.get("patch_embed.proj.weight")
    t.get("patch_embed.proj.bias", (E,))
    t.get("cls_token", (1, 1, E))
    distilled = t.has("dist_token")
    if distilled:
        t.get("dist_token", (1, 1, E))
    prefix = 2 if distilled else 1
    pos = t.shape("pos_embed")
    grid = int(round(max(pos[1] - prefix, 0) ** 0.5)) if len(pos) == 3 else 0
    if len(pos) != 3 or pos[0] != 1 or pos[2] != E or grid < 1 or grid * grid != pos[1] - prefix:
        raise UserError(f"{t.source}: tensor 'pos_embed' has shape {list(pos)}, expected [1, {prefix} + "
                        f"a square number of patches, {E}]")
    t.get("pos_embed")
    depth = t.count("blocks.{}.attn.qkv.weight")
    if depth == 0:
        raise UserError(f"{t.source}: tensor 'blocks.0.attn.qkv.weight' is missing")
    qkv_bias = t.has("blocks.0.attn.qkv.bias")
    attn, mlp = [], []
    for i in range(depth):
        b = f"blocks.{i}."
        rows, cols = t.shape(b + "attn.qkv.weight")
        if rows % 3 or cols != E:
            raise UserError(f"{t.source}: tensor '{b}attn.qkv.weight' has shape {[rows, cols]}, "
                            f"expected [3 x attention width, {E}]")
        a, m = rows // 3, t.shape(b + "mlp.fc1.weight")[0]
        shapes = {"norm1.weight": (E,), "norm1.bias": (E,), "attn.qkv.weight": (3 * a, E),
                  "attn.proj.weight": (E, a), "attn.proj.bias": (E,), "norm2.weight": (E,),
                  "norm2.bias": (E,), "mlp.fc1.weight": (m, E), "mlp.fc1.bias": (m,),
                  "mlp.fc2.weight": (E, m), "mlp.fc2.bias": (E,)}
        for key in TIMM_BLOCK_KEYS:
            t.get(b + key, shapes[key])
        if qkv_bias:
            t.get(b + "attn.qkv.bias", (3 * a,))
        attn.append(a)
        mlp.append(m)
    t.get("norm.weight", (E,))
    t.get("norm.bias", (E,))
    head = t.shape("head.weight")
    if len(head) != 2 or head[1] != E:
        raise UserError(f"{t.source}: tensor 'head.weight' has shape {list(head)}, expected [classes, {E}]")
    K = head[0]
    t.get("head.weight")
    t.get("head.bias", (K,))
    if distilled:
        t.get("head_dist.weight", (K, E))
        t.get("head_dist.bias", (K,))
    return TimmViT(patch_size=p, embed_dim=E, attn_dim=attn, mlp_dim=mlp, img_size=grid * p, in_chans=C,
                   num_classes=K, distilled=distilled, qkv_bias=qkv_bias)


def heads_by_convention(attn_dim: Sequence[int], source: str, head_dim: int = TIMM_HEAD_DIM) -> list[int]:
    """Head counts from `head_dim`-wide heads (DeiT, timm ViT-Ti/S/B/L); UserError when a width
    is not a multiple of it (then the head count must be given)."""
    odd = sorted({a for a in attn_dim if a % head_dim})
    if odd:
        raise UserError(f"{source}: attention width {odd[0]} is not a multiple of {head_dim}, so its "
                        "head count is not DeiT's; give the head counts (--heads N or --arch)")
    return [a // head_dim for a in attn_dim]


# ----------------------------------------------------------------------------- superformer placement
def _place(dst: torch.Tensor, src: torch.Tensor, *index: Optional[torch.Tensor]) -> None:
    """dst[i0, i1, ...] = src, where a None index takes the whole dimension."""
    full = [torch.arange(n) if idx is None else idx for n, idx in zip(dst.shape, index)]
    full += [torch.arange(n) for n in dst.shape[len(index):]]
    grids = torch.meshgrid(*full, indexing="ij")
    dst[grids] = src.to(dst.dtype)


def _check_fits(vit: TimmViT, space: Any, source: str) -> None:
    """UserError naming the tensor whose width or size the SearchSpace `space` does not offer."""
    c = space.cfg
    if vit.patch_size not in space.patch_sizes:
        raise UserError(f"{source}: tensor 'patch_embed.proj.weight' has patch size {vit.patch_size}; "
                        f"space.patch_size offers {space.patch_sizes}")
    if vit.in_chans != c.in_chans:
        raise UserError(f"{source}: tensor 'patch_embed.proj.weight' takes {vit.in_chans} input channels; "
                        f"space.in_chans is {c.in_chans}")
    if vit.img_size != c.img_size:
        grid = c.img_size // vit.patch_size
        raise UserError(f"{source}: tensor 'pos_embed' is a {vit.img_size // vit.patch_size}x"
                        f"{vit.img_size // vit.patch_size} position table ({vit.img_size} px); the space "
                        f"needs {grid}x{grid} (space.img_size {c.img_size})")
    if vit.embed_dim not in space.widths("embed"):
        raise UserError(f"{source}: tensor 'cls_token' has width {vit.embed_dim}; space.embed_dim offers "
                        f"{space.widths('embed')}")
    if vit.depth > space.super_depth or not (c.identity or vit.depth in space.depth_choices):
        raise UserError(f"{source}: {vit.depth} blocks (blocks.0 .. blocks.{vit.depth - 1}); space.depth "
                        f"offers {space.depth_choices}")
    if vit.qkv_bias and not c.qkv_bias:
        raise UserError(f"{source}: tensor 'blocks.0.attn.qkv.bias' has no place: space.qkv_bias is false")
    for i, (a, m) in enumerate(zip(vit.attn_dim, vit.mlp_dim)):
        if a not in space.widths("attn"):
            raise UserError(f"{source}: tensor 'blocks.{i}.attn.qkv.weight' has attention width {a}; "
                            f"the space offers {space.widths('attn')}")
        if m not in space.allowed_mlp(vit.embed_dim):
            raise UserError(f"{source}: tensor 'blocks.{i}.mlp.fc1.weight' has MLP width {m}; with embed_dim "
                            f"{vit.embed_dim} the space offers {space.allowed_mlp(vit.embed_dim)}")


def _read_plain_vit(weights: dict[str, torch.Tensor], source: str) -> TimmViT:
    t = Tensors(weights, source)
    vit = read_timm_vit(t)
    t.finish("a plain timm VisionTransformer")
    return vit


def superformer_state_from_timm(model: nn.Module, weights: dict[str, torch.Tensor],
                                source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`model`'s state dict (a Superformer) with a timm ViT's weights placed on the channels that
    the subnet of the same widths uses under each channel policy; returns it with notes on what
    keeps the subnet from computing exactly what the pretrained model computes."""
    vit = _read_plain_vit(weights, source)
    _check_fits(vit, model.space, source)
    c = model.space.cfg
    notes: list[str] = []
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    e = torch.tensor(model.policies["embed"].select(vit.embed_dim).indices())
    stem = f"stems.{vit.patch_size}."
    _place(state[stem + "proj.weight"], weights["patch_embed.proj.weight"], e)
    _place(state[stem + "proj.bias"], weights["patch_embed.proj.bias"], e)
    _place(state[stem + "cls_token"], weights["cls_token"], None, None, e)
    pos = weights["pos_embed"]
    if vit.distilled:
        pos = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
        notes.append("distillation token and head_dist dropped (the superformer has one class token)")
    _place(state[stem + "pos_embed"], pos, None, None, e)

    def put(key: str, src: torch.Tensor, *index: Optional[torch.Tensor], view: Optional[tuple] = None) -> None:
        """Place `src` in every superformer tensor that the shared-layout `key` stands for."""
        for k in superformer_keys(key, model.space):
            _place(state[k] if view is None else state[k].view(*view), src, *index)

    for i, (a_width, m_width) in enumerate(zip(vit.attn_dim, vit.mlp_dim)):
        b = f"blocks.{i}."
        a = torch.tensor(model.policies["attn"].select(a_width).indices())
        m = torch.tensor(model.policies["mlp"].select(m_width).indices())
        for norm in ("norm1", "norm2"):
            for p in ("weight", "bias"):
                put(f"{b}{norm}.{p}", weights[f"{b}{norm}.{p}"], e)
        qkv_w = weights[b + "attn.qkv.weight"].reshape(3, a_width, vit.embed_dim)
        qkv_b = (weights[b + "attn.qkv.bias"].reshape(3, a_width) if vit.qkv_bias
                 else torch.zeros(3, a_width, dtype=qkv_w.dtype))
        if c.qk == "entangled":
            A = model.space.super_attn_dim
            put(b + "attn.qkv.weight", qkv_w, None, a, e, view=(3, A, -1))
            if c.qkv_bias:
                put(b + "attn.qkv.bias", qkv_b, None, a, view=(3, A))
        else:
            targets = [(f"q.{h}", 0) for h in model.space.head_choices]
            targets += [(f"k.{h}", 1) for h in model.space.head_choices] + [("v", 2)]
            for name, part in targets:
                put(f"{b}attn.{name}.weight", qkv_w[part], a, e)
                if c.qkv_bias:
                    put(f"{b}attn.{name}.bias", qkv_b[part], a)
        put(b + "attn.proj.weight", weights[b + "attn.proj.weight"], e, a)
        put(b + "attn.proj.bias", weights[b + "attn.proj.bias"], e)
        put(b + "mlp.fc1.weight", weights[b + "mlp.fc1.weight"], m, e)
        put(b + "mlp.fc1.bias", weights[b + "mlp.fc1.bias"], m)
        put(b + "mlp.fc2.weight", weights[b + "mlp.fc2.weight"], e, m)
        put(b + "mlp.fc2.bias", weights[b + "mlp.fc2.bias"], e)
        if c.rel_pos:
            for table in ("rel_pos_k.table_v", "rel_pos_k.table_h", "rel_pos_v.table_v", "rel_pos_v.table_h"):
                for k in superformer_keys(f"{b}attn.{table}", model.space):
                    state[k].zero_()
    for p in ("weight", "bias"):
        put(f"norm.{p}", weights[f"norm.{p}"], e)
    if vit.num_classes == model.num_classes:
        _place(state["head.weight"], weights["head.weight"], None, e)
        state["head.bias"].copy_(weights["head.bias"])
    else:
        notes.append(f"head not taken: {vit.num_classes} classes in the checkpoint, {model.num_classes} "
                     "here (the head starts freshly initialised)")
    if c.qk == "private":
        notes.append("q and k copied to every head count's private projections")
    if c.rel_pos:
        notes.append(f"relative-position tables of blocks 0..{vit.depth - 1} start at zero")
    if c.pool != "cls":
        notes.append(f"space.pool is {c.pool!r}, the checkpoint was trained with the class token")
    if (c.norm_eps or 1e-6) != 1e-6:
        notes.append(f"space.norm_eps is {c.norm_eps}, timm's LayerNorms use 1e-6")
    if c.channels.bilateral:
        notes.append("bilateral dimensions: the weights sit on the left pass")
    return state, notes


def check_timm_init(path: str | os.PathLike, space: Any) -> None:
    """UserError unless the timm/DeiT file at `path` can start a superformer of the SearchSpace
    `space` (what `supernet.init` needs; no superformer is built)."""
    _, weights = weights_of(read_weights_file(path), str(path))
    _check_fits(_read_plain_vit(weights, str(path)), space, str(path))


def init_from_timm(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a timm/DeiT checkpoint file (`.pth` with `model`/`state_dict`, a bare state dict, or
    `.safetensors`) into a Superformer in place (`supernet.init`); returns the notes of
    `superformer_state_from_timm`."""
    _, weights = weights_of(read_weights_file(path), str(path))
    state, notes = superformer_state_from_timm(model, weights, str(path))
    model.load_state_dict(state)
    return notes
