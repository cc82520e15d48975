"""Analytic parameters and MACs of an As-ViT architecture (DESIGN 4 adapted to the hierarchy).

MACs count the tokenizing conv (g1^2 * C * in_chans * K1^2), each re-embedding's linear layer
(g_i^2 * K_i^2 * W_(i-1) * W_i), per block q/k/v (T * W * 3a), QK^T and AV inside the windows
(2 * a * sum over windows of n_w^2, n_w the window's tokens), proj (T * a * W), fc1 and fc2
(2 * T * W * E * W), and the classifier on the one pooled vector. Nothing else: no bias, norm,
softmax, GELU, tanh, padding, unfold or pooling; the optional pre-logits layer adds W4 * W4. This equals `FlopCounterMode` total / 2 of `AsViT`
(tests/test_asvit.py). Params are `AsViT`'s parameter count. Pure integer arithmetic.
"""
from __future__ import annotations

from typing import Optional

from vitas.supernet.asvit import (STEM_STRIDE, WIDTH_CAP, stage_grids, stage_heads, stage_widths,
                                  window_sizes)
from vitas.supernet.complexity import Cost


def window_macs_factor(grid: int, splits: int) -> int:
    """Sum over the windows of (tokens per window)^2 on a `grid` x `grid` map cut `splits` ways."""
    side = sum(n * n for n in window_sizes(grid, splits))
    return side * side


def asvit_cost(arch: dict, num_classes: int, img_size: int, in_chans: int = 3, qkv_bias: bool = True,
               width_cap: Optional[int] = WIDTH_CAP, pre_logits: bool = True,
               stem_stride: int = STEM_STRIDE) -> Cost:
    """Params and MACs of one forward pass on one `img_size` image of a consistent `arch` (see
    `supernet.asvit.check_asvit_arch`); `stem_stride` is the tokenizing conv's stride (4, or a
    coarser one during progressive re-tokenization: the dilation changes no count)."""
    widths, heads = stage_widths(arch["embed_dim"], width_cap), stage_heads(arch["num_heads"])
    grids = stage_grids(img_size, stem_stride)
    bias = 1 if qkv_bias else 0
    stages = arch["stages"]
    k1 = stages[0]["kernel"]
    params = in_chans * k1 * k1 * widths[0] + widths[0] + 2 * widths[0]  # conv, its bias, norm
    macs = grids[0] ** 2 * widths[0] * in_chans * k1 * k1
    for i, s in enumerate(stages):
        W, T = widths[i], grids[i] ** 2
        if i:
            patch = s["kernel"] ** 2 * widths[i - 1]
            params += 2 * patch + patch * W  # norm over the concatenated window, bias-free linear
            macs += T * patch * W
        a = heads[i] * (W // heads[i])  # attention width (As-ViT truncates to whole heads)
        m = s["expansion"] * W
        block_params = 4 * W + 3 * a * (W + bias) + a * W + W + 2 * W * m + m + W
        block_macs = T * (4 * a * W + 2 * W * m) + 2 * a * window_macs_factor(grids[i], s["split"])
        params += s["depth"] * block_params
        macs += s["depth"] * block_macs
    F = widths[-1]
    params += 2 * F + F * num_classes + num_classes + ((F * F + F) if pre_logits else 0)
    macs += F * num_classes + (F * F if pre_logits else 0)
    return Cost(params=params, macs=macs)
