"""Evolutionary search with pymoo: a constrained single-objective GA and NSGA-II (fitness vs cost).

The genome is `SearchSpace`'s integer encoding; mutation and crossover wrap `space.mutate` and
`space.crossover`; offspring equal (canonically) to a population member or to each other are
dropped by an `ElementwiseDuplicateElimination` on `space.key(decode(x))`. The cost budget enters
as real pymoo inequality constraints (G <= 0, one per finite min/max bound).

pymoo is driven through ask-and-tell, and every generation is run by a pymoo algorithm rebuilt
from plain state (the population's genomes, the archive and a generation-derived seed). An
uninterrupted search and one restarted from `last.pth` therefore take exactly the same path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.algorithms.soo.nonconvex.ga import GA
from pymoo.core.algorithm import Algorithm
from pymoo.core.crossover import Crossover
from pymoo.core.duplicate import ElementwiseDuplicateElimination
from pymoo.core.evaluator import Evaluator
from pymoo.core.mutation import Mutation
from pymoo.core.population import Population
from pymoo.core.problem import Problem
from pymoo.core.termination import NoTermination
from pymoo.problems.static import StaticProblem

from vitas.core.config import SearchConfig
from vitas.core.errors import UserError
from vitas.search.algorithms.base import SearchAlgorithm
from vitas.search.archive import Archive
from vitas.supernet.space import SearchSpace


class SpaceMutation(Mutation):
    """Resample each gene within its bounds with probability `prob_gene` (`space.mutate`)."""

    def __init__(self, space: SearchSpace, prob_gene: float):
        super().__init__(prob=1.0)
        self.space, self.prob_gene = space, prob_gene

    def _do(self, problem: Problem, X: np.ndarray, random_state: np.random.Generator = None,
            **kwargs) -> np.ndarray:
        return np.stack([self.space.mutate(x, random_state, self.prob_gene) for x in X])


class SpaceCrossover(Crossover):
    """Uniform crossover of two parents into two children (`space.crossover`)."""

    def __init__(self, space: SearchSpace, prob: float):
        super().__init__(n_parents=2, n_offsprings=2, prob=prob)
        self.space = space

    def _do(self, problem: Problem, X: np.ndarray, random_state: np.random.Generator = None,
            **kwargs) -> np.ndarray:
        out = np.empty_like(X)
        for m in range(X.shape[1]):
            out[0, m], out[1, m] = self.space.crossover(X[0, m], X[1, m], random_state)
        return out


class CanonicalDuplicates(ElementwiseDuplicateElimination):
    """Two genomes are duplicates when they decode to the same canonical architecture."""

    def __init__(self, space: SearchSpace):
        super().__init__()
        self.space = space
        self._keys: dict[tuple, str] = {}

    def key(self, x: np.ndarray) -> str:
        """Canonical key of a genome (memoised: pymoo compares pairs many times)."""
        t = tuple(int(v) for v in np.asarray(x).round())
        if t not in self._keys:
            self._keys[t] = self.space.key(self.space.decode(t))
        return self._keys[t]

    def is_equal(self, a: object, b: object) -> bool:
        return self.key(a.X) == self.key(b.X)


def generation_seed(seed: int, generation: int) -> int:
    """The pymoo seed of one generation: fixed by the search seed and the generation number."""
    return int(np.random.SeedSequence([seed, generation]).generate_state(1)[0])


@dataclass(frozen=True)
class EvolutionSettings:
    """What shapes an evolutionary search's path (from `search.*`)."""

    algorithm: str
    population: int
    mutation_prob: float
    crossover_prob: float
    seed: int


