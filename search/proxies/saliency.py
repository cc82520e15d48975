"""Synaptic-saliency proxies: SNIP, synflow and TF-TAS's DSS indicator (higher is better for all).

- SNIP (Lee et al., ICLR 2019; summed as in Abdelfattah et al., ICLR 2021):
  sum over layer weights of |W * dL/dW|, L the cross-entropy of the proxy batch.
- synflow (Tanaka et al., NeurIPS 2020): on the linearised network (every parameter |theta|, one
  all-ones input, R = sum of the outputs, float64), sum over layer weights of |W * dR/dW|.
- DSS (Zhou et al., TF-TAS, CVPR 2022): on the same linearised pass, the synaptic diversity of
  every multi-head attention weight (a Linear inside a module named `attn`: qkv and proj),
  ||dR/dW||_nuc * ||W||_nuc, plus the synaptic saliency of every MLP weight (a Linear inside a
  module named `mlp`), sum |W * dR/dW|. Patch embedding and head are not part of it.
"""
from __future__ import annotations

from typing import Optional

import torch


def snip(weights: dict[str, torch.Tensor], grads: list[dict[str, torch.Tensor]]) -> float:
    """sum |W * g|, g the whole-batch loss gradient (the mean of equal-size batch gradients)."""
    total = 0.0
    for name, w in weights.items():
        g = torch.stack([b[name] for b in grads]).double().mean(dim=0)
        total += float((w.detach().double() * g).abs().sum())
    return total


def synflow(linearised: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> float:
    """sum over layer weights of |W * dR/dW| of the linearised network."""
    return float(sum((w * g).abs().sum() for w, g in linearised.values()))


def _module_kind(weight_name: str) -> Optional[str]:
    """`attn` or `mlp` when the weight's module sits inside a module of that name, else None."""
    parts = weight_name.split(".")[:-2]
    for kind in ("attn", "mlp"):
        if kind in parts:
            return kind
    return None


def dss(linearised: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Optional[float]:
    """TF-TAS's DSS: nuclear-norm diversity of the attention weights plus saliency of the MLP
    weights; None when the model has neither (no transformer blocks to score)."""
    total, found = 0.0, False
    for name, (w, g) in linearised.items():
        kind = _module_kind(name)
        if kind == "attn":
            w2, g2 = w.reshape(w.shape[0], -1), g.reshape(g.shape[0], -1)
            total += float(torch.linalg.matrix_norm(g2, "nuc") * torch.linalg.matrix_norm(w2, "nuc"))
        elif kind == "mlp":
            total += float((w * g).abs().sum())
        found = found or kind is not None
    return total if found else None
