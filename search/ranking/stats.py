"""Rank-correlation statistics of a score against ground truth, shared by the ranking studies.

A score is "higher predicts better" (negate a lower-is-better proxy such as kappa first). Pairs
where the score or the target is None, NaN or infinite are left out and counted (`invalid`),
never averaged in. A score with fewer than two distinct valid values is `degenerate`: it ranks
nothing, and its estimate is None.

- `correlation`: Kendall tau-b or Spearman rho with a percentile bootstrap interval
  (`scipy.stats.bootstrap`, seeded) that resamples architectures.
- `banded_correlation`: the same inside K equal-count bands of a cost (where a search under a
  budget actually chooses): the band-size-weighted mean of the per-band correlations, its
  interval resampling architectures within each band (stratified).
- `correlation_difference`: by how much a score beats a baseline (#params) on the same
  architectures, globally or within bands, with a paired bootstrap interval.
- `top_k_overlap`, `regret`: what picking by the score would have given.

The correlations of the bootstrap resamples are computed all at once (`Correlation`): Kendall's
from the pair-sign matrices of the data gathered by the resampled indices, Spearman's from ranks
along the resample axis; a study of ~100 scores x 7 targets would otherwise make millions of
`scipy.stats.kendalltau` calls. The tests check both against `scipy.stats` on resamples with ties.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Optional, Sequence

import numpy as np
from scipy.stats import DegenerateDataWarning, bootstrap, rankdata

Values = Sequence[Optional[float]]
METHODS = ("kendall", "spearman")
BATCH = 250  # resamples evaluated together (bounds the memory of the Kendall pair matrices)


def as_array(values: Values) -> np.ndarray:
    """float64 array with None (and anything not finite) as NaN."""
    return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)


def valid_mask(score: Values, target: Values) -> np.ndarray:
    """Where both the score and the target are finite."""
    s, t = as_array(score), as_array(target)
    if len(s) != len(t):
        raise ValueError(f"{len(s)} scores for {len(t)} targets")
    return np.isfinite(s) & np.isfinite(t)


def is_degenerate(values: np.ndarray) -> bool:
    """Fewer than two distinct values: nothing to rank by."""
    return len(np.unique(values)) < 2


def _nan_none(v: Optional[float]) -> Optional[float]:
    return None if v is None or not math.isfinite(v) else float(v)


class Correlation:
    """Kendall tau-b or Spearman rho of (x[i], y[i]) for index arrays i of shape (..., m), one value
    per row (NaN for a row where x or y is constant); `x`, `y` are finite."""

    def __init__(self, x: np.ndarray, y: np.ndarray, method: str):
        if method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
        self.x, self.y, self.method = x, y, method
        if method == "kendall":
            self.sx, self.sy = (np.sign(v[:, None] - v[None, :]).astype(np.int8) for v in (x, y))

    def __call__(self, idx: np.ndarray, axis: int = -1) -> np.ndarray:
        idx = np.moveaxis(np.asarray(idx), axis, -1)
        m = idx.shape[-1]
        with np.errstate(invalid="ignore", divide="ignore"):
            if self.method == "kendall":
                rows, cols = idx[..., :, None], idx[..., None, :]
                a, b = self.sx[rows, cols], self.sy[rows, cols]
                pairs = m * (m - 1) / 2
                concord = (a * b).sum(axis=(-2, -1), dtype=np.int64) / 2
                ties_x = ((a == 0).sum(axis=(-2, -1)) - m) / 2  # the diagonal is not a pair
                ties_y = ((b == 0).sum(axis=(-2, -1)) - m) / 2
                return concord / np.sqrt((pairs - ties_x) * (pairs - ties_y))
            rx, ry = (rankdata(v[idx], axis=-1) for v in (self.x, self.y))
            rx, ry = rx - rx.mean(axis=-1, keepdims=True), ry - ry.mean(axis=-1, keepdims=True)
            return (rx * ry).sum(axis=-1) / np.sqrt((rx * rx).sum(axis=-1) * (ry * ry).sum(axis=-1))


def _weighted(values: Sequence[np.ndarray], sizes: Sequence[int]) -> np.ndarray:
    """Size-weighted mean over groups, leaving out groups whose value is NaN (per row)."""
    v = np.stack([np.broadcast_to(x, np.shape(values[0])) for x in values])
    w = np.array(sizes, dtype=np.float64).reshape((-1,) + (1,) * (v.ndim - 1)) * np.isfinite(v)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nansum(v * w, axis=0) / w.sum(axis=0)


def _grouped(corr: Callable[[np.ndarray], np.ndarray], groups: Sequence[np.ndarray]
             ) -> Callable[..., np.ndarray]:
    """The size-weighted mean of `corr` over index groups (bands of fewer than 3 left out)."""
    sizes = [len(g) for g in groups]

    def statistic(*idx: np.ndarray, axis: int = -1) -> np.ndarray:
        idx = [np.moveaxis(np.asarray(i), axis, -1) for i in idx]
        return _weighted([corr(i) if n >= 3 else np.full(np.shape(i)[:-1], math.nan)
                          for i, n in zip(idx, sizes)], sizes)
    return statistic


def _interval(groups: Sequence[np.ndarray], statistic: Callable[..., np.ndarray], confidence: float,
              n_resamples: int, seed: int) -> tuple[Optional[float], Optional[float]]:
    """Percentile bootstrap interval of `statistic` over index groups, each resampled on its own.

    A resample where the statistic is undefined (a few architectures drawn with tied values) is
    left out of the percentiles, as long as at least half of them are defined; otherwise None.
    (scipy would make the whole interval NaN, with a warning that wrongly speaks of BCa.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateDataWarning)
        res = bootstrap(tuple(groups), statistic, n_resamples=n_resamples, vectorized=True, paired=False,
                        batch=BATCH, confidence_level=confidence, method="percentile",
                        rng=np.random.default_rng(seed))
    dist = np.asarray(res.bootstrap_distribution, dtype=np.float64)
    if np.isfinite(dist).sum() * 2 < dist.size:
        return None, None
    alpha = (1.0 - confidence) / 2
    low, high = np.nanquantile(dist, [alpha, 1.0 - alpha])
    return _nan_none(float(low)), _nan_none(float(high))