class Evolution(SearchAlgorithm):
    """GA (`ga`) or NSGA-II (`nsga2`: fitness against the primary cost) over `archive`'s space,
    scorer and budget; `step()` runs one generation; the state is plain values."""

    name = "evolution"

    def __init__(self, archive: Archive, settings: EvolutionSettings, rounds: int):
        super().__init__(archive, settings, rounds)
        for key in ("mutation_prob", "crossover_prob"):
            if not 0.0 <= getattr(settings, key) <= 1.0:
                raise UserError(f"search.{key} must be in [0, 1], got {getattr(settings, key)}")
        self.algorithm, self.pop_size, self.seed = settings.algorithm, settings.population, settings.seed
        self.mutation_prob, self.crossover_prob = settings.mutation_prob, settings.crossover_prob
        n_constr = len(archive.budget.bounds())
        self.problem = Problem(n_var=self.space.n_var, n_obj=1 if self.algorithm == "ga" else 2,
                               n_ieq_constr=n_constr, xl=self.space.xl, xu=self.space.xu, vtype=int)
        self.generation = 0
        self.population: Optional[np.ndarray] = None
        self.converged = False

    @staticmethod
    def settings_from(search_cfg: SearchConfig) -> EvolutionSettings:
        return EvolutionSettings(search_cfg.algorithm, search_cfg.population,
                                 search_cfg.mutation_prob, search_cfg.crossover_prob, search_cfg.seed)

    @staticmethod
    def rounds_from(search_cfg: SearchConfig) -> int:
        return search_cfg.generations

    @property
    def position(self) -> int:
        return self.generation

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        """Plain-value state: generation, population genomes, archive."""
        return {"generation": self.generation, "population": self.population.tolist(),
                "converged": self.converged, "archive": self.archive.state()}

    def load(self, state: dict) -> None:
        """Continue from `state()`."""
        self.generation = int(state["generation"])
        self.population = np.asarray(state["population"], dtype=np.int64)
        self.converged = bool(state["converged"])
        self.archive.load(state["archive"])

    @property
    def done(self) -> bool:
        """All generations run (or no new offspring could be bred)."""
        return self.converged or self.generation >= self.rounds

    # ------------------------------------------------------------------ pymoo glue
    def _objectives(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """pymoo F (minimised: -fitness, and the primary cost for NSGA-II) and G of `keys`."""
        fit = self.archive.fitness(keys)
        records = [self.archive.get(k) for k in keys]
        if self.algorithm == "ga":
            F = -fit[:, None]
        else:
            primary = self.archive.budget.primary
            F = np.stack([-fit, np.array([float(r[primary]) for r in records])], axis=1)
        G = np.array([self.archive.budget.violations(r) for r in records], dtype=np.float64)
        return F, G.reshape(len(records), -1)

    def _evaluate(self, pop: Population, keys: list[str]) -> None:
        """Assign F and G to `pop` through pymoo's evaluator (which also sets CV and feasibility)."""
        F, G = self._objectives(keys)
        static = StaticProblem(self.problem, F=F, G=G) if G.shape[1] else StaticProblem(self.problem, F=F)
        Evaluator().eval(static, pop)

    def _build(self) -> Algorithm:
        dedup = CanonicalDuplicates(self.space)
        cls = GA if self.algorithm == "ga" else NSGA2
        algo = cls(pop_size=self.pop_size, sampling=self.population.copy(),
                   crossover=SpaceCrossover(self.space, self.crossover_prob),
                   mutation=SpaceMutation(self.space, self.mutation_prob),
                   eliminate_duplicates=dedup)
        algo.setup(self.problem, termination=NoTermination(),
                   seed=generation_seed(self.seed, self.generation))
        return algo

    def _keys(self, X: np.ndarray) -> list[str]:
        return [self.space.key(self.space.decode(x)) for x in X]

    # ------------------------------------------------------------------ search
    def start(self) -> None:
        """Generation 0: `population` distinct architectures drawn uniformly inside the budget,
        scored."""
        rng = np.random.default_rng(generation_seed(self.seed, 0))
        archs: dict[str, dict] = {}
        for _ in range(100 * self.pop_size):
            arch = self.archive.sample_in_budget(rng)
            archs.setdefault(self.space.key(arch), arch)
            if len(archs) == self.pop_size:
                break
        if len(archs) < 2:
            raise UserError("the budget admits fewer than 2 distinct architectures; widen it")
        self.archive.evaluate(list(archs.values()), found=0)
        self.population = np.stack([self.space.encode(a) for a in archs.values()])

    def step(self) -> dict[str, float]:
        """Breed, score and select one generation; returns the generation's log scalars."""
        bred = self._breed()
        best = self.archive.best()
        return {"offspring": bred, "archs": len(self.archive),
                "feasible": sum(r["feasible"] for r in self.archive.records),
                "best_fitness": float(self.archive.fitness([best["key"]])[0]) if best else float("nan")}

    def _breed(self) -> int:
        algo = self._build()
        pop = algo.ask()
        self._evaluate(pop, self._keys(pop.get("X")))
        algo.tell(infills=pop)
        off = algo.ask()
        self.generation += 1
        if off is None or len(off) == 0:
            self.converged = True
            return 0
        keys = self._keys(off.get("X"))
        self.archive.evaluate([self.space.decode(x) for x in off.get("X")], found=self.generation)
        # Relative fitness: re-rank the population against the grown archive before survival.
        F, _ = self._objectives(self._keys(algo.pop.get("X")))
        algo.pop.set("F", F)
        self._evaluate(off, keys)
        algo.tell(infills=off)
        self.population = np.asarray(algo.pop.get("X"), dtype=np.int64)
        return len(off)
