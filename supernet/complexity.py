"""Analytic cost of an architecture: parameters and MACs (DESIGN 4), pure Python arithmetic.

With T = (img_size / patch)^2 + 1 tokens (class token included), embed E, and per layer a, m
(attn and MLP widths):

- MACs: patch conv (T-1)*E*in_chans*patch^2; per layer q/k/v T*E*3a, QK^T T*T*a, AV T*T*a,
  proj T*a*E, fc1 T*E*m, fc2 T*m*E; the head on one token E*classes. No bias, norm, softmax,
  GELU or pooling. With AutoFormer's relative positions each layer adds its two matmuls: q
  against the k-table (T*T*head_dim per head, i.e. T*T*a) and attention against the v-table
  (the same). This equals `torch.utils.flop_counter.FlopCounterMode` total / 2 of the extracted
  model exactly (the tests check it).
- params: the parameter count of the extracted `StaticViT` (biases, norms, class token, position
  embedding and relative tables included).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # a type hint only: space.py calls arch_cost for SearchSpace.cost
    from vitas.supernet.space import SearchSpace


class Cost(NamedTuple):
    """Parameter count and multiply-accumulates of one forward pass on one image."""

    params: int
    macs: int


def arch_cost(arch: dict, space: SearchSpace, num_classes: int) -> Cost:
    """Cost of a valid `arch` of `space` with a `num_classes`-way head. Identity encodings are
    canonicalised; other architectures are taken as given (validate user input first with
    `space.validate`), which keeps this at well over 10,000 architectures per second."""
    if "identity" in arch:
        arch = space.canonical(arch)
    c = space.cfg
    patch, E = arch["patch_size"], arch["embed_dim"]
    patches = (c.img_size // patch) ** 2
    T = patches + 1
    conv = c.in_chans * patch * patch * E
    params = conv + E + E + T * E  # conv weight and bias, class token, position embedding
    macs = patches * conv
    rel_params = 4 * (2 * c.rel_pos_max + 2) * c.head_dim if c.rel_pos else 0
    qkv_bias = 1 if c.qkv_bias else 0
    for a, m in zip(arch["attn_dim"], arch["mlp_dim"]):
        # norms 4E; qkv 3aE (+3a); proj aE + E; fc1 Em + m; fc2 mE + E
        params += 4 * E + 3 * a * (E + qkv_bias) + a * E + E + 2 * E * m + m + E + rel_params
        macs += T * (4 * a * E + 2 * E * m) + 2 * T * T * a * (2 if c.rel_pos else 1)
    params += 2 * E + E * num_classes + num_classes
    macs += E * num_classes
    return Cost(params=params, macs=macs)
