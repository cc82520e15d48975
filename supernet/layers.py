"""Elastic layers and the attention kernel shared by the superformer and the static ViT.

Elastic layers subclass `nn.Linear`, `nn.LayerNorm` and `nn.Conv2d`, so their state-dict keys stay
the standard ones; they hold the active `ChannelSet`s (set by the superformer) and take the active
slices of their weights inside `forward`, so gradients reach the super-parameters. `None` as a
channel set means the whole dimension.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vitas.supernet.channels import ChannelSet


def _take(t: torch.Tensor, dim: int, channels: Optional[ChannelSet]) -> torch.Tensor:
    return t if channels is None else channels.take(t, dim)


class ElasticLinear(nn.Linear):
    """`nn.Linear` using the active input and output channels of its super weight.

    With `out_groups` g > 1 the output rows form g equal blocks (e.g. timm's [q; k; v]) and the
    output channel set applies inside each block.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, out_groups: int = 1):
        super().__init__(in_features, out_features, bias=bias)
        if out_features % out_groups:
            raise ValueError(f"out_features {out_features} is not divisible by out_groups {out_groups}")
        self.out_groups = out_groups
        self.in_channels: Optional[ChannelSet] = None
        self.out_channels: Optional[ChannelSet] = None

    def set_channels(self, in_channels: Optional[ChannelSet], out_channels: Optional[ChannelSet]) -> None:
        """Activate input and output channel sets (None: all)."""
        self.in_channels, self.out_channels = in_channels, out_channels

    def active_weight(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The active (weight, bias), differentiable w.r.t. the super-parameters."""
        g = self.out_groups
        if g == 1:
            weight = _take(_take(self.weight, 0, self.out_channels), 1, self.in_channels)
            bias = None if self.bias is None else _take(self.bias, 0, self.out_channels)
            return weight, bias
        weight = self.weight.view(g, -1, self.in_features)
        weight = _take(_take(weight, 1, self.out_channels), 2, self.in_channels)
        weight = weight.reshape(-1, weight.shape[-1])
        bias = None
        if self.bias is not None:
            bias = _take(self.bias.view(g, -1), 1, self.out_channels).reshape(-1)
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.active_weight()
        return F.linear(x, weight, bias)


class ElasticLayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` over the active channels (normalising only those)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, eps=eps)
        self.channels: Optional[ChannelSet] = None

    def set_channels(self, channels: Optional[ChannelSet]) -> None:
        """Activate a channel set (None: all)."""
        self.channels = channels

    def active_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The active (weight, bias)."""
        return _take(self.weight, 0, self.channels), _take(self.bias, 0, self.channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.active_weight()
        return F.layer_norm(x, (x.shape[-1],), weight, bias, self.eps)


class ElasticConv2d(nn.Conv2d):
    """`nn.Conv2d` producing the active output channels (the patch embedding)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride)
        self.out_set: Optional[ChannelSet] = None

    def set_channels(self, out_set: Optional[ChannelSet]) -> None:
        """Activate an output channel set (None: all)."""
        self.out_set = out_set

    def active_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The active (weight, bias)."""
        return _take(self.weight, 0, self.out_set), _take(self.bias, 0, self.out_set)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.active_weight()
        return F.conv2d(x, weight, bias, self.stride)


class RelativePosition2D(nn.Module):
    """AutoFormer's 2-D relative position table: (vertical, horizontal) pair shared by all heads.

    Distances are clipped to +-`max_distance` and shifted by +1; index 0 is reserved for every
    pair involving the class token. `forward(tokens)` gives the (N, N, head_dim) embeddings.
    """

    def __init__(self, head_dim: int, max_distance: int):
        super().__init__()
        self.max_distance = max_distance
        self.table_v = nn.Parameter(torch.zeros(2 * max_distance + 2, head_dim))
        self.table_h = nn.Parameter(torch.zeros(2 * max_distance + 2, head_dim))
        nn.init.trunc_normal_(self.table_v, std=0.02)
        nn.init.trunc_normal_(self.table_h, std=0.02)
        self._index_cache: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def _indices(self, tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tokens, device)
        found = self._index_cache.get(key)
        if found is None:
            side = int(round((tokens - 1) ** 0.5))
            if side * side != tokens - 1:
                raise ValueError(f"relative positions need a square token grid, got {tokens - 1} patch tokens")
            pos = torch.arange(tokens - 1)
            rows, cols = pos // side, pos % side
            m = self.max_distance
            dv = (rows[None, :] - rows[:, None]).clamp(-m, m) + m + 1
            dh = (cols[None, :] - cols[:, None]).clamp(-m, m) + m + 1
            found = (F.pad(dv, (1, 0, 1, 0)).to(device), F.pad(dh, (1, 0, 1, 0)).to(device))
            self._index_cache[key] = found
        return found

    def forward(self, tokens: int) -> torch.Tensor:
        iv, ih = self._indices(tokens, self.table_v.device)
        return self.table_v[iv] + self.table_h[ih]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    rel_k: Optional[torch.Tensor] = None,
    rel_v: Optional[torch.Tensor] = None,
    explicit: bool = False,
) -> torch.Tensor:
    """Multi-head attention on (B, heads, N, head_dim) tensors, returning the same shape.

    Without relative positions and unless `explicit`, this is `F.scaled_dot_product_attention`
    (fused, fast; under `sdpa_kernel(SDPBackend.MATH)` it also supports forward-mode AD). The
    explicit path writes softmax(q k^T * scale) v out, adding AutoFormer's relative terms
    q . rel_k * scale to the logits and attn @ rel_v to the output as (N, B*heads, .) batched
    matmuls (so FlopCounterMode sees N*N*head_dim MACs per head for each).
    """
    if rel_k is None and rel_v is None and not explicit:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    B, H, N, D = q.shape
    q = q * scale
    attn = q @ k.transpose(-2, -1)
    if rel_k is not None:
        q_by_pos = q.permute(2, 0, 1, 3).reshape(N, B * H, D)
        attn = attn + (q_by_pos @ rel_k.transpose(1, 2)).transpose(0, 1).reshape(B, H, N, N)
    attn = attn.softmax(dim=-1)
    out = attn @ v
    if rel_v is not None:
        attn_by_pos = attn.permute(2, 0, 1, 3).reshape(N, B * H, N)
        out = out + (attn_by_pos @ rel_v).reshape(N, B, H, D).permute(1, 2, 0, 3)
    return out


def split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, 3*attn) laid out [q; k; v] -> q, k, v of (B, heads, N, attn/heads): each of q, k
    and v is cut into `heads` contiguous chunks in channel order."""
    B, N, C3 = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, heads, C3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v  # unbind, not indexing: its backward is one stack, not three zero-filled copies


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, head_dim) -> (B, N, heads*head_dim)."""
    B, H, N, D = x.shape
    return x.transpose(1, 2).reshape(B, N, H * D)
