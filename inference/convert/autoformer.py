"""AutoFormer (microsoft/Cream, `AutoFormer/model/`): supernet-shaped files into a vitas superformer,
or with an architecture into that subnet as a static model.

Every AutoFormer file, the released model zoo included, holds the whole supernet (super embed
width S, D blocks, MLP width M, heads of 64); a subnet takes prefixes of it. Its tensors:

- `patch_embed_super.proj.{weight, bias}` (S, C, p, p), `cls_token` (1, 1, S), `pos_embed`
  (1, 1 + grid^2, S);
- per block `attn.qkv.{weight, bias}` (3S, S): weight rows are interleaved, row 3c is q channel
  c, 3c+1 k and 3c+2 v, and a subnet of attention width a takes rows [0, 3a); the bias is not:
  the subnet takes bias[:3a] and splits it into q, k, v chunks of a, so its k and v biases
  depend on a. `attn.proj`, `attn.rel_pos_embed_{k,v}.embeddings_table_{v,h}` (2m + 2, 64; one
  pair of tables for k and one for v, shared by the heads), `attn_layer_norm`, `ffn_layer_norm`
  (torch's LayerNorm eps 1e-5), `fc1`, `fc2` (exact GELU between);
- `norm` (eps 1e-5), `head`; `--gp` pools the mean of the patch tokens after the final norm,
  else the class token.

The file's `args` (an argparse Namespace) says `--gp`, `--change_qkv` (q/k/v widths follow the
heads; required, as in every released file); `--post_norm` and `--no_abs_pos` are refused (vitas
builds pre-norm blocks with a position embedding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from vitas.core.config import Config
from vitas.core.errors import UserError
from vitas.inference.convert.common import WIDTHS, resolve_arch, static_checkpoint, superformer_checkpoint
from vitas.inference.convert.load import Foreign
from vitas.supernet.pretrained import Tensors
from vitas.supernet.space import SearchSpace

NAME = "autoformer"
NORM_EPS = 1e-5  # AutoFormer's LayerNormSuper keeps torch's default
HEAD_DIM = 64  # AutoFormer's encoder layer sets the q/k/v width to heads x 64
REL_TABLES = ("rel_pos_embed_k.embeddings_table_v", "rel_pos_embed_k.embeddings_table_h",
              "rel_pos_embed_v.embeddings_table_v", "rel_pos_embed_v.embeddings_table_h")
VITAS_TABLES = ("rel_pos_k.table_v", "rel_pos_k.table_h", "rel_pos_v.table_v", "rel_pos_v.table_h")


@dataclass(frozen=True)
class Supernet:
    """The super sizes and settings of an AutoFormer file."""

    embed: int
    mlp: int
    depth: int
    patch: int
    in_chans: int
    grid: int
    num_classes: int
    rel_pos_max: Optional[int]  # None: no relative positions
    pool: str

    @property
    def img_size(self) -> int:
        """Input size in pixels."""
        return self.grid * self.patch


def _pool(src: Foreign) -> str:
    """The pooling the file's `args` says; refuses settings vitas cannot build."""
    args = src.args
    if args is None:
        raise UserError(f"{src.source} has no 'args' entry: an AutoFormer file records its pooling (--gp) "
                        "and q/k/v layout (--change_qkv) there, and vitas does not guess them")
    if not args.get("change_qkv", False):
        raise UserError(f"{src.source} was trained without --change_qkv: its attention is always the "
                        "super width wide, which AutoFormer's spaces (64-wide heads) do not describe")
    for flag in ("post_norm", "no_abs_pos"):
        if args.get(flag, False):
            raise UserError(f"{src.source} was trained with --{flag}; vitas builds pre-norm blocks with a "
                            "position embedding")
    return "mean" if args.get("gp", False) else "cls"


