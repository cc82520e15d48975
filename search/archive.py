"""What every search algorithm shares: the cost budget and the archive of evaluated architectures.

The budget holds the MACs and parameter ranges (`search.macs_min/max`, `search.params_min/max`);
`search.constraint` names the primary cost (NSGA-II's second objective, the plot's x axis).
Architectures outside the budget are not scored (their cost says enough), so an expensive scorer
only ever sees feasible candidates; they are kept in the archive with `feasible: False`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from vitas.core.errors import UserError
from vitas.search.scoring.base import Scorer, is_valid
from vitas.supernet.space import SearchSpace

COSTS = ("macs", "params")


@dataclass(frozen=True)
class Budget:
    """Inclusive [min, max] ranges of MACs and parameters (None: unbounded); `primary` is the cost
    that NSGA-II trades accuracy against."""

    macs: tuple[Optional[int], Optional[int]] = (None, None)
    params: tuple[Optional[int], Optional[int]] = (None, None)
    primary: str = "macs"

    @staticmethod
    def config_keys(search_cfg: Any) -> dict[str, Any]:
        """The `search.*` values a budget is built from (what a resumed search must agree on)."""
        return {f"search.{k}": getattr(search_cfg, k) for k in
                ("macs_min", "macs_max", "params_min", "params_max", "constraint")}

    @classmethod
    def from_config(cls, search_cfg: Any) -> "Budget":
        """The budget of a `SearchConfig`; UserError for an empty range."""
        for name in COSTS:
            lo, hi = getattr(search_cfg, f"{name}_min"), getattr(search_cfg, f"{name}_max")
            if lo is not None and hi is not None and lo > hi:
                raise UserError(f"search.{name}_min {lo} is larger than search.{name}_max {hi}")
        return cls((search_cfg.macs_min, search_cfg.macs_max),
                   (search_cfg.params_min, search_cfg.params_max), search_cfg.constraint)

    def bounds(self) -> list[tuple[str, str, int]]:
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
        """pymoo inequality constraints G <= 0, each relative to its bound (so MACs and params
        weigh alike): (min - c) / |min| and (c - max) / |max|."""
        return np.array([
            ((value - cost[name]) if side == "min" else (cost[name] - value)) / max(abs(value), 1)
            for name, side, value in self.bounds()
        ], dtype=np.float64)

    def feasible(self, cost: dict) -> bool:
        """Whether the cost lies in every range."""
        return bool(np.all(self.violations(cost) <= 0))


class Archive:
    """Every architecture a search has met, once each, in the order met: canonical arch, cost,
    feasibility, metrics (for feasible ones), and when it was found (generation or step).

    Records are plain values, so the archive is the core of a resumable search state.
    """

    def __init__(self, space: SearchSpace, scorer: Scorer, cost_fn: Callable[[dict], Any],
                 budget: Budget):
        self.space, self.scorer, self.cost_fn, self.budget = space, scorer, cost_fn, budget
        self.records: list[dict] = []
        self._index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.records)

    def sample_in_budget(self, rng: np.random.Generator) -> dict:
        """An architecture drawn uniformly over the genome, conditioned on the budget (UserError
        when the budget is infeasible)."""
        return self.space.sample_in_range(rng, self.cost_fn, macs=self.budget.macs,
                                          params=self.budget.params)

    def cost(self, arch: dict) -> dict:
        """`{"macs", "params"}` of an architecture as plain ints."""
        c = self.cost_fn(arch)
        return {"macs": int(c.macs), "params": int(c.params)}

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
        """Feasible (hence scored) and valid: may be chosen."""
        return record["feasible"] and is_valid(record)

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
        """The feasible, valid record of highest fitness (earliest found on ties), or None."""
        fit = self.fitness()
        order = [i for i in np.argsort(-fit, kind="stable") if self.scored(self.records[i])]
        return self.records[order[0]] if order else None

    def top_k(self, k: int) -> list[dict]:
        """Up to k feasible, valid records, best fitness first, each with its `fitness`."""
        fit = self.fitness()
        order = [i for i in np.argsort(-fit, kind="stable") if self.scored(self.records[i])]
        return [{**self.records[i], "fitness": float(fit[i])} for i in order[:k]]

    def pareto_front(self) -> list[dict]:
        """Feasible, valid records not dominated in (fitness up, primary cost down), cheapest first."""
        fit = self.fitness()
        cand = [(float(fit[i]), r[self.budget.primary], r) for i, r in enumerate(self.records) if self.scored(r)]
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
        skip = {"key", "arch", "macs", "params", "feasible", "found"}
        self.scorer.preload({r["key"]: {k: v for k, v in r.items() if k not in skip}
                             for r in self.records if r["feasible"]})
