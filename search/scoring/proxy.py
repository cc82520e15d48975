"""`search.scorer: proxy`: As-ViT's training-free scores (length distortion up, NTK condition down).

A flat ViT is scored as a subnet of a fresh superformer, re-initialised per seed
(`search.proxies`); an As-ViT architecture (`space.kind: asvit`, which has no superformer) on its
own freshly built `AsViT`, re-drawn whole per seed.
Fitness over a set of records is `proxy.combine`: `rank_sum` (As-ViT Algorithm 2: rank by
L^E descending plus rank by kappa ascending, weighted by `proxy.weights`, negated so that
higher is better) or `weighted` (w1 log L^E - w2 log kappa). RL rewards the range-normalised
deltas of L^E minus those of kappa, As-ViT Algorithm 1.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

import dataclasses

from vitas.core.config import Config
from vitas.core.data import check_data_source, num_classes, split_settings, transform_settings
from vitas.core.errors import UserError
from vitas.search.proxies.measures import check_proxy_config, ntk_batch, proxy_scores_many, proxy_superformer
from vitas.search.scoring.base import Scorer, rank_sum, valid_mask, worst_for_invalid
from vitas.supernet.asvit_space import AsVitSpace
from vitas.supernet.model import Superformer
from vitas.supernet.models import create_model
from vitas.supernet.space import space_from_config

# proxy.* options that only change how the numbers are computed, not the numbers.
HOW_KEYS = ("ntk_method",)


class ProxyScorer(Scorer):
    """Training-free scorer: `length_distortion` and `ntk_condition` of each architecture."""

    name = "proxy"
    fields = ("length_distortion", "ntk_condition")
    reward_terms = [("length_distortion", 1.0), ("ntk_condition", -1.0)]

    def __init__(self, cfg: Config, device: Optional[torch.device | str] = None):
        super().__init__(space_from_config(cfg))
        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._model: Optional[Superformer] = None
        self._images: Optional[torch.Tensor] = None

    def check(self) -> None:
        """Proxy options, their weights, and the data the NTK images come from."""
        check_proxy_config(self.cfg.proxy)
        if len(self.cfg.proxy.weights) != 2:
            raise UserError(f"proxy.weights needs 2 weights (length_distortion, ntk_condition), "
                            f"got {self.cfg.proxy.weights}")
        check_data_source(self.cfg.data, holdout=False)

    def settings(self) -> dict[str, Any]:
        """Every proxy option that changes the numbers, and the images the NTK is computed on
        (their split and transform)."""
        options = {f"proxy.{k}": v for k, v in dataclasses.asdict(self.cfg.proxy).items()
                   if k not in HOW_KEYS}
        return {**options, **split_settings(self.cfg.data),
                "transform": transform_settings(self.cfg.data, self.cfg.space.img_size, False)}

    @property
    def hierarchical(self) -> bool:
        """Whether architectures are scored on their own As-ViT models (no superformer)."""
        return isinstance(self.space, AsVitSpace)

    def setup(self) -> None:
        """Read the NTK images and, for a flat space, build the superformer (idempotent)."""
        if self._images is None:
            self._images = ntk_batch(self.cfg, self.device)
        if self._model is None and not self.hierarchical:
            self._model = proxy_superformer(self.cfg, self.device)

    def compute(self, archs: list[dict], curvature: bool = False) -> list[dict]:
        """L^E, kappa and validity of each architecture, and its curvature when asked (search
        never uses it; `vitas proxy` and the ranking study do)."""
        self.setup()
        if self.hierarchical:
            records = [self._own_model_scores(arch, curvature) for arch in archs]
        else:
            records = proxy_scores_many(self._model, archs, self._images, self.cfg.proxy, curvature=curvature)
        return [r if curvature else {k: v for k, v in r.items() if k != "curvature"} for r in records]

    def _own_model_scores(self, arch: dict, curvature: bool) -> dict:
        """Proxies of `arch` on its own freshly built model (every tensor re-drawn per init)."""
        with torch.random.fork_rng(devices=[]):  # the constructor's init is re-drawn anyway
            model = create_model(self.space, arch, num_classes(self.cfg.data)).to(self.device).eval()
        return proxy_scores_many(model, [None], self._images, self.cfg.proxy, curvature=curvature)[0]

    def fitness(self, records: Sequence[dict]) -> np.ndarray:
        """Higher is better over all `records`: negated weighted rank sum, or w1 log L^E - w2 log kappa."""
        weights = self.cfg.proxy.weights
        if self.cfg.proxy.combine == "rank_sum":
            return rank_sum(records, self.reward_terms, weights)
        ok = valid_mask(records)
        values = np.zeros(len(records))
        with np.errstate(divide="ignore", invalid="ignore"):
            for i in np.flatnonzero(ok):
                r = records[i]
                values[i] = weights[0] * np.log(r["length_distortion"]) - weights[1] * np.log(r["ntk_condition"])
        finite = [dict(r, valid=bool(v and np.isfinite(x))) for r, v, x in zip(records, ok, values)]
        return worst_for_invalid(np.nan_to_num(values), finite)
