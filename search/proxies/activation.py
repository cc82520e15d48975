"""NWOT (Mellor et al., "Neural Architecture Search without Training", ICML 2021): the log
determinant of the kernel of binary activation patterns over the proxy batch; higher is better.

Every activation (GELU in a ViT's MLPs, ReLU elsewhere) gives each image a binary code, 1 where the
unit's input is positive, over all its tokens and units. K[i, j] = number of units on which images
i and j agree = c_i.c_j + (1 - c_i).(1 - c_j) (N_A minus the Hamming distance), summed over the
activation layers; NWOT = log |det K| (float64 slogdet). A singular K (two images with the same
pattern) has no finite log determinant: the value is None (invalid).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

ACTIVATIONS = (nn.GELU, nn.ReLU)


def activation_kernel(model: nn.Module, images: torch.Tensor) -> Optional[torch.Tensor]:
    """K (float64, B x B) of `model` on `images`, or None when the model has no activation layer."""
    n = len(images)
    kernel = torch.zeros(n, n, dtype=torch.float64, device=images.device)

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        c = (inputs[0] > 0).reshape(n, -1).float()  # exact: counts stay far below 2^24 per layer
        kernel.add_((c @ c.T + (1 - c) @ (1 - c).T).double())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, ACTIVATIONS)]
    if not handles:
        return None
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    return kernel


def nwot(model: nn.Module, images: torch.Tensor) -> Optional[float]:
    """log |det K| of the activation-pattern kernel, or None (no activations, or K singular)."""
    kernel = activation_kernel(model, images)
    if kernel is None:
        return None
    sign, logdet = torch.linalg.slogdet(kernel.cpu())
    value = float(logdet)
    return value if float(sign) > 0 and math.isfinite(value) else None
