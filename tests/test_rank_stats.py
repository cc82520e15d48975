"""Rank statistics: exact cases, bootstrap intervals, invalid and degenerate scores, cost bands,
top-k overlap and regret."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import kendalltau, spearmanr

from vitas.search.ranking import stats


def noisy(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    target = rng.normal(size=n)
    return target + rng.normal(size=n), target


@pytest.mark.parametrize("method", ["kendall", "spearman"])
def test_resampled_correlations_equal_scipy_with_ties(method: str) -> None:
    """The all-resamples-at-once correlations equal scipy's tau-b and rho on each resample."""
    rng = np.random.default_rng(5)
    x, y = rng.integers(0, 6, size=30).astype(float), rng.normal(size=30).round(1)
    idx = rng.integers(0, 30, size=(40, 30))
    got = stats.Correlation(x, y, method)(idx)
    ref = kendalltau if method == "kendall" else spearmanr
    assert got == pytest.approx([ref(x[i], y[i]).statistic for i in idx], abs=1e-12)
    assert np.isnan(stats.Correlation(np.ones(30), y, method)(idx[:2])).all()  # constant: no correlation


@pytest.mark.parametrize("method", ["kendall", "spearman"])
def test_a_target_equal_to_the_score_gives_one(method: str) -> None:
    score = np.linspace(0, 1, 20) ** 2
    c = stats.correlation(score, score, method, n_resamples=200)
    assert c["estimate"] == pytest.approx(1.0) and c["low"] == pytest.approx(1.0) and c["high"] == pytest.approx(1.0)
    assert stats.correlation(score, -score, method, n_resamples=200)["estimate"] == pytest.approx(-1.0)
    banded = stats.banded_correlation(score, score, score, bands=4, method=method, n_resamples=200)
    assert banded["estimate"] == pytest.approx(1.0)


def test_interval_contains_the_estimate_and_shrinks_with_more_architectures() -> None:
    widths = []
    for n in (30, 300):
        score, target = noisy(n)
        c = stats.correlation(score, target, "kendall", n_resamples=500)
        assert c["low"] < c["estimate"] < c["high"]
        assert c["estimate"] == pytest.approx(kendalltau(score, target).statistic)
        widths.append(c["high"] - c["low"])
    assert widths[1] < widths[0] / 2


def test_bootstrap_is_seeded() -> None:
    score, target = noisy(40)
    first, again = (stats.correlation(score, target, seed=3, n_resamples=300) for _ in range(2))
    assert first == again
    assert first["low"] != stats.correlation(score, target, seed=4, n_resamples=300)["low"]


def test_invalid_scores_are_left_out_and_counted() -> None:
    score, target = noisy(30)
    with_bad = list(score) + [None, math.nan, math.inf]
    c = stats.correlation(with_bad, list(target) + [5.0, 6.0, 7.0], n_resamples=200)
    assert c["invalid"] == 3 and c["n"] == 30
    assert c["estimate"] == pytest.approx(kendalltau(score, target).statistic)
    assert stats.estimate(with_bad, list(target) + [5.0, 6.0, 7.0]) == c["estimate"]


def test_a_constant_score_is_degenerate_and_never_ranked() -> None:
    _, target = noisy(20)
    c = stats.correlation([2.0] * 20, target, n_resamples=200)
    assert c["degenerate"] and c["estimate"] is None and c["low"] is None
    assert stats.estimate([2.0] * 20, target) is None
    assert stats.top_k_overlap([2.0] * 20, target, 5) is None and stats.regret([2.0] * 20, target) is None
    assert stats.banded_correlation([2.0] * 20, target, target, bands=2)["estimate"] is None


def test_cost_bands_are_equal_count_and_ordered() -> None:
    cost = [5, 1, 4, 2, 3, 9, 0]
    bands = stats.cost_bands(cost, 3)
    assert [len(b) for b in bands] == [3, 2, 2]
    assert [sorted(np.asarray(cost)[b].tolist()) for b in bands] == [[0, 1, 2], [3, 4], [5, 9]]


