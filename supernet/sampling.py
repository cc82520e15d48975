"""Which subnets each superformer training step trains: the passes of a step.

Sampling modes (`supernet.sampling`), each step's passes on the same batch:
- `uniform` (AutoFormer): one random subnet; its side is random where a policy is bilateral.
- `autoslim`: one random subnet on the left pass only.
- `bcnet` (BCNet): one random subnet on the left and on the right pass, a loss on each.
- `sandwich` (BigNAS): the max, the min and a random subnet.
Options on top of every mode:
- `supernet.random_subnets`: how many random subnets each step trains (BigNAS's sandwich: 2),
  each drawn as the one of the mode is; more passes per step, the same optimizer steps.
- `supernet.cost_sampling: macs_bins` (ElasticViT's complexity-aware sampling): the random subnet
  is drawn by first picking one of `supernet.cost_bins` equal-width MACs bins uniformly, then an
  architecture inside it (from a pool drawn once), so every cost range is trained as often
  (uniform genes pile their sums up in the middle of the range).
- `supernet.distill` (BigNAS / AlphaNet in-place distillation): the max subnet teaches the
  others; a mode without a max pass gets one, first.
- `supernet.max_warmup_epochs`: the first epochs train the max subnet alone.
- `supernet.identity_shift: false` (ViTAS's identity shifting off): each pass's d layers run on d
  blocks drawn uniformly among the stack's (as identity layers at random places would leave
  them), instead of blocks 0..d-1; the subnets drawn are the same.
- `supernet.patch_cycle`: after the warm-up, the max and min passes of step t take patch size
  t mod (number of patch sizes); without it the max subnet always runs on the finest token grid
  and the min subnet on the coarsest.
- `supernet.progressive` (Once-for-All's progressive shrinking): the listed arch fields stay at
  the max subnet's value, and are released one item at a time, evenly over
  `supernet.progressive_epochs` after the warm-up; every pass (min included) draws from the
  space released so far. Once all are released the passes are those of the plain sampler.
Every rank takes the same passes at every step: they are drawn from a generator seeded by
(seed, global step) alone.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import numpy as np

from vitas.core.config import SupernetConfig
from vitas.core.engine import derive_seed
from vitas.core.errors import UserError
from vitas.supernet.space import SearchSpace

_STEP_STREAM, _VAL_STREAM, _LAYER_STREAM = 1, 2, 3  # seed streams: step subnets, validation, blocks


@dataclass(frozen=True)
class Pass:
    """One forward/backward of a step: a subnet on one side (on blocks `layers`, default the first
    `depth`), named for its logged loss."""

    name: str
    arch: dict
    side: str = "left"
    layers: Optional[tuple[int, ...]] = None


def is_bilateral(space: SearchSpace) -> bool:
    """Whether any dimension uses the bilateral (BCNet) policy, i.e. a right pass exists."""
    return space.cfg.channels.bilateral


def _random_side(space: SearchSpace, rng: np.random.Generator) -> str:
    """Either side with equal odds in a bilateral space (drawing from `rng` only there), else left."""
    return "right" if is_bilateral(space) and rng.integers(2) else "left"


def step_passes(space: SearchSpace, sampling: str, seed: int, step: int,
                draw: Optional[Callable[[np.random.Generator], dict]] = None,
                random_subnets: int = 1) -> list[Pass]:
    """The subnets of global step `step` in mode `sampling`: a function of (seed, step) only, so
    equal on all ranks. `draw(rng)` draws a random subnet (default: uniform genes);
    `random_subnets` are drawn, the first as with one (so a run with one is unchanged), the
    others after it ("rand2", ...; in bcnet "left2"/"right2", ...)."""
    rng = np.random.default_rng(derive_seed(seed, _STEP_STREAM, step))
    draw = draw or space.sample
    arch = draw(rng)
    if sampling == "uniform":
        passes = [Pass("rand", arch, _random_side(space, rng))]
    elif sampling == "autoslim":
        passes = [Pass("rand", arch, "left")]
    elif sampling == "bcnet":
        passes = [Pass("left", arch, "left"), Pass("right", arch, "right")]
    elif sampling == "sandwich":  # min and random on one side per step, as uniform draws it
        side = _random_side(space, rng)
        passes = [Pass("max", space.max_arch()), Pass("min", space.min_arch(), side), Pass("rand", arch, side)]
    else:
        raise ValueError(f"unknown sampling {sampling!r}")  # the config schema admits no other
    for i in range(2, random_subnets + 1):
        arch = draw(rng)
        if sampling == "bcnet":
            passes += [Pass(f"left{i}", arch, "left"), Pass(f"right{i}", arch, "right")]
        elif sampling == "uniform":
            passes.append(Pass(f"rand{i}", arch, _random_side(space, rng)))
        else:  # sandwich: the step's side; autoslim: the left
            passes.append(Pass(f"rand{i}", arch, passes[-1].side))
    return passes


class CostBins:
    """Equal-width MACs bins over the space's range; `draw(rng)` picks a bin uniformly, then an
    architecture inside it.

    Each bin's architectures come from one seeded pool of `pool` uniform draws over the genes,
    made once: a draw never rejection-samples, so a bin that holds a sliver of the space (the
    top MACs bin of a small space) cannot stall or fail training after hours; a bin the pool
    misses is left out. Within a bin the draw is the genes' own distribution, restricted to it.
    """

    def __init__(self, space: SearchSpace, cost_fn: Callable[[dict], Any], bins: int, seed: int = 0,
                 pool: int = 20000):
        self.space = space
        lo, hi = space.cost_span(cost_fn)["macs"]
        edges = np.linspace(lo, hi, bins + 1)
        members: list[list[dict]] = [[] for _ in range(bins)]
        rng = np.random.default_rng(seed)
        for _ in range(pool):
            arch = space.sample(rng)
            members[min(int(np.searchsorted(edges, cost_fn(arch).macs, side="right")) - 1, bins - 1)].append(arch)
        self.bins: list[tuple[int, int]] = []
        self.pools: list[list[dict]] = []
        for b in range(bins):
            if members[b]:
                self.bins.append((int(edges[b]), int(edges[b + 1]) if b < bins - 1 else int(hi)))
                self.pools.append(members[b])
        if not self.bins:
            raise UserError("supernet.cost_sampling=macs_bins: no MACs bin of the space holds an architecture")

    def bin_of(self, macs: int) -> int:
        """Index (in `self.bins`) of the bin holding `macs` (the last bin's end is included)."""
        for i, (lo, hi) in enumerate(self.bins):
            if lo <= macs < hi or (i == len(self.bins) - 1 and macs == hi):
                return i
        raise ValueError(f"{macs} MACs lie outside every bin")

    def draw(self, rng: np.random.Generator) -> dict:
        pool = self.pools[int(rng.integers(len(self.pools)))]
        arch = pool[int(rng.integers(len(pool)))]
        return {k: list(v) if isinstance(v, list) else v for k, v in arch.items()}  # the pool stays as drawn


PROGRESSIVE_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "attn_dim", "mlp_dim")


