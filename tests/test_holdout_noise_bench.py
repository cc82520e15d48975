"""bench/holdout_noise.py's draws and taus: class-balanced draws of distinct images, and a tau that
reads the architectures' accuracy on exactly the drawn images."""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def bench(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    return importlib.import_module("holdout_noise")


def test_draws_are_class_balanced_and_distinct(bench) -> None:
    labels = np.repeat(np.arange(6), 40)[np.random.default_rng(0).permutation(240)]
    idx = bench.balanced_draws(labels, 60, draws=25, seed=1)
    assert idx.shape == (25, 60)
    for row in idx:
        assert len(set(row.tolist())) == 60 and np.bincount(labels[row]).tolist() == [10] * 6
    assert not np.array_equal(idx[0], idx[1])
    np.testing.assert_array_equal(idx, bench.balanced_draws(labels, 60, draws=25, seed=1))
    with pytest.raises(SystemExit, match="41 per class"):
        bench.balanced_draws(labels, 246, draws=1, seed=0)


def test_tau_reads_the_drawn_images_only(bench) -> None:
    """Four architectures right on 1..4 of the first 8 images and on none of the rest: ranked in
    order on those images, tied (degenerate, None) on images all of them get wrong."""
    correct = np.zeros((4, 16), dtype=bool)
    for a in range(4):
        correct[a, :a + 1] = True
    truth, macs = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0, 4.0])
    assert bench.taus(correct[:, :8], truth, macs, bands=1) == (pytest.approx(1.0), pytest.approx(1.0))
    assert bench.taus(correct[:, 8:], truth, macs, bands=1) == (None, None)
    assert bench.taus(correct[::-1, :8], truth, macs, bands=1)[0] == pytest.approx(-1.0)
