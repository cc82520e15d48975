"""Which subnets each superformer training step trains: the passes of a step.

Sampling modes (`supernet.sampling`), each step's passes on the same batch:
- `uniform` (AutoFormer): one random subnet; its side is random where a policy is bilateral.
- `autoslim`: one random subnet on the left pass only.
- `bcnet` (BCNet): one random subnet on the left and on the right pass, a loss on each.
- `sandwich` (BigNAS): the max, the min and a random subnet.
Options on top of every mode:
- `supernet.cost_sampling: macs_bins` (ElasticViT's complexity-aware sampling): the random subnet
  is drawn by first picking one of `supernet.cost_bins` equal-width MACs bins uniformly, then an
  architecture inside it, so every cost range is trained as often (uniform genes pile their sums
  up in the middle of the range).
- `supernet.distill` (BigNAS / AlphaNet in-place distillation): the max subnet teaches the
  others; a mode without a max pass gets one, first.
- `supernet.max_warmup_epochs`: the first epochs train the max subnet alone.
Every rank takes the same passes at every step: they are drawn from a generator seeded by
(seed, global step) alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from vitas.core.config import SupernetConfig
from vitas.core.engine import derive_seed
from vitas.core.errors import UserError
from vitas.supernet.space import SearchSpace

_STEP_STREAM, _VAL_STREAM = 1, 2  # separate seed streams: per-step subnets, validation subnets


@dataclass(frozen=True)
class Pass:
    """One forward/backward of a step: a subnet on one side, named for its logged loss."""

    name: str
    arch: dict
    side: str = "left"


def is_bilateral(space: SearchSpace) -> bool:
    """Whether any dimension uses the bilateral (BCNet) policy, i.e. a right pass exists."""
    return space.cfg.channels.bilateral


def step_passes(space: SearchSpace, sampling: str, seed: int, step: int,
                draw: Optional[Callable[[np.random.Generator], dict]] = None) -> list[Pass]:
    """The subnets of global step `step` in mode `sampling`: a function of (seed, step) only, so
    equal on all ranks. `draw(rng)` draws the random subnet (default: uniform genes)."""
    rng = np.random.default_rng(derive_seed(seed, _STEP_STREAM, step))
    arch = (draw or space.sample)(rng)
    if sampling == "uniform":
        side = "right" if is_bilateral(space) and rng.integers(2) else "left"
        return [Pass("rand", arch, side)]
    if sampling == "autoslim":
        return [Pass("rand", arch, "left")]
    if sampling == "bcnet":
        return [Pass("left", arch, "left"), Pass("right", arch, "right")]
    if sampling == "sandwich":  # min and random on one side per step, as uniform draws it
        side = "right" if is_bilateral(space) and rng.integers(2) else "left"
        return [Pass("max", space.max_arch()), Pass("min", space.min_arch(), side),
                Pass("rand", arch, side)]
    raise ValueError(f"unknown sampling {sampling!r}")  # the config schema admits no other


class CostBins:
    """Equal-width MACs bins over the space's range; `draw(rng)` picks a bin uniformly, then an
    architecture inside it (bins no architecture falls into are left out when built)."""

    def __init__(self, space: SearchSpace, cost_fn: Callable[[dict], Any], bins: int, seed: int = 0):
        self.space, self.cost_fn = space, cost_fn
        lo, hi = space.cost_span(cost_fn)["macs"]
        edges = np.linspace(lo, hi, bins + 1)
        self.bins: list[tuple[int, int]] = []
        rng = np.random.default_rng(seed)
        for b in range(bins):
            rng_bin = (int(edges[b]), int(edges[b + 1]) if b < bins - 1 else int(hi))
            try:
                space.sample_in_range(rng, cost_fn, macs=rng_bin, max_tries=2000)
            except UserError:
                continue
            self.bins.append(rng_bin)
        if not self.bins:
            raise UserError("supernet.cost_sampling=macs_bins: no MACs bin of the space holds an architecture")

    def bin_of(self, macs: int) -> int:
        """Index (in `self.bins`) of the bin holding `macs` (the last bin's end is included)."""
        for i, (lo, hi) in enumerate(self.bins):
            if lo <= macs < hi or (i == len(self.bins) - 1 and macs == hi):
                return i
        raise ValueError(f"{macs} MACs lie outside every bin")

    def draw(self, rng: np.random.Generator) -> dict:
        lo, hi = self.bins[int(rng.integers(len(self.bins)))]
        return self.space.sample_in_range(rng, self.cost_fn, macs=(lo, hi), max_tries=20000)


class SubnetSampler:
    """The passes of every step for a `SupernetConfig` (see the module docstring)."""

    def __init__(self, space: SearchSpace, sec: SupernetConfig, cost_fn: Callable[[dict], Any]):
        self.space, self.sec = space, sec
        self.bins = CostBins(space, cost_fn, sec.cost_bins, sec.seed) if sec.cost_sampling == "macs_bins" else None

    def passes(self, step: int, epoch: int) -> list[Pass]:
        """The passes of global step `step` (in epoch `epoch`, 0-based)."""
        if epoch < self.sec.max_warmup_epochs:
            return [Pass("max", self.space.max_arch())]
        passes = step_passes(self.space, self.sec.sampling, self.sec.seed, step,
                             self.bins.draw if self.bins else None)
        if self.sec.distill and passes[0].name != "max":
            passes = [Pass("max", self.space.max_arch())] + passes
        return passes


def validation_archs(space: SearchSpace, count: int, seed: int) -> dict[str, dict]:
    """The fixed subnets validated every epoch: max, min and `count` seeded random ones."""
    rng = np.random.default_rng(derive_seed(seed, _VAL_STREAM))
    archs = {"max": space.max_arch(), "min": space.min_arch()}
    archs.update({f"rand{i}": space.sample(rng) for i in range(count)})
    return archs
