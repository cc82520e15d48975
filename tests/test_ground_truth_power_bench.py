"""bench/ground_truth_power.py: the seed noise it pools, the tables it draws, aim 1's test, and the
ceiling of a perfect score, which must follow the noise both ways."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def bench(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    return importlib.import_module("ground_truth_power")


def test_seed_sigma_pools_within_architecture_variance(bench) -> None:
    # (1-2)^2 + (3-2)^2 = 2 on 1 degree of freedom; 1 + 1 + 4 = 6 on 2; one seed adds nothing.
    assert bench.seed_sigma([[1.0, 3.0], [2.0, 2.0, 5.0], [7.0]]) == pytest.approx(np.sqrt(8 / 3))
    with pytest.raises(ValueError, match="two seeds"):
        bench.seed_sigma([[1.0], [2.0]])


def test_drawn_tables_repeat_each_architecture_and_average_its_seeds(bench) -> None:
    mu = np.array([70.0, 75.0, 80.0])
    np.testing.assert_array_equal(bench.draw_table(mu, 0.0, 2, 3, np.random.default_rng(0)),
                                  [70, 70, 75, 75, 80, 80])
    noise = bench.draw_table(mu, 2.0, 400, 4, np.random.default_rng(1)) - np.repeat(mu, 400)
    assert noise.std() == pytest.approx(2.0 / np.sqrt(4), rel=0.05)  # the mean of 4 seeds


@pytest.mark.parametrize("score, baselines, met", [
    ({"estimate": 0.9, "low": 0.8}, [0.7, 0.6], True),
    ({"estimate": 0.9, "low": 0.7}, [0.7, 0.6], False),   # the lower end must clear, not touch
    ({"estimate": 0.9, "low": 0.8}, [0.5, 0.85], False),  # every baseline
    ({"estimate": 0.55, "low": 0.5}, [0.1, 0.2], False),  # tau >= 0.6 as well
    ({"estimate": 0.7, "low": 0.65}, [0.6, None], True),  # a degenerate baseline ranks nothing
    ({"estimate": None, "low": None}, [0.1, 0.1], False),
])
def test_aim_one(bench, score: dict, baselines: list, met: bool) -> None:
    assert bench.aim_one(score, baselines) is met


def test_a_perfect_score_meets_the_aim_only_where_the_noise_allows(bench) -> None:
    mu = np.linspace(60.0, 80.0, 24)
    quiet = bench.posterior_ceiling(mu, 0.01, 2, draws=5, resamples=200, measured=[0.7, 0.6])
    assert quiet["tau"] == pytest.approx(1.0) and quiet["aim_one_vs_measured"] == 1.0
    loud = bench.posterior_ceiling(mu, 20.0, 2, draws=5, resamples=200, measured=[0.7, 0.6])
    assert abs(loud["tau"]) < 0.5 and loud["aim_one_vs_measured"] == 0.0
    # In drawn tables the oracle ranks a noiseless table perfectly; a score in reverse never meets the aim.
    scores = {"oracle": mu, "params": mu[::-1].copy(), "macs": mu[::-1].copy(), "reverse": mu[::-1].copy()}
    got = bench.cell(scores, mu, 0.0, 2, 1, tables=2, resamples=200, seed=0, measured=[0.7, 0.6])
    assert got["oracle"]["tau"] == pytest.approx(1.0) and got["oracle"]["aim_one"] == 1.0
    assert got["params"]["tau"] == pytest.approx(-1.0) and "aim_one" not in got["params"]
    assert got["reverse"]["aim_one"] == 0.0 and got["reverse"]["aim_one_vs_measured"] == 0.0
    # With the seed noise ten times the spread of mu, the oracle falls far from 1.
    noisy = bench.cell(scores, mu, 200.0, 1, 2, tables=4, resamples=200, seed=0, measured=[0.7, 0.6])
    assert noisy["oracle"]["tau"] < 0.5


def test_the_bench_runs_on_a_record(tmp_path: Path) -> None:
    """The command line on a three-architecture record of the fidelity config writes its JSON."""
    archs = [{"patch_size": 4, "embed_dim": e, "depth": d, "num_heads": [2] * d, "attn_dim": [32] * d,
              "mlp_dim": [64] * d} for e, d in ((32, 1), (48, 2), (64, 3), (64, 4))]
    runs = [[60.0, 61.0], [70.0, 69.0], [75.0, 76.5], [79.0, 78.0]]
    truth = [{"arch": a, "trained_top1": float(np.mean(r)), "seed_runs": r} for a, r in zip(archs, runs)]
    (tmp_path / "record.json").write_text(json.dumps({"ground_truth": truth}))
    (tmp_path / "fidelity.json").write_text(json.dumps({"ground_truth_sha1": "x", "variants": {
        "cyclic-sandwich": {"inherited_top1": [50.0, 62.0, 61.0, 70.0]}}}))
    out = tmp_path / "power.json"
    proc = subprocess.run([sys.executable, "bench/ground_truth_power.py", "--record", str(tmp_path / "record.json"),
                           "--fidelity", str(tmp_path / "fidelity.json"), "--repeats", "1,2", "--seeds", "2",
                           "--tables", "3", "--resamples", "50", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["archs"] == 4 and result["seed_sigma"] == pytest.approx(np.sqrt((0.5 + 0.5 + 1.125 + 0.5) / 4))
    assert [(g["archs"], g["seeds"]) for g in result["grid"]] == [(4, 2), (8, 2)]
    assert set(result["grid"][0]["scores"]) == {"oracle", "params", "macs", "inherited, cyclic-sandwich"}
    assert result["measured"]["params"]["estimate"] == pytest.approx(1.0)  # params grow with the top-1 here
    assert 0.0 <= result["this_table"]["aim_one_vs_measured"] <= 1.0
    assert "| 8 x 2 |" in proc.stdout and "cyclic-sandwich " in proc.stdout  # the doc's table
    # ... whose row holds that cell's numbers: the oracle's tau (lower end) and the inherited tau.
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| 8 x 2 |"))
    cell = result["grid"][1]["scores"]
    oracle, inherited = cell["oracle"], cell["inherited, cyclic-sandwich"]
    assert f"| {oracle['tau']:+.2f} ({oracle['low']:+.2f}) |" in row
    assert row.endswith(f"| cyclic-sandwich {inherited['tau']:+.2f}, {inherited['aim_one']:.0%} |")
