"""Random search: the baseline every NAS method must beat.

Each round draws `search.population` new architectures uniformly over the genome, conditioned on
the budget (the GA's own initial sampler, `Archive.sample_in_budget`), and scores them; after
`search.generations` rounds the best-scored one is chosen. With the same population and
generations it evaluates as many architectures as the GA, so the two compare at equal cost.
Round r draws from a generator seeded by (seed, r), so a resumed search draws the same ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vitas.core.config import SearchConfig
from vitas.search.algorithms.base import SearchAlgorithm
from vitas.search.archive import Archive


@dataclass(frozen=True)
class RandomSettings:
    """What shapes a random search's path (from `search.*`)."""

    population: int
    seed: int


class RandomSearch(SearchAlgorithm):
    """Uniform sampling inside the budget, `population` architectures per round."""

    name = "random"
    round_name = "round"

    def __init__(self, archive: Archive, settings: RandomSettings, rounds: int, max_tries: int = 100):
        super().__init__(archive, settings, rounds)
        self.round = 0
        self.max_tries = max_tries

    @staticmethod
    def settings_from(search_cfg: SearchConfig) -> RandomSettings:
        return RandomSettings(search_cfg.population, search_cfg.seed)

    @staticmethod
    def rounds_from(search_cfg: SearchConfig) -> int:
        return search_cfg.generations

    @property
    def position(self) -> int:
        return self.round

    def draw(self, round_index: int) -> list[dict]:
        """Round `round_index`'s architectures: up to `population` not yet in the archive."""
        rng = np.random.default_rng([self.settings.seed, round_index])
        new: dict[str, dict] = {}
        for _ in range(self.max_tries * self.settings.population):
            arch = self.archive.sample_in_budget(rng)
            key = self.space.key(arch)
            if key not in new and not self.archive.has(key):
                new[key] = arch
                if len(new) == self.settings.population:
                    break
        return list(new.values())

    def step(self) -> dict[str, float]:
        archs = self.draw(self.round)
        self.round += 1
        self.archive.evaluate(archs, found=self.round)
        best = self.archive.best()
        return {"drawn": len(archs), "archs": len(self.archive),
                "best_fitness": float(self.archive.fitness([best["key"]])[0]) if best else float("nan")}

    def state(self) -> dict:
        return {"round": self.round, "archive": self.archive.state()}

    def load(self, state: dict) -> None:
        self.round = int(state["round"])
        self.archive.load(state["archive"])
