"""Top-k accuracy over a loader, summed across all ranks so every process reports the same value."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist


@torch.no_grad()
def topk_correct(logits: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose target is among the k highest logits, for each k."""
    k_max = min(max(topk), logits.shape[1])
    pred = logits.topk(k_max, dim=1).indices
    hit = pred.eq(target.view(-1, 1))
    return [int(hit[:, : min(k, k_max)].any(dim=1).sum()) for k in topk]


@torch.no_grad()
def evaluate_accuracy(
    model: torch.nn.Module,
    loader: Iterable,
    device: torch.device | str = "cpu",
    topk: tuple[int, ...] = (1, 5),
) -> dict:
    """`{"top1", "top5", "images"}` (percent) of `model` on `loader`, all-reduced over ranks.

    Each rank evaluates its own shard; correct counts and image counts are summed, so the result
    equals a single process over the union of the shards.
    """
    model.eval()
    counts = torch.zeros(len(topk) + 1, dtype=torch.float64)
    for images, target in loader:
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        logits = model(images)
        counts[:-1] += torch.tensor(topk_correct(logits, target, topk), dtype=torch.float64)
        counts[-1] += target.shape[0]
    if dist.is_available() and dist.is_initialized():
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        counts = counts.to(backend_device)
        dist.all_reduce(counts)
        counts = counts.cpu()
    images = int(counts[-1])
    out = {f"top{k}": (100.0 * float(c) / images if images else 0.0) for k, c in zip(topk, counts[:-1])}
    out["images"] = images
    return out
