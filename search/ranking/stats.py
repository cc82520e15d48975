"""Rank-correlation statistics of a score against ground truth, shared by the ranking studies.

A score is "higher predicts better" (negate a lower-is-better proxy such as kappa first). Pairs
where the score or the target is None, NaN or infinite are left out and counted (`invalid`),
never averaged in. A score with fewer than two distinct valid values is `degenerate`: it ranks
nothing, and its estimate is None.

- `correlation`: Kendall tau-b or Spearman rho (`scipy.stats`) with a percentile bootstrap
  interval (`scipy.stats.bootstrap`, seeded) that resamples architectures.
- `banded_correlation`: the same inside K equal-count bands of a cost (where a search under a
  budget actually chooses): the band-size-weighted mean of the per-band correlations, its
  interval resampling architectures within each band (stratified).
- `correlation_difference`: by how much a score beats a baseline (#params) on the same
  architectures, globally or within bands, with a paired bootstrap interval.
- `top_k_overlap`, `regret`: what picking by the score would have given.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
from scipy.stats import bootstrap, kendalltau, spearmanr

Values = Sequence[Optional[float]]
METHODS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "kendall": lambda x, y: float(kendalltau(x, y).statistic),
    "spearman": lambda x, y: float(spearmanr(x, y).statistic),
}


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


def _nan_none(v: float) -> Optional[float]:
    return None if v is None or not math.isfinite(v) else float(v)


def _interval(data: tuple[np.ndarray, ...], statistic: Callable[..., float], confidence: float,
              n_resamples: int, seed: int) -> tuple[Optional[float], Optional[float]]:
    """Percentile bootstrap interval of `statistic` over index samples, each resampled on its own."""
    res = bootstrap(data, statistic, n_resamples=n_resamples, vectorized=False, paired=False,
                    confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
    return _nan_none(res.confidence_interval.low), _nan_none(res.confidence_interval.high)


def estimate(score: Values, target: Values, method: str = "kendall") -> Optional[float]:
    """The correlation alone over the valid pairs (no interval); None when either is degenerate."""
    ok = valid_mask(score, target)
    x, y = as_array(score)[ok], as_array(target)[ok]
    if len(x) < 3 or is_degenerate(x) or is_degenerate(y):
        return None
    return _nan_none(METHODS[method](x, y))


def correlation(score: Values, target: Values, method: str = "kendall", confidence: float = 0.95,
                n_resamples: int = 2000, seed: int = 0) -> dict:
    """{"estimate", "low", "high", "n", "invalid", "degenerate"} of the score against the target."""
    stat = METHODS[method]
    ok = valid_mask(score, target)
    x, y = as_array(score)[ok], as_array(target)[ok]
    out = {"estimate": None, "low": None, "high": None, "n": int(ok.sum()), "invalid": int((~ok).sum()),
           "degenerate": is_degenerate(x)}
    if out["degenerate"] or is_degenerate(y) or len(x) < 3:
        return out
    out["estimate"] = stat(x, y)
    out["low"], out["high"] = _interval((np.arange(len(x)),), lambda i: stat(x[i], y[i]), confidence,
                                        n_resamples, seed)
    return out


def cost_bands(cost: Values, bands: int) -> list[np.ndarray]:
    """Indices of `bands` equal-count bands of ascending cost (sizes differ by at most one; ties
    keep the input order)."""
    if not 1 <= bands <= len(cost):
        raise ValueError(f"cannot cut {len(cost)} architectures into {bands} bands")
    return np.array_split(np.argsort(as_array(cost), kind="stable"), bands)


def banded_correlation(score: Values, target: Values, cost: Values, bands: int = 4, method: str = "kendall",
                       confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> dict:
    """`correlation` inside equal-count cost bands (cut over all architectures, invalid ones then
    left out): the size-weighted mean of the per-band correlations, with a stratified bootstrap
    interval; `bands` lists each band's {"estimate", "n", "cost_low", "cost_high"}."""
    stat = METHODS[method]
    ok = valid_mask(score, target)
    s, t, c = as_array(score), as_array(target), as_array(cost)
    groups = [band[ok[band]] for band in cost_bands(cost, bands)]
    out = {"estimate": None, "low": None, "high": None, "n": int(ok.sum()), "invalid": int((~ok).sum()),
           "degenerate": is_degenerate(s[ok]), "bands": []}

    def weighted(*idx: np.ndarray) -> float:
        values = [(stat(s[i], t[i]), len(i)) for i in idx
                  if len(i) >= 3 and not is_degenerate(s[i]) and not is_degenerate(t[i])]
        values = [(v, n) for v, n in values if math.isfinite(v)]
        if not values:
            return math.nan
        return float(sum(v * n for v, n in values) / sum(n for _, n in values))

    for band, idx in zip(cost_bands(cost, bands), groups):
        out["bands"].append({"estimate": _nan_none(weighted(idx)), "n": len(idx),
                             "cost_low": float(c[band].min()), "cost_high": float(c[band].max())})
    if out["degenerate"]:
        return out
    out["estimate"] = _nan_none(weighted(*groups))
    if out["estimate"] is not None:
        out["low"], out["high"] = _interval(tuple(g for g in groups if len(g)), weighted, confidence,
                                            n_resamples, seed)
    return out


def correlation_difference(score: Values, baseline: Values, target: Values, cost: Optional[Values] = None,
                           bands: int = 4, method: str = "kendall", confidence: float = 0.95,
                           n_resamples: int = 2000, seed: int = 0) -> dict:
    """How much better `score` ranks the target than `baseline` (e.g. #params) on the same
    architectures (both valid): {"estimate", "low", "high", "n"} of corr(score) - corr(baseline),
    globally or, with `cost`, of the banded correlations; a paired bootstrap (within bands) interval."""
    stat = METHODS[method]
    ok = valid_mask(score, target) & valid_mask(baseline, target)
    s, b, t = as_array(score), as_array(baseline), as_array(target)
    out = {"estimate": None, "low": None, "high": None, "n": int(ok.sum())}
    if is_degenerate(s[ok]) or is_degenerate(b[ok]) or is_degenerate(t[ok]) or ok.sum() < 3:
        return out
    if cost is None:
        groups = [np.flatnonzero(ok)]
    else:
        groups = [band[ok[band]] for band in cost_bands(cost, bands)]
    groups = [g for g in groups if len(g)]

    def diff(*idx: np.ndarray) -> float:
        pairs = [(stat(s[i], t[i]) - stat(b[i], t[i]), len(i)) for i in idx
                 if len(i) >= 3 and not (is_degenerate(s[i]) or is_degenerate(b[i]) or is_degenerate(t[i]))]
        pairs = [(d, n) for d, n in pairs if math.isfinite(d)]
        return float(sum(d * n for d, n in pairs) / sum(n for _, n in pairs)) if pairs else math.nan

    out["estimate"] = _nan_none(diff(*groups))
    if out["estimate"] is not None:
        out["low"], out["high"] = _interval(tuple(groups), diff, confidence, n_resamples, seed)
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