def locked_space(space: SearchSpace, fields: set[str]) -> SearchSpace:
    """`space` with each of `fields` held at the max subnet's value (same superformer sizes), so
    its samples, min and max are subnets of `space` that keep those fields at their largest."""
    cfg, top = space.cfg, space.max_arch()
    if "attn_dim" in fields and cfg.head_dim:
        raise UserError("supernet.progressive: attn_dim follows num_heads in this space (space.head_dim "
                        "is fixed): hold num_heads instead")
    held = {"patch_size": [top["patch_size"]], "embed_dim": [top["embed_dim"]], "depth": [top["depth"]],
            "num_heads": [top["num_heads"][0]], "attn_dim": [top["attn_dim"][0]]}
    changes: dict[str, Any] = {k: v for k, v in held.items() if k in fields}
    if "mlp_dim" in fields:
        changes["mlp_ratio" if cfg.mlp_ratio else "mlp_dim"] = [max(cfg.mlp_ratio or cfg.mlp_dim)]
    return SearchSpace(replace(cfg, **changes, super_embed_dim=space.super_embed_dim,
                               super_depth=space.super_depth, super_attn_dim=space.super_attn_dim,
                               super_mlp_dim=space.super_mlp_dim))


def progressive_span(epochs: int, warmup: int, span: Optional[int]) -> int:
    """The epochs over which progressive shrinking releases its items: `span`, or by default half
    the epochs left after the max warm-up."""
    return span or max(1, (epochs - warmup) // 2)


def progressive_schedule(space: SearchSpace, sec: SupernetConfig) -> list[tuple[int, list[str]]]:
    """(epoch, fields) for each item of `supernet.progressive`: the epoch from which its fields
    are free. UserError for an unknown or repeated field, or a schedule that does not fit."""
    items = [item.split("+") for item in sec.progressive]
    fields = [f for item in items for f in item]
    for f in fields:
        if f not in PROGRESSIVE_FIELDS:
            raise UserError(f"supernet.progressive: unknown arch field {f!r}; fields: {list(PROGRESSIVE_FIELDS)}")
    if len(set(fields)) < len(fields):
        raise UserError(f"supernet.progressive names a field twice: {sec.progressive}")
    if items and sec.cost_sampling == "macs_bins":
        raise UserError("supernet.progressive holds fields that supernet.cost_sampling=macs_bins draws "
                        "over the whole space: use one of them")
    if sec.progressive_epochs is not None and not items:
        raise UserError("supernet.progressive_epochs is set but supernet.progressive lists no field")
    start = sec.max_warmup_epochs
    span = progressive_span(sec.epochs, start, sec.progressive_epochs)
    if items and (span < len(items) or start + span > sec.epochs):
        raise UserError(f"supernet.progressive releases {len(items)} items over {span} epochs after "
                        f"max_warmup_epochs={start}: it needs an epoch per item within "
                        f"supernet.epochs={sec.epochs} (set supernet.progressive_epochs)")
    schedule = [(start + (i * span) // len(items), item) for i, item in enumerate(items)]
    if items:
        locked_space(space, set(fields))  # a space that cannot hold its fields fails here, before training
    return schedule


class SubnetSampler:
    """The passes of every step for a `SupernetConfig` (see the module docstring)."""

    def __init__(self, space: SearchSpace, sec: SupernetConfig, cost_fn: Callable[[dict], Any]):
        self.space, self.sec = space, sec
        self.bins = CostBins(space, cost_fn, sec.cost_bins, sec.seed) if sec.cost_sampling == "macs_bins" else None
        self.schedule = progressive_schedule(space, sec)
        self._spaces: dict[int, SearchSpace] = {}  # items released -> the space they leave

    def space_at(self, epoch: int) -> SearchSpace:
        """The space the passes of `epoch` draw from: the whole space unless progressive
        shrinking still holds some fields at their max."""
        stage = sum(epoch >= start for start, _ in self.schedule)  # items released (starts ascend)
        if stage == len(self.schedule):
            return self.space
        if stage not in self._spaces:
            self._spaces[stage] = locked_space(self.space, {f for _, item in self.schedule[stage:] for f in item})
        return self._spaces[stage]

    def passes(self, step: int, epoch: int) -> list[Pass]:
        """The passes of global step `step` (in epoch `epoch`, 0-based)."""
        if epoch < self.sec.max_warmup_epochs:
            return [Pass("max", self.space.max_arch())]
        space = self.space_at(epoch)
        passes = step_passes(space, self.sec.sampling, self.sec.seed, step,
                             self.bins.draw if self.bins else None, self.sec.random_subnets)
        if self.sec.distill and passes[0].name != "max":
            passes = [Pass("max", self.space.max_arch())] + passes
        if self.sec.patch_cycle:
            patch = space.patch_sizes[step % len(space.patch_sizes)]
            passes = [replace(p, arch={**p.arch, "patch_size": patch}) if p.name in ("max", "min") else p
                      for p in passes]
        if not self.sec.identity_shift:
            rng = np.random.default_rng(derive_seed(self.sec.seed, _LAYER_STREAM, step))
            passes = [replace(p, layers=self._blocks(rng, self.space.canonical(p.arch)["depth"])) for p in passes]
        return passes

    def _blocks(self, rng: np.random.Generator, depth: int) -> tuple[int, ...]:
        """`depth` distinct blocks of the stack, drawn uniformly, ascending."""
        return tuple(int(j) for j in np.sort(rng.choice(self.space.super_depth, depth, replace=False)))


def validation_archs(space: SearchSpace, count: int, seed: int) -> dict[str, dict]:
    """The fixed subnets validated every epoch: max, min and `count` seeded random ones."""
    rng = np.random.default_rng(derive_seed(seed, _VAL_STREAM))
    archs = {"max": space.max_arch(), "min": space.min_arch()}
    archs.update({f"rand{i}": space.sample(rng) for i in range(count)})
    return archs