def test_banded_correlation_is_the_weighted_mean_of_band_correlations() -> None:
    """A score that only tracks the cost ranks well globally and not at all within bands."""
    rng = np.random.default_rng(1)
    cost = np.arange(80, dtype=float)
    target = 3.0 * (cost // 20) + rng.normal(size=80)  # the cost sets only the band's level
    b = stats.banded_correlation(cost, target, cost, bands=4, n_resamples=500)
    per_band = [kendalltau(cost[i], target[i]).statistic for i in stats.cost_bands(cost, 4)]
    assert b["estimate"] == pytest.approx(np.mean(per_band))
    assert [band["estimate"] for band in b["bands"]] == pytest.approx(per_band)
    assert b["low"] < b["estimate"] < b["high"]
    assert stats.correlation(cost, target, n_resamples=200)["estimate"] > 0.6 > abs(b["estimate"]) + 0.3


def test_banded_estimate_is_the_banded_correlation_without_its_interval() -> None:
    """The estimate alone, invalid pairs left out the same way, None for a score with one value."""
    rng = np.random.default_rng(3)
    cost = rng.permutation(30).astype(float)
    target = cost / 10 + rng.normal(size=30)
    score = target + rng.normal(size=30)
    score[[4, 17]] = np.nan
    for method in stats.METHODS:
        full = stats.banded_correlation(score, target, cost, bands=3, method=method, n_resamples=50)
        assert stats.banded_estimate(score, target, cost, bands=3, method=method) == full["estimate"]
    assert stats.banded_estimate([1.0] * 30, target, cost, bands=3) is None


def test_top_k_overlap_and_regret_by_hand() -> None:
    target = [0.9, 0.8, 0.7, 0.6, 0.5]
    score = [1.0, 5.0, 2.0, 4.0, 3.0]  # best by score: 0.8; top 2 by score {1, 3}, by target {0, 1}
    assert stats.regret(score, target) == pytest.approx(0.1)
    assert stats.top_k_overlap(score, target, 2) == pytest.approx(0.5)
    assert stats.regret(target, target) == 0.0
    assert stats.regret([1.0, 1.0, 0.0, 0.0, 0.0], target) == pytest.approx(0.05)  # tie: mean of 0.9, 0.8


def test_fidelity_bundles_every_statistic() -> None:
    score, target = noisy(40)
    f = stats.fidelity(score, target, cost=np.arange(40), bands=4, top_k=5, n_resamples=200)
    assert set(f) == {"kendall", "spearman", "kendall_banded", "spearman_banded", "top5_overlap", "regret"}
    assert f["spearman"]["estimate"] > f["kendall"]["estimate"] > 0


def test_difference_to_a_baseline_is_paired_and_banded() -> None:
    rng = np.random.default_rng(2)
    cost = np.arange(60, dtype=float)
    target = cost / 20 + rng.normal(size=60)
    good = target + 0.3 * rng.normal(size=60)
    d = stats.correlation_difference(good, cost, target, n_resamples=300)
    expect = kendalltau(good, target).statistic - kendalltau(cost, target).statistic
    assert d["estimate"] == pytest.approx(expect) and d["low"] < d["estimate"] < d["high"] and d["low"] > 0
    banded = stats.correlation_difference(good, cost, target, cost=cost, bands=3, n_resamples=300)
    per = [stats.banded_correlation(x, target, cost, bands=3, n_resamples=10)["estimate"] for x in (good, cost)]
    assert banded["estimate"] == pytest.approx(per[0] - per[1])
    same = stats.correlation_difference(cost, cost, target, n_resamples=100)
    assert same["estimate"] == same["low"] == same["high"] == 0.0
    assert stats.correlation_difference([1.0] * 60, cost, target)["estimate"] is None


def test_a_few_tied_architectures_still_get_an_interval(recwarn: pytest.WarningsRecorder) -> None:
    """Some resamples of 6 architectures with ties draw a constant score (an undefined tau): they
    are left out of the percentiles instead of voiding the interval, and scipy's warning is not shown."""
    score, target = [1, 1, 1, 2, 2, 3], [10, 12, 11, 14, 13, 15]
    out = stats.correlation(score, target, n_resamples=500)
    assert out["low"] is not None and out["low"] <= out["estimate"] <= out["high"]
    assert not [w for w in recwarn if "BCa" in str(w.message)]