def estimate(score: Values, target: Values, method: str = "kendall") -> Optional[float]:
    """The correlation alone over the valid pairs (no interval); None when either is degenerate."""
    ok = valid_mask(score, target)
    x, y = as_array(score)[ok], as_array(target)[ok]
    if len(x) < 3 or is_degenerate(x) or is_degenerate(y):
        return None
    return _nan_none(float(Correlation(x, y, method)(np.arange(len(x)))))


def correlation(score: Values, target: Values, method: str = "kendall", confidence: float = 0.95,
                n_resamples: int = 2000, seed: int = 0) -> dict:
    """{"estimate", "low", "high", "n", "invalid", "degenerate"} of the score against the target."""
    ok = valid_mask(score, target)
    x, y = as_array(score)[ok], as_array(target)[ok]
    out = {"estimate": estimate(x, y, method), "low": None, "high": None, "n": int(ok.sum()),
           "invalid": int((~ok).sum()), "degenerate": is_degenerate(x)}
    if out["estimate"] is not None:
        out["low"], out["high"] = _interval([np.arange(len(x))], Correlation(x, y, method), confidence,
                                            n_resamples, seed)
    return out


def cost_bands(cost: Values, bands: int) -> list[np.ndarray]:
    """Indices of `bands` equal-count bands of ascending cost (sizes differ by at most one; ties
    keep the input order)."""
    if not 1 <= bands <= len(cost):
        raise ValueError(f"cannot cut {len(cost)} architectures into {bands} bands")
    return np.array_split(np.argsort(as_array(cost), kind="stable"), bands)


def banded_estimate(score: Values, target: Values, cost: Values, bands: int = 4,
                    method: str = "kendall") -> Optional[float]:
    """`banded_correlation`'s estimate alone (no interval), cheap enough to repeat over many
    resamples of the images a score is measured on; None when the score is degenerate."""
    ok = valid_mask(score, target)
    s = as_array(score)
    groups = [g for g in (band[ok[band]] for band in cost_bands(cost, bands)) if len(g)]
    if is_degenerate(s[ok]) or not groups:
        return None
    corr = Correlation(np.nan_to_num(s), np.nan_to_num(as_array(target)), method)
    return _nan_none(float(_grouped(corr, groups)(*groups)))


