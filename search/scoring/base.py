"""The scorer interface: what every search algorithm asks of an architecture's quality.

A scorer turns canonical architectures into metric dicts (`score`, cached per `space.key`, so an
architecture is evaluated once per search), ranks a set of records by `fitness` (higher is better,
relative to all records given, e.g. a rank sum) and names the `reward_terms` RL differentiates.
A record with `"valid": False` is never chosen and always gets the worst fitness.

A concrete scorer subclasses `Scorer`, is built as `Cls(cfg)` from the whole config (calling
`super().__init__(space_from_config(cfg))`), and implements `compute(archs)`: every rank calls it
with the same list, and rank 0's results are broadcast, so all ranks follow the same search.
Records handed to `fitness` are flat dicts holding at least the scorer's metrics (the search adds
`arch`, `macs`, `params`, ...); only feasible, scored records are passed. The scorers by name are
in `vitas.search.scoring` (`accuracy`: inherited top-1; `proxy`: training-free).

`settings()` is what the numbers depend on, derived from the resolved inputs the scorer consumes
(the data transform and split, the superformer's identity, the proxy options), so a resumed search
under other values is refused rather than ranking incomparable scores together.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
from scipy.stats import rankdata

from vitas.core.dist import broadcast_object
from vitas.core.errors import UserError
from vitas.supernet.space import SearchSpace


def is_valid(record: dict) -> bool:
    """A record is valid unless it says `"valid": False` (e.g. a non-finite NTK condition)."""
    return record.get("valid", True) is not False


def valid_mask(records: Sequence[dict]) -> np.ndarray:
    """Boolean array: which records are valid."""
    return np.array([is_valid(r) for r in records], dtype=bool)


def worst_for_invalid(values: np.ndarray, records: Sequence[dict]) -> np.ndarray:
    """Give invalid records a finite fitness below every valid one (pymoo needs finite values)."""
    values = np.asarray(values, dtype=np.float64).copy()
    ok = valid_mask(records)
    if ok.any():
        spread = float(values[ok].max() - values[ok].min())
        values[~ok] = float(values[ok].min()) - 1.0 - spread
    else:
        values[:] = 0.0
    return values


def weighted_sum(records: Sequence[dict], terms: Sequence[tuple[str, float]]) -> np.ndarray:
    """Fitness = sum of sign * metric over `terms`; invalid records get the worst value."""
    ok = valid_mask(records)
    values = np.zeros(len(records), dtype=np.float64)
    for name, sign in terms:
        values += np.array([sign * float(r[name]) if v else 0.0 for r, v in zip(records, ok)])
    return worst_for_invalid(values, records)


def rank_sum(records: Sequence[dict], terms: Sequence[tuple[str, float]],
             weights: Optional[Sequence[float]] = None) -> np.ndarray:
    """Fitness = -(weighted sum of per-term ranks among valid records); rank 1 = best term value.

    Relative to the records given (As-ViT's rank-sum combination), so callers re-rank the whole
    archive whenever it grows. Ties share the average rank.
    """
    ok = valid_mask(records)
    weights = [1.0] * len(terms) if weights is None else list(weights)
    if len(weights) != len(terms):
        raise UserError(f"{len(weights)} weights given for {len(terms)} terms {[n for n, _ in terms]}")
    values = np.zeros(len(records), dtype=np.float64)
    if ok.any():
        total = np.zeros(int(ok.sum()), dtype=np.float64)
        for (name, sign), w in zip(terms, weights):
            col = np.array([-sign * float(r[name]) for r, v in zip(records, ok) if v])
            total += w * rankdata(col, method="average")
        values[ok] = -total
    return worst_for_invalid(values, records)


class Scorer:
    """Base scorer: subclasses set `name`, `fields`, `reward_terms` and implement `compute`.

    `score` de-duplicates by canonical key and caches, so subclasses only see new architectures.
    The cache is plain values (key -> metric dict), saved with the search state and `preload`-ed on
    resume so a restarted search re-scores nothing.
    """

    name: str = "base"
    fields: tuple[str, ...] = ()
    reward_terms: list[tuple[str, float]] = []

    def __init__(self, space: SearchSpace):
        self.space = space
        self.cache: dict[str, dict] = {}
        self.compute_fn: Callable[[list[dict]], list[dict]] = self.compute

    def compute(self, archs: list[dict]) -> list[dict]:
        """Metric dicts of distinct canonical architectures (no cache); subclasses implement it."""
        raise NotImplementedError

    def score(self, archs: Sequence[dict]) -> list[dict]:
        """One metric dict per architecture (copies), each canonical architecture computed once."""
        keys = [self.space.key(a) for a in archs]
        todo: dict[str, dict] = {}
        for key, arch in zip(keys, archs):
            if key not in self.cache and key not in todo:
                todo[key] = self.space.canonical(arch)
        if todo:
            # Rank 0's numbers everywhere: every rank then takes the same search path.
            results = broadcast_object(self.compute_fn(list(todo.values())))
            if len(results) != len(todo):
                raise RuntimeError(f"scorer {self.name} returned {len(results)} results for {len(todo)} archs")
            for key, metrics in zip(todo, results):
                self.cache[key] = _plain(metrics)
        return [dict(self.cache[k]) for k in keys]

    def check(self) -> None:
        """Raise every user error findable before scoring (inputs, files); nothing is loaded."""

    def settings(self) -> dict[str, Any]:
        """The settings this scorer's numbers depend on, by dotted key: a search resumed under
        other values would rank incomparable scores together, so the runner refuses it."""
        return {}

    def fitness(self, records: Sequence[dict]) -> np.ndarray:
        """Higher is better, over all `records` together; default: signed sum of `reward_terms`."""
        return weighted_sum(records, self.reward_terms)

    def preload(self, cache: dict[str, dict]) -> None:
        """Adopt metrics computed earlier (a resumed search, or chunks scored by an array job)."""
        self.cache.update({k: dict(v) for k, v in cache.items()})


def _plain(metrics: dict) -> dict:
    """Metric values as plain Python scalars (JSON- and weights_only-safe)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (np.generic,)):
            v = v.item()
        elif hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
            v = v.item()
        out[k] = v
    return out


