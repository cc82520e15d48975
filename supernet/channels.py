"""Channel policies: which channels of a dimension of super size C a subnet of width w uses.

- `left` (AutoFormer, AutoSlim): [0, w).
- `bilateral` (BCNet): [0, w) on the left pass, [C-w, C) on the right pass.
- `cyclic` (ViTAS, the project's reconstruction of "cyclic weight sharing"): the K candidate
  widths w_1 < ... < w_K are laid end to end around a ring of C channels; width k uses the
  window that starts at (w_1 + ... + w_(k-1)) mod C and wraps past C. A width equal to C is the
  whole ring [0, C). Every channel is then used by nearly the same number of candidates.

A `ChannelSet` is a contiguous slice (weights are taken as views, which is fast) or, for a
wrapped window, an index in ring order (cached per device; only indices are cached, never sliced
weights, so gradients always reach the super-parameters).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from vitas.core.config import POLICIES


class ChannelSet:
    """The channels one width uses, in the order every tensor of the dimension must follow."""

    __slots__ = ("width", "size", "start", "_indices", "_index_cache")

    def __init__(self, size: int, indices: Sequence[int]):
        self.size = size
        self.width = len(indices)
        self._indices = tuple(int(i) for i in indices)
        contiguous = all(b == a + 1 for a, b in zip(self._indices, self._indices[1:]))
        self.start: Optional[int] = self._indices[0] if contiguous and self.width else None
        self._index_cache: dict[torch.device, torch.Tensor] = {}

    @property
    def contiguous(self) -> bool:
        """True when the set is one slice [start, start + width)."""
        return self.start is not None

    @property
    def full(self) -> bool:
        """True when the set is the whole dimension in natural order (no slicing needed)."""
        return self.start == 0 and self.width == self.size

    def indices(self) -> list[int]:
        """The channel indices in order (for extraction and tests)."""
        return list(self._indices)

    def index(self, device: torch.device) -> torch.Tensor:
        """The indices as a LongTensor on `device`, built once per device."""
        idx = self._index_cache.get(device)
        if idx is None:
            idx = torch.tensor(self._indices, dtype=torch.long, device=device)
            self._index_cache[device] = idx
        return idx

    def take(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """The selected channels of `t` along `dim`: a view for a slice, a gather otherwise."""
        if self.full:
            return t
        if self.start is not None:
            return t.narrow(dim, self.start, self.width)
        return t.index_select(dim, self.index(t.device))

    def __repr__(self) -> str:
        if self.start is not None:
            return f"ChannelSet([{self.start}, {self.start + self.width}) of {self.size})"
        return f"ChannelSet({self.width} wrapped of {self.size})"


class ChannelPolicy:
    """A policy for one dimension of super size `size` whose candidate widths are `widths`."""

    def __init__(self, name: str, size: int, widths: Sequence[int]):
        if name not in POLICIES:
            raise ValueError(f"channel policy must be one of {list(POLICIES)}, got {name!r}")
        widths = sorted(set(int(w) for w in widths))
        if not widths or widths[0] <= 0 or widths[-1] > size:
            raise ValueError(f"widths {widths} do not fit a dimension of size {size}")
        self.name = name
        self.size = size
        self.widths = widths
        self._offsets = {}
        offset = 0
        for w in widths:
            self._offsets[w] = offset % size
            offset += w
        self._cache: dict[tuple[int, str], ChannelSet] = {}

    def indices(self, width: int, side: str = "left") -> list[int]:
        """Channel indices (in order) that `width` uses on pass `side` (`left` or `right`)."""
        C = self.size
        if self.name == "bilateral" and side == "right":
            return list(range(C - width, C))
        if self.name == "cyclic" and width != C:
            if width not in self._offsets:
                raise ValueError(f"width {width} is not a candidate of the cyclic ring {self.widths}")
            start = self._offsets[width]
            return [(start + i) % C for i in range(width)]
        return list(range(width))

    def select(self, width: int, side: str = "left") -> ChannelSet:
        """The cached ChannelSet of `width` on pass `side` (side only matters for bilateral)."""
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        if not 0 < width <= self.size:
            raise ValueError(f"width {width} does not fit a dimension of size {self.size}")
        key = (width, side if self.name == "bilateral" else "left")
        found = self._cache.get(key)
        if found is None:
            found = ChannelSet(self.size, self.indices(width, key[1]))
            self._cache[key] = found
        return found

    def usage_counts(self, side: str = "left") -> list[int]:
        """How many candidate widths use each channel (the balance cyclic sharing aims for)."""
        counts = [0] * self.size
        for w in self.widths:
            for i in self.indices(w, side):
                counts[i] += 1
        return counts
