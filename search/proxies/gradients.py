"""Gradients that several zero-cost proxies share: of a classification loss per mini-batch (SNIP,
ZiCo), and of the summed output of the linearised network on an all-ones input (synflow, DSS).

"Layer weights" are the weights of every `nn.Linear` and `nn.Conv2d` (the layers that zero-cost
proxy papers score; not norms, biases, tokens or position tables).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def layer_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight of every Linear and Conv2d of `model`, by qualified parameter name."""
    return {f"{name}.weight" if name else "weight": m.weight for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))}


def loss_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batches: int,
                   loss_fn: LossFn = F.cross_entropy) -> list[dict[str, torch.Tensor]]:
    """Gradients of `loss_fn` (mean over the batch) w.r.t. the layer weights, one dict per batch:
    batch b holds images b, b + batches, b + 2 batches, ... (interleaved, so that batches of a
    class-sorted proxy batch mix the classes); their mean is the whole-batch gradient."""
    if len(images) % batches:
        raise ValueError(f"{len(images)} images do not split into {batches} equal batches")
    weights = layer_weights(model)
    grads = []
    for b in range(batches):
        x, y = images[b::batches], labels[b::batches]
        g = torch.autograd.grad(loss_fn(model(x), y), list(weights.values()), allow_unused=True)
        grads.append({n: (t if t is not None else torch.zeros_like(w)).detach()
                      for (n, w), t in zip(weights.items(), g)})
    return grads


def linearised_gradients(model: nn.Module, input_shape: Sequence[int]
                         ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Synflow's pass: every parameter replaced by its absolute value (float64, `model` itself is
    not changed), one all-ones input, R = sum of the outputs; for each layer weight the pair
    (|W|, dR/d|W|)."""
    params = {n: p.detach().abs().double() for n, p in model.named_parameters()}
    weights = [n for n in layer_weights(model) if n in params]
    for n in weights:
        params[n].requires_grad_(True)
    x = torch.ones((1, *input_shape), dtype=torch.float64, device=next(model.parameters()).device)
    with sdpa_kernel(SDPBackend.MATH):
        total = functional_call(model, params, (x,), strict=False).sum()
        grads = torch.autograd.grad(total, [params[n] for n in weights], allow_unused=True)
    return {n: (params[n].detach(), (g if g is not None else torch.zeros_like(params[n])).detach())
            for n, g in zip(weights, grads)}