def read_supernet(src: Foreign) -> tuple[Supernet, Tensors]:
    """Check every tensor of an AutoFormer file against its own super sizes; returns the sizes
    and the tensors (all marked used: a tensor the layout does not have is named)."""
    pool = _pool(src)
    t = Tensors(src.weights, src.source)
    if len(t.shape("patch_embed_super.proj.weight")) != 4:
        raise UserError(f"{src.source}: tensor 'patch_embed_super.proj.weight' is not a 4-D conv weight")
    S, C, p, _ = t.get("patch_embed_super.proj.weight").shape
    t.get("patch_embed_super.proj.bias", (S,))
    t.get("cls_token", (1, 1, S))
    depth = t.count("blocks.{}.attn.qkv.weight")
    M = t.shape("blocks.0.fc1.weight")[0]
    rel_rows = t.shape(f"blocks.0.attn.{REL_TABLES[0]}")[0] if t.has(f"blocks.0.attn.{REL_TABLES[0]}") else None
    for i in range(depth):
        b = f"blocks.{i}."
        for key, shape in (("attn.qkv.weight", (3 * S, S)), ("attn.qkv.bias", (3 * S,)),
                           ("attn.proj.weight", (S, S)), ("attn.proj.bias", (S,)),
                           ("attn_layer_norm.weight", (S,)), ("attn_layer_norm.bias", (S,)),
                           ("ffn_layer_norm.weight", (S,)), ("ffn_layer_norm.bias", (S,)),
                           ("fc1.weight", (M, S)), ("fc1.bias", (M,)), ("fc2.weight", (S, M)), ("fc2.bias", (S,))):
            t.get(b + key, shape, "the file's own super sizes")
        if rel_rows is not None:
            for table in REL_TABLES:
                t.get(f"{b}attn.{table}", (rel_rows, HEAD_DIM), "64-wide heads")
    t.get("norm.weight", (S,))
    t.get("norm.bias", (S,))
    K = t.shape("head.weight")[0]
    t.get("head.weight", (K, S))
    t.get("head.bias", (K,))
    grid = int(round(max(t.shape("pos_embed")[1] - 1, 1) ** 0.5))
    t.get("pos_embed", (1, grid * grid + 1, S), "1 + a square number of patches")
    t.finish("the AutoFormer layout")
    if rel_rows is not None and (rel_rows < 4 or rel_rows % 2):
        raise UserError(f"{src.source}: tensor 'blocks.0.attn.{REL_TABLES[0]}' has {rel_rows} rows, "
                        "expected 2 x max distance + 2")
    return Supernet(embed=S, mlp=M, depth=depth, patch=p, in_chans=C, grid=grid, num_classes=K,
                    rel_pos_max=None if rel_rows is None else (rel_rows - 2) // 2, pool=pool), t


def deinterleave(weight: torch.Tensor) -> torch.Tensor:
    """AutoFormer's qkv rows (3c: q_c, 3c+1: k_c, 3c+2: v_c) as timm's [q; k; v] blocks."""
    rows, cols = weight.shape
    return weight.reshape(rows // 3, 3, cols).transpose(0, 1).reshape(rows, cols)


# ----------------------------------------------------------------------------- into a superformer
def _check_space(sup: Supernet, cfg: Config, src: Foreign) -> SearchSpace:
    """UserError naming the tensor (or the space key) where file and space disagree."""
    c, space = cfg.space, SearchSpace(cfg.space)
    where = f"space {c.name!r}"
    for dim in ("embed", "attn", "mlp"):
        if getattr(c.channels, dim) != "left":
            raise UserError(f"space.channels.{dim} is {getattr(c.channels, dim)!r}: AutoFormer shares "
                            "its weights from the left, so every dimension must be 'left'")
    settings = (("qk", c.qk, "entangled"), ("qkv_bias", c.qkv_bias, True), ("pool", c.pool, sup.pool),
                ("rel_pos", c.rel_pos, sup.rel_pos_max is not None), ("norm_eps", c.norm_eps, NORM_EPS),
                ("qkv_bias_slice", c.qkv_bias_slice, "prefix"),
                ("patch_size", c.patch_size, [sup.patch]), ("in_chans", c.in_chans, sup.in_chans))
    for key, value, wanted in settings:
        if value != wanted:
            raise UserError(f"space.{key} is {value!r}; {src.source} needs {wanted!r}")
    sizes = (("patch_embed_super.proj.weight", "super_embed_dim", space.super_embed_dim, sup.embed),
             ("blocks.0.attn.qkv.weight", "super_attn_dim", space.super_attn_dim, sup.embed),
             ("blocks.0.fc1.weight", "super_mlp_dim", space.super_mlp_dim, sup.mlp),
             (f"blocks.{min(sup.depth, space.super_depth)}.attn.qkv.weight", "super_depth",
              space.super_depth, sup.depth))
    for tensor, key, wanted, found in sizes:
        if wanted != found:
            raise UserError(f"{src.source}: tensor '{tensor}' says the file's {key} is {found}, {where} "
                            f"has {wanted}: the file is of another space")
    if sup.img_size != c.img_size:
        g = c.img_size // sup.patch
        raise UserError(f"{src.source}: tensor 'pos_embed' holds 1 + {sup.grid}x{sup.grid} positions "
                        f"({sup.img_size} px); space.img_size {c.img_size} needs 1 + {g}x{g}")
    if sup.rel_pos_max is not None and sup.rel_pos_max != c.rel_pos_max:
        raise UserError(f"{src.source}: tensor 'blocks.0.attn.{REL_TABLES[0]}' reaches distance "
                        f"{sup.rel_pos_max}; space.rel_pos_max is {c.rel_pos_max}")
    return space


def to_superformer(src: Foreign, cfg: Config) -> tuple[dict, list[str]]:
    """The superformer checkpoint of `cfg`'s space holding the AutoFormer supernet `src`."""
    sup, t = read_supernet(src)
    space = _check_space(sup, cfg, src)
    w = t.weights
    stem = f"stems.{sup.patch}."
    state = {stem + "proj.weight": w["patch_embed_super.proj.weight"],
             stem + "proj.bias": w["patch_embed_super.proj.bias"],
             stem + "cls_token": w["cls_token"], stem + "pos_embed": w["pos_embed"]}
    for i in range(sup.depth):
        b = f"blocks.{i}."
        state[b + "attn.qkv.weight"] = deinterleave(w[b + "attn.qkv.weight"])
        state[b + "attn.qkv.bias"] = w[b + "attn.qkv.bias"]
        for ours, theirs in (("norm1", "attn_layer_norm"), ("norm2", "ffn_layer_norm"), ("attn.proj", "attn.proj"),
                             ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")):
            for p in ("weight", "bias"):
                state[f"{b}{ours}.{p}"] = w[f"{b}{theirs}.{p}"]
        if sup.rel_pos_max is not None:
            for ours, theirs in zip(VITAS_TABLES, REL_TABLES):
                state[f"{b}attn.{ours}"] = w[f"{b}attn.{theirs}"]
    for p in ("weight", "bias"):
        state[f"norm.{p}"] = w[f"norm.{p}"]
        state[f"head.{p}"] = w[f"head.{p}"]
    epoch = src.entries.get("epoch") if src.where else None
    completed = epoch + 1 if isinstance(epoch, int) and not isinstance(epoch, bool) else 0
    notes = []
    if len(space.head_choices) > 1:
        notes.append("AutoFormer slices its q/k/v bias as one prefix bias[:3a]; the superformer slices q, "
                     "k and v separately, so k and v biases match AutoFormer only in layers at the largest "
                     "head count (weights, q bias and everything else match in every subnet)")
    return superformer_checkpoint(src, NAME, state, cfg, sup.num_classes, completed), notes


# ----------------------------------------------------------------------------- one subnet, static
def _check_subnet(arch: dict, sup: Supernet, src: Foreign) -> None:
    """The subnet must fit the file's super sizes with 64-wide heads."""
    if arch["embed_dim"] > sup.embed or arch["depth"] > sup.depth:
        raise UserError(f"--arch (embed_dim {arch['embed_dim']}, depth {arch['depth']}) exceeds {src.source} "
                        f"(embed_dim {sup.embed}, depth {sup.depth})")
    for i, (h, a, m) in enumerate(zip(arch["num_heads"], arch["attn_dim"], arch["mlp_dim"])):
        if a != h * HEAD_DIM or a > sup.embed or m > sup.mlp:
            raise UserError(f"--arch layer {i} (num_heads {h}, attn_dim {a}, mlp_dim {m}) is not an AutoFormer "
                            f"subnet of {src.source}: attn_dim = 64 x num_heads <= {sup.embed}, mlp_dim <= {sup.mlp}")


def to_static(src: Foreign, arch: dict, cfg: Optional[Config]) -> tuple[dict, list[str]]:
    """The static checkpoint of subnet `arch` of the AutoFormer supernet `src`, sliced exactly as
    AutoFormer slices it (prefixes; bias[:3a] for q, k, v)."""
    sup, t = read_supernet(src)
    found = {**{field: arch.get(field) for field in WIDTHS}, "patch_size": sup.patch}
    arch = resolve_arch(found, src.source, arch=arch)
    _check_subnet(arch, sup, src)
    w, E = t.weights, arch["embed_dim"]
    state = {"patch_embed.proj.weight": w["patch_embed_super.proj.weight"][:E],
             "patch_embed.proj.bias": w["patch_embed_super.proj.bias"][:E],
             "cls_token": w["cls_token"][..., :E], "pos_embed": w["pos_embed"][..., :E]}
    for i, (a, m) in enumerate(zip(arch["attn_dim"], arch["mlp_dim"])):
        b = f"blocks.{i}."
        state[b + "attn.qkv.weight"] = deinterleave(w[b + "attn.qkv.weight"][:3 * a, :E])
        state[b + "attn.qkv.bias"] = w[b + "attn.qkv.bias"][:3 * a]
        state[b + "attn.proj.weight"] = w[b + "attn.proj.weight"][:E, :a]
        state[b + "attn.proj.bias"] = w[b + "attn.proj.bias"][:E]
        state[b + "mlp.fc1.weight"] = w[b + "fc1.weight"][:m, :E]
        state[b + "mlp.fc1.bias"] = w[b + "fc1.bias"][:m]
        state[b + "mlp.fc2.weight"] = w[b + "fc2.weight"][:E, :m]
        state[b + "mlp.fc2.bias"] = w[b + "fc2.bias"][:E]
        for ours, theirs in (("norm1", "attn_layer_norm"), ("norm2", "ffn_layer_norm")):
            state[f"{b}{ours}.weight"] = w[f"{b}{theirs}.weight"][:E]
            state[f"{b}{ours}.bias"] = w[f"{b}{theirs}.bias"][:E]
        if sup.rel_pos_max is not None:
            for ours, theirs in zip(VITAS_TABLES, REL_TABLES):
                state[f"{b}attn.{ours}"] = w[f"{b}attn.{theirs}"]
    state.update({"norm.weight": w["norm.weight"][:E], "norm.bias": w["norm.bias"][:E],
                  "head.weight": w["head.weight"][:, :E], "head.bias": w["head.bias"]})
    model_args = dict(arch=arch, num_classes=sup.num_classes, img_size=sup.img_size, in_chans=sup.in_chans,
                      qkv_bias=True, rel_pos=sup.rel_pos_max is not None, rel_pos_max=sup.rel_pos_max or 14,
                      pool=sup.pool, norm_eps=NORM_EPS, final_norm_eps=NORM_EPS)
    state = {k: v.clone() for k, v in state.items()}  # own storage: not views of the whole supernet
    return static_checkpoint(src, NAME, model_args, state, cfg), []
