"""Search algorithms by name (`search.algorithm`), all behind `SearchAlgorithm`."""
from __future__ import annotations

from vitas.core.config import SearchConfig
from vitas.search.algorithms.base import SearchAlgorithm
from vitas.search.algorithms.evolution import Evolution
from vitas.search.algorithms.random import RandomSearch
from vitas.search.algorithms.rl import Reinforce
from vitas.search.archive import Archive

ALGORITHMS: dict[str, type[SearchAlgorithm]] = {
    "ga": Evolution, "nsga2": Evolution, "rl": Reinforce, "random": RandomSearch}


def algorithm_class(name: str) -> type[SearchAlgorithm]:
    """The class that runs `search.algorithm` = `name` (the config schema checked the name)."""
    return ALGORITHMS[name]


def create_algorithm(archive: Archive, search_cfg: SearchConfig) -> SearchAlgorithm:
    """The configured algorithm over `archive`, with its settings and rounds from `search.*`."""
    cls = algorithm_class(search_cfg.algorithm)
    return cls(archive, cls.settings_from(search_cfg), cls.rounds_from(search_cfg))
