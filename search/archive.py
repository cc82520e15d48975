"""What every search algorithm shares: the cost budget and the archive of evaluated architectures.

The budget holds the MACs, parameter and latency ranges (`search.macs_min/max`,
`search.params_min/max`, `search.latency_min/max`); `search.constraint` names the primary cost
(NSGA-II's second objective, the plot's x axis). Latency is the latency model's prediction in ms
per batch (`latency_ms`, docs/LATENCY.md); an archive given a latency model costs every
architecture with it. Architectures outside the budget are not scored (their cost says enough),
so an expensive scorer only ever sees feasible candidates; they are kept in the archive with
`feasible: False`.

A candidate for the choice whose predicted latency lies within the model's error margin of a
latency limit is re-measured (`latency_measured_ms` and `latency_shift`, set by
`Archive.set_measured`); one measured past the limit is never chosen, nor reported in the top-k
or the Pareto front (`choosable`). It keeps its place in the fitness ranking, so the search's path
does not depend on measurements.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence

import numpy as np

from vitas.core.errors import UserError
from vitas.search.scoring.base import Scorer, is_valid
from vitas.supernet.space import SearchSpace

if TYPE_CHECKING:
    from vitas.inference.latency import LatencyModel

# Record key of each cost -> its `search.<name>_min/max` and `search.constraint` name.
COSTS = {"macs": "macs", "params": "params", "latency_ms": "latency"}
LATENCY = "latency_ms"


@dataclass(frozen=True)
class Budget:
    """Inclusive [min, max] ranges of MACs, parameters and predicted latency in ms (None:
    unbounded); `primary` is the record key of the cost NSGA-II trades accuracy against."""

    macs: tuple[Optional[int], Optional[int]] = (None, None)
    params: tuple[Optional[int], Optional[int]] = (None, None)
    latency_ms: tuple[Optional[float], Optional[float]] = (None, None)
    primary: str = "macs"

    @staticmethod
    def config_keys(search_cfg: Any) -> dict[str, Any]:
        """The `search.*` values a budget is built from (what a resumed search must agree on)."""
        return {f"search.{k}": getattr(search_cfg, k) for k in
                ("macs_min", "macs_max", "params_min", "params_max", "latency_min", "latency_max",
                 "constraint")}

    @classmethod
    def from_config(cls, search_cfg: Any) -> "Budget":
        """The budget of a `SearchConfig`; UserError for an empty range."""
        for name in COSTS.values():
            lo, hi = getattr(search_cfg, f"{name}_min"), getattr(search_cfg, f"{name}_max")
            if lo is not None and hi is not None and lo > hi:
                raise UserError(f"search.{name}_min {lo} is larger than search.{name}_max {hi}")
        primary = {name: key for key, name in COSTS.items()}[search_cfg.constraint]
        return cls((search_cfg.macs_min, search_cfg.macs_max),
                   (search_cfg.params_min, search_cfg.params_max),
                   (search_cfg.latency_min, search_cfg.latency_max), primary)

    @property
    def uses_latency(self) -> bool:
        """Whether latency bounds the search or is its primary cost (a latency model is needed)."""
        return self.primary == LATENCY or self.latency_ms != (None, None)

    def bounds(self) -> list[tuple[str, str, float]]:
        """(cost, "min"|"max", value) for every finite bound: one pymoo constraint each."""
        out = []
        for name in COSTS:
            lo, hi = getattr(self, name)
            if lo is not None:
                out.append((name, "min", lo))
            if hi is not None:
                out.append((name, "max", hi))
        return out

    def violations(self, cost: dict) -> np.ndarray:
        """pymoo inequality constraints G <= 0, each relative to its bound (so MACs, params and
        latency weigh alike): (min - c) / |min| and (c - max) / |max| (a bound of 0 divides by 1)."""
        return np.array([
            ((value - cost[name]) if side == "min" else (cost[name] - value)) / (abs(value) or 1)
            for name, side, value in self.bounds()
        ], dtype=np.float64)

    def feasible(self, cost: dict) -> bool:
        """Whether the cost lies in every range."""
        return bool(np.all(self.violations(cost) <= 0))

    def near_latency_limit(self, latency_ms: float, margin: float) -> Optional[float]:
        """The latency limit that lies inside `latency_ms * (1 +- margin)`, else None: a prediction
        that far off (the model's 90th-percentile error) would put the architecture on its other side."""
        return next((limit for limit in self.latency_ms
                     if limit is not None and latency_ms * (1 - margin) <= limit <= latency_ms * (1 + margin)), None)


class Archive:
    """Every architecture a search has met, once each, in the order met: canonical arch, cost,
    feasibility, metrics (for feasible ones), and when it was found (generation or step).

    Records are plain values, so the archive is the core of a resumable search state. With a
    `latency` model every cost holds `latency_ms` (predicted); a budget that uses latency needs one.
    """

    def __init__(self, space: SearchSpace, scorer: Scorer, cost_fn: Callable[[dict], Any],
                 budget: Budget, latency: Optional["LatencyModel"] = None):
        if budget.uses_latency and latency is None:
            raise ValueError("a budget with latency bounds or a latency objective needs a latency model")
        self.space, self.scorer, self.cost_fn, self.budget = space, scorer, cost_fn, budget
        self.latency = latency
        self.records: list[dict] = []
        self._index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.records)

    def sample_in_budget(self, rng: np.random.Generator, max_tries: int = 2000) -> dict:
        """An architecture drawn uniformly over the genome, conditioned on the budget (UserError
        when the budget is infeasible). Latency bounds reject draws inside the MACs/params ranges."""
        def draw() -> dict:
            return self.space.sample_in_range(rng, self.cost_fn, macs=self.budget.macs,
                                              params=self.budget.params)

        if self.budget.latency_ms == (None, None):
            return draw()
        for _ in range(max_tries):
            arch = draw()
            if self.budget.feasible(self.cost(arch)):
                return arch
        lo, hi = self.latency_span()
        raise UserError(f"no architecture with predicted latency in {list(self.budget.latency_ms)} ms "
                        f"(and MACs in {list(self.budget.macs)}, params in {list(self.budget.params)}) "
                        f"found in {max_tries} samples; the space's smallest and largest architectures "
                        f"are predicted at {lo:.4g}-{hi:.4g} ms: widen search.latency_min/max")

    def latency_span(self) -> tuple[float, float]:
        """Predicted latency (ms) of the space's cheapest and costliest architectures (every patch
        size), the rough range a latency bound should fall in."""
        ends = [self.latency.predict(self.space.canonical({**arch, "patch_size": patch}))
                for arch in (self.space.min_arch(), self.space.max_arch()) for patch in self.space.patch_sizes]
        return min(ends), max(ends)

    def cost(self, arch: dict) -> dict:
        """`{"macs", "params"}` of an architecture as plain ints, and `latency_ms`
        (predicted) when the archive has a latency model."""
        c = self.cost_fn(arch)
        cost = {"macs": int(c.macs), "params": int(c.params)}
        if self.latency is not None:
            cost[LATENCY] = float(self.latency.predict(self.space.canonical(arch)))
        return cost

    def evaluate(self, archs: Sequence[dict], found: int) -> list[dict]:
        """Records of `archs` (in order): new ones are costed, the feasible ones scored in one
        scorer call (its cache skips anything seen), and added with `found` as their origin."""
        keys = [self.space.key(a) for a in archs]
        new: dict[str, dict] = {}
        for key, arch in zip(keys, archs):
            if key not in self._index and key not in new:
                canon = self.space.canonical(arch)
                cost = self.cost(canon)
                new[key] = {"key": key, "arch": canon, **cost,
                            "feasible": self.budget.feasible(cost), "found": int(found)}
        scored = [k for k, r in new.items() if r["feasible"]]
        for key, metrics in zip(scored, self.scorer.score([new[k]["arch"] for k in scored])):
            new[key].update(metrics)
        for key, record in new.items():
            self._index[key] = len(self.records)
            self.records.append(record)
        return [self.records[self._index[k]] for k in keys]

    def has(self, key: str) -> bool:
        """Whether the canonical key has been met."""
        return key in self._index

    def get(self, key: str) -> dict:
        """The record of a canonical key."""
        return self.records[self._index[key]]

    def scored(self, record: dict) -> bool:
        """Feasible (hence scored) and valid."""
        return record["feasible"] and is_valid(record)

    def choosable(self, record: dict) -> bool:
        """Scored, and not re-measured past a latency limit: may be chosen and reported."""
        measured = record.get("latency_measured_ms")
        return self.scored(record) and (measured is None or self.budget.feasible({**record, LATENCY: measured}))

    def limit_to_check(self, record: dict) -> Optional[float]:
        """For a feasible record not yet re-measured, the latency limit its prediction lies within
        the latency model's margin of (`Budget.near_latency_limit`), else None."""
        if self.latency is None or not record["feasible"] or "latency_measured_ms" in record:
            return None
        return self.budget.near_latency_limit(record[LATENCY], self.latency.margin)

    def set_measured(self, key: str, latency_ms: float, shift: float) -> None:
        """Record a re-measured latency (ms, on the latency model's scale) of the architecture `key`
        and the shift applied to it (`LatencyModel.remeasure`); part of the state."""
        self.records[self._index[key]].update(latency_measured_ms=float(latency_ms), latency_shift=float(shift))

    def fitness(self, keys: Optional[Iterable[str]] = None) -> np.ndarray:
        """Scorer fitness over the whole archive (relative scorers re-rank it every call), for
        `keys` (default: all records). Unscored (infeasible) records get the worst value."""
        feasible = [r for r in self.records if r["feasible"]]
        values = self.scorer.fitness(feasible) if feasible else np.zeros(0)
        by_key = dict(zip((r["key"] for r in feasible), np.asarray(values, dtype=np.float64)))
        worst = (min(by_key.values()) - 1.0) if by_key else 0.0
        keys = [r["key"] for r in self.records] if keys is None else list(keys)
        return np.array([by_key.get(k, worst) for k in keys], dtype=np.float64)

    def best(self) -> Optional[dict]:
        """The choosable record of highest fitness (earliest found on ties), or None."""
        fit = self.fitness()
        order = [i for i in np.argsort(-fit, kind="stable") if self.choosable(self.records[i])]
        return self.records[order[0]] if order else None

    def top_k(self, k: int) -> list[dict]:
        """Up to k choosable records, best fitness first, each with its `fitness`."""
        fit = self.fitness()
        order = [i for i in np.argsort(-fit, kind="stable") if self.choosable(self.records[i])]
        return [{**self.records[i], "fitness": float(fit[i])} for i in order[:k]]

    def pareto_front(self) -> list[dict]:
        """Choosable records not dominated in (fitness up, primary cost down), cheapest first."""
        fit = self.fitness()
        cand = [(float(fit[i]), r[self.budget.primary], r) for i, r in enumerate(self.records) if self.choosable(r)]
        front = [
            {**r, "fitness": f} for f, c, r in cand
            if not any((f2 >= f and c2 <= c) and (f2 > f or c2 < c) for f2, c2, _ in cand)
        ]
        return sorted(front, key=lambda r: (r[self.budget.primary], -r["fitness"]))

    def state(self) -> list[dict]:
        """The records (plain values) for a checkpoint."""
        return [dict(r) for r in self.records]

    def load(self, records: Sequence[dict]) -> None:
        """Restore from `state()`; the scorer's cache learns the metrics so nothing is re-scored."""
        self.records, self._index = [], {}
        for r in records:
            self._index[r["key"]] = len(self.records)
            self.records.append(dict(r))
        skip = {"key", "arch", *COSTS, "latency_measured_ms", "latency_shift", "feasible", "found"}
        self.scorer.preload({r["key"]: {k: v for k, v in r.items() if k not in skip}
                             for r in self.records if r["feasible"]})
