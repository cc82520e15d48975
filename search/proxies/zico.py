"""ZiCo (Li et al., ICLR 2023): zero-shot proxy from the inverse coefficient of variation of the
gradients across mini-batches; higher is better.

ZiCo = sum over layers l of log( sum over weights theta of l of mean_b |g_b(theta)| /
std_b(g_b(theta)) ), g_b the loss gradient of mini-batch b, std without Bessel's correction (as
ZiCo's code); weights whose gradient does not vary (std 0) are left out, and so is a layer whose
sum is 0. Dividing by the spread makes it invariant to scaling the loss.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def zico(grads: list[dict[str, torch.Tensor]]) -> Optional[float]:
    """ZiCo from per-batch gradients (one dict of layer-weight gradients per batch, >= 2 batches);
    None when no layer's gradients vary across batches (degenerate)."""
    if len(grads) < 2:
        raise ValueError(f"ZiCo needs at least 2 batches, got {len(grads)}")
    total, layers = 0.0, 0
    for name in grads[0]:
        g = torch.stack([b[name].reshape(-1) for b in grads]).double()
        std = (g - g.mean(dim=0)).pow(2).mean(dim=0).sqrt()  # as Tensor.std(dim=0), many times faster here
        varies = std > 0
        ratio = float((g.abs().mean(dim=0)[varies] / std[varies]).sum())
        if ratio > 0:
            total += math.log(ratio)
            layers += 1
    return total if layers and math.isfinite(total) else None
