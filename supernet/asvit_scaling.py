"""As-ViT's auto-scaling moves (Algorithm 2) on the hierarchical architecture, as pure functions.

Scaling starts from a seed topology at C = 32 with one block per stage (`scaling_seed`). Each step
offers 4 depth moves (one more block in one stage) x 4 width ratios {1.05, 1.1, 1.15, 1.2} (C
times the ratio); every candidate applies one of each, as Algorithm 2's C x D. C is rounded up to
a multiple of `width_unit` = lcm(4, H / 8): 4 as As-ViT's code (its C is 4 x the width it grows),
and a multiple of H / 8 so that every stage's head count divides its width (no truncated heads).
Rounding up makes every candidate strictly larger than its parent; two ratios that round to the
same C give the same candidate, which is offered once. Ranking the candidates (L^E descending +
kappa ascending) and measuring them belong to the caller (`search.scaling`); `grow` runs the loop
with them passed in, until the parameter count reaches the limit.
"""
from __future__ import annotations

import copy
import json
import math
from typing import Callable, Iterator, Optional, Sequence

from vitas.supernet.asvit import STAGES

RATIOS = (1.05, 1.1, 1.15, 1.2)
SEED_EMBED_DIM = 32  # Algorithm 2's starting width C


def scaling_seed(topology: dict, embed_dim: int = SEED_EMBED_DIM) -> dict:
    """Algorithm 2's starting point: `topology` (kernels, splits, expansions, heads) with one block
    per stage and width `embed_dim`."""
    arch = copy.deepcopy(topology)
    arch["embed_dim"] = embed_dim
    for stage in arch["stages"]:
        stage["depth"] = 1
    return arch


def width_unit(arch: dict) -> int:
    """The granularity of C: lcm(4, num_heads / 8) (see the module docstring)."""
    return math.lcm(4, max(arch["num_heads"] // 2 ** (STAGES - 1), 1))


def widen(arch: dict, ratio: float) -> dict:
    """`arch` with C times `ratio`, rounded up to a multiple of `width_unit` (always wider)."""
    unit = width_unit(arch)
    out = copy.deepcopy(arch)
    out["embed_dim"] = math.ceil(arch["embed_dim"] * ratio / unit - 1e-9) * unit
    return out


def deepen(arch: dict, stage: int) -> dict:
    """`arch` with one more block in `stage` (0-based)."""
    out = copy.deepcopy(arch)
    out["stages"][stage]["depth"] += 1
    return out


def candidates(arch: dict, ratios: Sequence[float] = RATIOS) -> list[dict]:
    """One step's scaling choices `{"stage", "ratio", "arch"}`: every stage's depth move with every
    ratio, stage-major; a choice equal to an earlier one (two ratios rounding alike) is left out."""
    out, seen = [], set()
    for stage in range(STAGES):
        for ratio in ratios:
            grown = widen(deepen(arch, stage), ratio)
            key = json.dumps(grown, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append({"stage": stage, "ratio": ratio, "arch": grown})
    return out


def grow(seed: dict, measure: Callable[[dict], dict], choose: Callable[[list[dict]], int],
         param_limit: int, start: Optional[dict] = None) -> Iterator[dict]:
    """Algorithm 2's loop: yields the seed's record, then each step's chosen record, until the
    parameter count reaches `param_limit` (the last one may exceed it).

    `measure(arch)` returns a record with at least "params" (and whatever `choose` ranks by);
    `choose(records)` the index of the chosen candidate, or -1 when none can be chosen (the loop
    then stops). Records gain "arch", "step" and, after the seed, "choice" {"stage", "ratio"} and
    "candidates" (every candidate's record). `start`, a record this loop yielded before, resumes
    after it (nothing re-measured; `seed` is then unused)."""
    current = start
    if current is None:
        current = {"step": 0, "arch": seed, "choice": None, **measure(seed)}
        yield current
    while current["params"] < param_limit:
        cands = [{**c, **measure(c["arch"])} for c in candidates(current["arch"])]
        best = choose(cands)
        if best < 0:
            return
        chosen = cands[best]
        current = {**{k: v for k, v in chosen.items() if k not in ("stage", "ratio")},
                   "step": current["step"] + 1, "choice": {"stage": chosen["stage"], "ratio": chosen["ratio"]},
                   "candidates": cands}
        yield current
