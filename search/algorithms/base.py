"""The interface every search algorithm implements, so the runner never asks which one it has.

An algorithm works on an `Archive` (space, scorer, cost, budget) and is built from frozen
`settings` derived from `search.*`: exactly the values that shape its path. The runner's resume
signature is those settings (plus budget, scorer settings and space), so changing a key the
chosen algorithm does not read never blocks a resume, and changing one it reads always does.
The number of rounds (`search.generations` or `search.steps`) is not part of them: it may grow.
Its state is plain values, so a restarted search continues exactly.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Optional

from vitas.core.config import SearchConfig
from vitas.search.archive import Archive


class SearchAlgorithm(ABC):
    """One search algorithm over an archive; `step()` runs one round (a generation, an RL step)."""

    name: ClassVar[str]
    round_name: ClassVar[str] = "generation"

    def __init__(self, archive: Archive, settings: Any, rounds: int) -> None:
        self.archive, self.space = archive, archive.space
        self.settings, self.rounds = settings, rounds

    @staticmethod
    @abstractmethod
    def settings_from(search_cfg: SearchConfig) -> Any:
        """The frozen settings this algorithm reads from `search.*` (its resume signature)."""

    @staticmethod
    @abstractmethod
    def rounds_from(search_cfg: SearchConfig) -> int:
        """How many rounds `search.*` asks for."""

    def start(self) -> None:
        """Prepare round 0 (e.g. an initial population); runs once, before the first save."""

    @abstractmethod
    def step(self) -> dict[str, float]:
        """Run one round; returns scalars to log."""

    @property
    @abstractmethod
    def position(self) -> int:
        """Rounds completed."""

    @property
    def done(self) -> bool:
        """All rounds run (or nothing new can come)."""
        return self.position >= self.rounds

    @abstractmethod
    def state(self) -> dict:
        """Plain-value state (archive included)."""

    @abstractmethod
    def load(self, state: dict) -> None:
        """Continue from `state()`."""

    def choose(self) -> tuple[Optional[dict], dict]:
        """(the chosen record, extra result.json entries): by default the archive's best."""
        return self.archive.best(), {}