def banded_correlation(score: Values, target: Values, cost: Values, bands: int = 4, method: str = "kendall",
                       confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> dict:
    """`correlation` inside equal-count cost bands (cut over all architectures, invalid ones then
    left out): the size-weighted mean of the per-band correlations, with a stratified bootstrap
    interval; `bands` lists each band's {"estimate", "n", "cost_low", "cost_high"}."""
    ok = valid_mask(score, target)
    s, t, c = as_array(score), as_array(target), as_array(cost)
    corr = Correlation(np.nan_to_num(s), np.nan_to_num(t), method)  # invalid indices are never drawn
    cut = cost_bands(cost, bands)
    groups = [band[ok[band]] for band in cut]
    out = {"estimate": None, "low": None, "high": None, "n": int(ok.sum()), "invalid": int((~ok).sum()),
           "degenerate": is_degenerate(s[ok]), "bands": []}
    for band, idx in zip(cut, groups):
        value = float(_grouped(corr, [idx])(idx)) if len(idx) else math.nan
        out["bands"].append({"estimate": _nan_none(value), "n": len(idx),
                             "cost_low": float(c[band].min()), "cost_high": float(c[band].max())})
    groups = [g for g in groups if len(g)]
    if out["degenerate"] or not groups:
        return out
    out["estimate"] = banded_estimate(score, target, cost, bands, method)
    if out["estimate"] is not None:
        out["low"], out["high"] = _interval(groups, _grouped(corr, groups), confidence, n_resamples, seed)
    return out


def correlation_difference(score: Values, baseline: Values, target: Values, cost: Optional[Values] = None,
                           bands: int = 4, method: str = "kendall", confidence: float = 0.95,
                           n_resamples: int = 2000, seed: int = 0) -> dict:
    """How much better `score` ranks the target than `baseline` (e.g. #params) on the same
    architectures (both valid): {"estimate", "low", "high", "n"} of corr(score) - corr(baseline),
    globally or, with `cost`, of the banded correlations; a paired bootstrap (within bands) interval."""
    ok = valid_mask(score, target) & valid_mask(baseline, target)
    s, b, t = (np.nan_to_num(as_array(v)) for v in (score, baseline, target))
    out = {"estimate": None, "low": None, "high": None, "n": int(ok.sum())}
    if ok.sum() < 3 or any(is_degenerate(v[ok]) for v in (s, b, t)):
        return out
    groups = [np.flatnonzero(ok)] if cost is None else [band[ok[band]] for band in cost_bands(cost, bands)]
    groups = [g for g in groups if len(g)]
    with_score = _grouped(Correlation(s, t, method), groups)
    with_baseline = _grouped(Correlation(b, t, method), groups)

    def statistic(*idx: np.ndarray, axis: int = -1) -> np.ndarray:
        return with_score(*idx, axis=axis) - with_baseline(*idx, axis=axis)

    out["estimate"] = _nan_none(float(statistic(*groups)))
    if out["estimate"] is not None:
        out["low"], out["high"] = _interval(groups, statistic, confidence, n_resamples, seed)
    return out


def top_k_overlap(score: Values, target: Values, k: int) -> Optional[float]:
    """Share of the k best architectures by target that are among the k best by score (valid
    pairs only); None for a degenerate score or fewer than k valid pairs."""
    ok = valid_mask(score, target)
    s, t = as_array(score)[ok], as_array(target)[ok]
    if len(s) < k or is_degenerate(s):
        return None
    best_s = set(np.argsort(-s, kind="stable")[:k].tolist())
    best_t = set(np.argsort(-t, kind="stable")[:k].tolist())
    return len(best_s & best_t) / k


def regret(score: Values, target: Values) -> Optional[float]:
    """Best target minus the target of the best-scored architecture (the mean target over ties for
    the best score); 0 is a perfect pick. None for a degenerate score."""
    ok = valid_mask(score, target)
    s, t = as_array(score)[ok], as_array(target)[ok]
    if len(s) == 0 or is_degenerate(s):
        return None
    return float(t.max() - t[s == s.max()].mean())


def fidelity(score: Values, target: Values, cost: Values, bands: int = 4, top_k: int = 10,
             confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Every statistic above of one score against one target, as one JSON-able dict."""
    kw = dict(confidence=confidence, n_resamples=n_resamples, seed=seed)
    return {"kendall": correlation(score, target, "kendall", **kw),
            "spearman": correlation(score, target, "spearman", **kw),
            "kendall_banded": banded_correlation(score, target, cost, bands, "kendall", **kw),
            "spearman_banded": banded_correlation(score, target, cost, bands, "spearman", **kw),
            f"top{top_k}_overlap": top_k_overlap(score, target, top_k),
            "regret": regret(score, target)}
