"""`search.scorer: proxy`: training-free scores (`search.proxies.zoo`), combined into a fitness.

`proxy.names` picks the proxies (As-ViT's L^E and NTK condition by default; any of the zoo,
#params and MACs included). A flat ViT is scored as a subnet of a fresh superformer,
re-initialised per seed; an As-ViT architecture (`space.kind: asvit`, no superformer) on its own
freshly built model. Fitness over a set of records is `proxy.combine`:
- `rank_sum` (As-ViT Algorithm 2): minus the weighted (`proxy.weights`, one per name) sum of each
  proxy's rank, every proxy ranked in its better-direction;
- `weighted`: the weighted sum of each proxy times its direction, on its log scale where it spans
  decades (the As-ViT two-proxy case is w1 log L^E - w2 log kappa);
- `ensemble`: a fitted or rank ensemble read from `proxy.ensemble`
  (`search.proxies.ensemble`; its proxies are the ones computed).
RL rewards the range-normalised deltas of every proxy in its direction (As-ViT Algorithm 1).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from vitas.core.config import Config, require_file
from vitas.core.data import check_data_source, num_classes, split_settings, transform_settings
from vitas.core.errors import UserError
from vitas.search.proxies import zoo
from vitas.search.proxies.ensemble import Ensemble, transform_of
from vitas.search.proxies.measures import check_proxy_config, proxy_batch, proxy_superformer
from vitas.search.scoring.base import Scorer, rank_sum, valid_mask, worst_for_invalid
from vitas.supernet.asvit_space import AsVitSpace
from vitas.supernet.model import Superformer
from vitas.supernet.models import create_model
from vitas.supernet.space import space_from_config

# proxy.* options that only change how the numbers are computed, not the numbers.
HOW_KEYS = ("ntk_method",)


class ProxyScorer(Scorer):
    """Training-free scorer of `proxy.names` (or an ensemble's proxies)."""

    name = "proxy"

    def __init__(self, cfg: Config, device: Optional[torch.device | str] = None):
        super().__init__(space_from_config(cfg))
        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.ensemble: Optional[Ensemble] = None
        if cfg.proxy.combine == "ensemble" and cfg.proxy.ensemble and Path(cfg.proxy.ensemble).is_file():
            self.ensemble = Ensemble.load(cfg.proxy.ensemble)
        self.names = list(self.ensemble.names if self.ensemble else cfg.proxy.names)
        self.fields = tuple(self.names)
        self.reward_terms = [(n, float(zoo.PROXIES[n].better)) for n in self.names if n in zoo.PROXIES]
        self._model: Optional[Superformer] = None
        self._batch: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def check(self) -> None:
        """Proxy names and options, their weights or ensemble, and the data of the proxy batch."""
        check_proxy_config(self.cfg.proxy)
        zoo.check_names(self.names)
        p = self.cfg.proxy
        if p.combine == "ensemble":
            require_file(p.ensemble or "", "proxy.ensemble")
        elif len(p.weights) != len(self.names):
            raise UserError(f"proxy.weights needs one weight per proxy of proxy.names {self.names}, "
                            f"got {p.weights}")
        check_data_source(self.cfg.data, holdout=False)

    def settings(self) -> dict[str, Any]:
        """Every proxy option that changes the numbers (and the ensemble's content), and the
        images the proxies are computed on (their split and transform)."""
        options = {f"proxy.{k}": v for k, v in dataclasses.asdict(self.cfg.proxy).items()
                   if k not in HOW_KEYS}
        if self.cfg.proxy.combine == "ensemble":
            options["proxy.ensemble.sha256"] = hashlib.sha256(Path(self.cfg.proxy.ensemble).read_bytes()).hexdigest()
        return {**options, **split_settings(self.cfg.data),
                "transform": transform_settings(self.cfg.data, self.cfg.space.img_size, False)}

    @property
    def hierarchical(self) -> bool:
        """Whether architectures are scored on their own As-ViT models (no superformer)."""
        return isinstance(self.space, AsVitSpace)

    def setup(self) -> None:
        """Read the proxy batch and, for a flat space, build the superformer (idempotent)."""
        if self._batch is None:
            self._batch = proxy_batch(self.cfg, self.device)
        if self._model is None and not self.hierarchical:
            self._model = proxy_superformer(self.cfg, self.device)

    def compute(self, archs: list[dict], curvature: bool = False) -> list[dict]:
        """The proxies of each architecture and its validity; with `curvature`, As-ViT's three
        (L^E, kappa, curvature) too (`vitas proxy` and the ranking study report them)."""
        self.setup()
        names = list(self.names)
        if curvature:
            names += [n for n in ("length_distortion", "ntk_condition", "curvature") if n not in names]
        images, labels = self._batch
        if not self.hierarchical:
            return zoo.proxy_records(names, self._model, archs, images, self.cfg.proxy, labels)
        classes = num_classes(self.cfg.data)
        records = []
        for arch in archs:
            with torch.random.fork_rng(devices=[]):  # the constructor's init is re-drawn anyway
                model = create_model(self.space, arch, classes).to(self.device).eval()
            records.append(zoo.compute_proxies(names, model, None, images, self.cfg.proxy, labels))
        return records

    def fitness(self, records: Sequence[dict]) -> np.ndarray:
        """Higher is better over all `records` (`proxy.combine`, see the module docstring)."""
        p = self.cfg.proxy
        if p.combine == "rank_sum":
            return rank_sum(records, self.reward_terms, p.weights)
        if p.combine == "ensemble":
            values = self.ensemble.score(records)
        else:
            values = np.zeros(len(records))
            for (name, sign), w in zip(self.reward_terms, p.weights):
                log = transform_of(name) == "log"
                values += [w * sign * (_log(r.get(name)) if log else _number(r.get(name))) for r in records]
        ok = valid_mask(records) & np.isfinite(values)
        finite = [dict(r, valid=bool(v)) for r, v in zip(records, ok)]
        return worst_for_invalid(np.where(ok, values, 0.0), finite)


def _number(v: Any) -> float:
    return math.nan if v is None else float(v)


def _log(v: Any) -> float:
    return math.log(v) if v is not None and v > 0 else math.nan
