"""Scorers by name (`search.scorer`): what a search ranks architectures by."""
from __future__ import annotations

from vitas.core.config import Config
from vitas.search.scoring.accuracy import AccuracyScorer
from vitas.search.scoring.base import Scorer
from vitas.search.scoring.proxy import ProxyScorer

SCORERS: dict[str, type[Scorer]] = {"accuracy": AccuracyScorer, "proxy": ProxyScorer}


def create_scorer(cfg: Config) -> Scorer:
    """The scorer `search.scorer` names, built (cheaply: nothing loaded yet) from the config."""
    return SCORERS[cfg.search.scorer](cfg)
