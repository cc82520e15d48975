"""`search.scorer: proxy`: As-ViT's training-free scores (length distortion up, NTK condition down).

Each architecture is a subnet of a fresh superformer, re-initialised per seed (`search.proxies`).
Fitness over a set of records is `search.proxy_combine`: `rank_sum` (As-ViT Algorithm 2: rank by
L^E descending plus rank by kappa ascending, weighted by `search.proxy_weights`, negated so that
higher is better) or `weighted` (w1 log L^E - w2 log kappa). RL rewards the range-normalised
deltas of L^E minus those of kappa, As-ViT Algorithm 1.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from vitas.core.config import Config
from vitas.core.errors import UserError
from vitas.search.proxies.measures import check_proxy_config, ntk_batch, proxy_scores_many, proxy_superformer
from vitas.search.scoring.base import Scorer, rank_sum, split_settings, valid_mask, worst_for_invalid
from vitas.supernet.model import Superformer
from vitas.supernet.space import space_from_config

COMBINES = ("rank_sum", "weighted")
# proxy.* options that change the numbers (ntk_method only changes how they are computed).
SCORE_KEYS = ("radius", "output", "norm", "thetas", "inits", "ntk_images", "velocity", "seed")


class ProxyScorer(Scorer):
    """Training-free scorer: `length_distortion` and `ntk_condition` of each architecture."""

    name = "proxy"
    fields = ("length_distortion", "ntk_condition")
    reward_terms = [("length_distortion", 1.0), ("ntk_condition", -1.0)]

    def __init__(self, cfg: Config, device: Optional[torch.device | str] = None):
        super().__init__(space_from_config(cfg))
        check_proxy_config(cfg.proxy)
        if cfg.search.proxy_combine not in COMBINES:
            raise UserError(f"search.proxy_combine must be one of {list(COMBINES)}, got {cfg.search.proxy_combine!r}")
        if len(cfg.search.proxy_weights) != 2:
            raise UserError(f"search.proxy_weights needs 2 weights (length_distortion, ntk_condition), "
                            f"got {cfg.search.proxy_weights}")
        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._model: Optional[Superformer] = None
        self._images: Optional[torch.Tensor] = None

    def settings(self) -> dict[str, Any]:
        """Proxy options and the data the NTK images are drawn from."""
        return {**{f"proxy.{k}": getattr(self.cfg.proxy, k) for k in SCORE_KEYS},
                **split_settings(self.cfg.data)}

    def setup(self) -> None:
        """Build the superformer and read the NTK images (idempotent)."""
        if self._model is None:
            self._images = ntk_batch(self.cfg, self.device)
            self._model = proxy_superformer(self.cfg, self.device)

    def compute(self, archs: list[dict]) -> list[dict]:
        """L^E, kappa and validity of each architecture (curvature is left out: search never uses it)."""
        self.setup()
        records = proxy_scores_many(self._model, archs, self._images, self.cfg.proxy, curvature=False)
        return [{k: v for k, v in r.items() if k != "curvature"} for r in records]

    def fitness(self, records: Sequence[dict]) -> np.ndarray:
        """Higher is better over all `records`: negated weighted rank sum, or w1 log L^E - w2 log kappa."""
        weights = self.cfg.search.proxy_weights
        if self.cfg.search.proxy_combine == "rank_sum":
            return rank_sum(records, self.reward_terms, weights)
        ok = valid_mask(records)
        values = np.zeros(len(records))
        with np.errstate(divide="ignore", invalid="ignore"):
            for i in np.flatnonzero(ok):
                r = records[i]
                values[i] = weights[0] * np.log(r["length_distortion"]) - weights[1] * np.log(r["ntk_condition"])
        finite = [dict(r, valid=bool(v and np.isfinite(x))) for r, v, x in zip(records, ok, values)]
        return worst_for_invalid(np.nan_to_num(values), finite)
