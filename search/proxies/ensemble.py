"""One score from several proxies: rank aggregation (nothing fitted) or a ridge model fitted on a
ground-truth table, with cross-validation that never scores an architecture by a model fitted on it.

- `rank`: the weighted mean, over the proxies, of each one's rank among the records scored
  together (its better-direction from `zoo.PROXIES`; ties share the mean rank), divided by their
  number: in (0, 1], higher is better. As-ViT's L^E + kappa rank sum is the two-proxy case.
  Relative to the records scored together, like every rank sum.
- `ridge`: every proxy on its zoo scale (log for positive proxies spanning decades), standardised
  with the training split's mean and spread, and a ridge regression (`sklearn.linear_model.RidgeCV`,
  its penalty chosen by leave-one-out on the training split only) onto the training split's
  accuracy ranks scaled to (0, 1]. A record's score depends on that record alone.

A record missing a proxy, or holding a None / non-finite one, scores NaN: it is never ranked.
`Ensemble.save`/`load` keep it as plain JSON (the search scorer loads `proxy.ensemble`).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold

from vitas.core.checkpoint import write_json
from vitas.core.errors import UserError
from vitas.search.proxies.zoo import PROXIES, check_names

METHODS = ("rank", "ridge")
ALPHAS = tuple(10.0 ** np.arange(-3, 4.5, 0.5))  # ridge penalties tried on the training split


def transform_of(name: str) -> str:
    """`log` for a positive proxy that spans decades, else `identity`."""
    return "log" if PROXIES[name].log_scale else "identity"


def feature_matrix(records: Sequence[dict], names: Sequence[str], transforms: Sequence[str]) -> np.ndarray:
    """(records, names) float64 matrix of the transformed proxies; NaN where one is missing, None,
    not finite, or not positive under `log`."""
    out = np.full((len(records), len(names)), math.nan)
    for i, rec in enumerate(records):
        for j, (name, how) in enumerate(zip(names, transforms)):
            v = rec.get(name)
            if v is None or not math.isfinite(float(v)) or (how == "log" and float(v) <= 0):
                continue
            out[i, j] = math.log(float(v)) if how == "log" else float(v)
    return out


@dataclass
class Ensemble:
    """A combination of the proxies `names`; `weights` are the rank weights (`rank`) or the ridge
    coefficients of the standardised features (`ridge`, with `center`, `scale`, `intercept`)."""

    method: str
    names: list[str]
    weights: list[float]
    transforms: list[str] = field(default_factory=list)
    center: list[float] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)
    intercept: float = 0.0
    alpha: Optional[float] = None
    fitted_on: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"ensemble method must be one of {list(METHODS)}, got {self.method!r}")
        self.names = check_names(self.names)
        self.transforms = self.transforms or [transform_of(n) for n in self.names]
        d = len(self.names)
        lengths = {"weights": len(self.weights), "transforms": len(self.transforms)}
        if self.method == "ridge":
            lengths |= {"center": len(self.center), "scale": len(self.scale)}
        bad = {k: n for k, n in lengths.items() if n != d}
        if not d or bad:
            raise UserError(f"ensemble of {d} proxies {self.names} has {bad or 'no proxies'}")

    def score(self, records: Sequence[dict]) -> np.ndarray:
        """One score per record, higher predicts better; NaN for a record missing a valid proxy."""
        x = feature_matrix(records, self.names, self.transforms)
        ok = np.isfinite(x).all(axis=1)
        out = np.full(len(records), math.nan)
        if not ok.any():
            return out
        if self.method == "rank":
            signs = np.array([PROXIES[n].better for n in self.names], dtype=np.float64)
            ranks = rankdata(x[ok] * signs, axis=0) / ok.sum()
            out[ok] = ranks @ np.asarray(self.weights) / sum(abs(w) for w in self.weights)
        else:
            z = (x[ok] - np.asarray(self.center)) / np.asarray(self.scale)
            out[ok] = z @ np.asarray(self.weights) + self.intercept
        return out

    def save(self, path: str | Path) -> Path:
        """Write the ensemble as plain JSON (atomically)."""
        return write_json(asdict(self), path)

    @classmethod
    def load(cls, path: str | Path) -> "Ensemble":
        """Read an ensemble written by `save`; a missing or malformed file is a UserError."""
        try:
            data = json.loads(Path(path).read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise UserError(f"cannot read the proxy ensemble {path}: {exc}") from None


def rank_ensemble(names: Sequence[str], weights: Optional[Sequence[float]] = None) -> Ensemble:
    """Rank aggregation of `names` (equal weights unless given); nothing is fitted."""
    return Ensemble("rank", list(names), [1.0] * len(names) if weights is None else [float(w) for w in weights])


def fit_ensemble(records: Sequence[dict], target: Sequence[Optional[float]], names: Sequence[str],
                 alphas: Sequence[float] = ALPHAS) -> Ensemble:
    """A ridge ensemble fitted on `records` and their `target` (e.g. accuracy); records with an
    invalid proxy or target are left out. A proxy constant over the records gets weight 0."""
    names = check_names(names)
    transforms = [transform_of(n) for n in names]
    x = feature_matrix(records, names, transforms)
    y = np.array([math.nan if t is None else float(t) for t in target])
    ok = np.isfinite(x).all(axis=1) & np.isfinite(y)
    if ok.sum() < 3:
        raise UserError(f"fitting a proxy ensemble needs at least 3 valid records, got {int(ok.sum())}")
    x, y = x[ok], rankdata(y[ok]) / ok.sum()
    center, spread = x.mean(axis=0), x.std(axis=0)
    varies = spread > 0
    scale = np.where(varies, spread, 1.0)
    weights = np.zeros(len(names))
    model = RidgeCV(alphas=list(alphas)).fit((x[:, varies] - center[varies]) / scale[varies], y)
    weights[varies] = model.coef_
    return Ensemble("ridge", names, weights.tolist(), transforms, center.tolist(), scale.tolist(),
                    float(model.intercept_), float(model.alpha_), {"records": int(ok.sum())})


def fold_indices(n: int, folds: int, seed: int = 0) -> list[np.ndarray]:
    """The test indices of each of `folds` shuffled folds of `n` records (fixed by `seed`)."""
    if not 2 <= folds <= n:
        raise UserError(f"cannot cross-validate {n} records in {folds} folds")
    return [test for _, test in KFold(n_splits=folds, shuffle=True, random_state=seed).split(np.arange(n))]


def cross_validated_scores(records: Sequence[dict], target: Sequence[Optional[float]], names: Sequence[str],
                           folds: int = 10, seed: int = 0, alphas: Sequence[float] = ALPHAS) -> np.ndarray:
    """Out-of-fold ridge scores: each record scored by an ensemble fitted on the other folds only
    (its own target never enters its score). Folds are cut over all records by `seed`; a record
    with an invalid proxy scores NaN."""
    out = np.full(len(records), math.nan)
    for test in fold_indices(len(records), folds, seed):
        train = np.setdiff1d(np.arange(len(records)), test)
        ens = fit_ensemble([records[i] for i in train], [target[i] for i in train], names, alphas)
        out[test] = ens.score([records[i] for i in test])
    return out
