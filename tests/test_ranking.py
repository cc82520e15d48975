"""Proxy ranking study: MACs-stratified sampling, correlations, `vitas rank` outputs and plots."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import kendalltau, spearmanr

from vitas.core.checkpoint import save_checkpoint
from vitas.core.config import load_config
from vitas.core.data import write_digits
from vitas.search.ranking import study as ranking
from vitas.supernet.complexity import arch_cost
from vitas.supernet.model import Superformer
from vitas.supernet.space import space_from_config
from vitas.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "yamls" / "demo-digits.yaml"
FAST = ["proxy.inits=1", "proxy.thetas=4", "proxy.ntk_images=4", "rank.archs=3"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, Path]:
    """(output_dir holding an (untrained) superformer checkpoint, digits data root)."""
    tmp = tmp_path_factory.mktemp("rank")
    data = tmp / "digits"
    write_digits(data)
    cfg = load_config(DEMO, [f"output_dir={tmp / 'run'}", f"data.root={data}"])
    space = space_from_config(cfg)
    save_checkpoint({"model": Superformer(space, 10).state_dict(), "space": space.spec(),
                     "config": cfg.to_dict()}, cfg.stage_dir("supernet") / "last.pth")
    return tmp / "run", data


def test_sample_archs_spread_over_macs(demo_run) -> None:
    out, data = demo_run
    cfg = load_config(DEMO, [f"output_dir={out}", f"data.root={data}", "search.macs_min=null",
                             "search.macs_max=null"])
    space = space_from_config(cfg)
    archs = ranking.sample_archs(space, cfg, 6)
    macs = [arch_cost(a, space, 10).macs for a in archs]
    assert len({space.key(a) for a in archs}) == len(archs) >= 5
    assert macs == sorted(macs)
    lo, hi = arch_cost(space.min_arch(), space, 10).macs, arch_cost(space.max_arch(), space, 10).macs
    assert macs[0] < lo + (hi - lo) / 3 and macs[-1] > hi - (hi - lo) / 3


def test_correlations_match_scipy() -> None:
    rng = np.random.default_rng(0)
    rows = [{"a": float(x), "b": float(x + rng.normal()), "c": None if i == 0 else float(-x)}
            for i, x in enumerate(rng.normal(size=12))]
    corr = {(c["x"], c["y"]): c for c in ranking.correlations(rows, ["a", "b", "c"])}
    a, b = [r["a"] for r in rows], [r["b"] for r in rows]
    assert corr[("a", "b")]["kendall_tau"] == pytest.approx(kendalltau(a, b).statistic)
    assert corr[("a", "b")]["spearman_rho"] == pytest.approx(spearmanr(a, b).statistic)
    assert corr[("a", "c")]["n"] == 11 and corr[("a", "c")]["kendall_tau"] == pytest.approx(-1.0)
    assert "kendall_tau" in ranking.correlation_table(list(corr.values()))


def test_vitas_rank_writes_csv_table_and_plots(demo_run, capsys) -> None:
    out, data = demo_run
    code = cli_main(["rank", "-c", str(DEMO), f"output_dir={out}", f"data.root={data}", *FAST,
                     "--ground-truth-epochs", "0"])
    assert code == 0
    printed = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(printed[-1])
    assert summary["archs"] == 3
    assert summary["columns"] == ["length_distortion", "ntk_condition", "curvature", "params", "macs",
                                  "inherited_top1"]
    assert any(line.split()[:2] == ["params", "macs"] for line in printed)  # the printed table
    rank_dir = out / "rank"
    with open(rank_dir / "ranking.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(float(r["length_distortion"]) > 0 for r in rows)
    assert all(0.0 <= float(r["inherited_top1"]) <= 100.0 for r in rows)
    corr = json.loads((rank_dir / "correlations.json").read_text())
    assert len(corr["correlations"]) == 15  # every pair of 6 columns
    assert (rank_dir / "inherited_top1_vs_proxies.png").stat().st_size > 1000


GROUND_TRUTH = [*FAST, "retrain.batch_size=32", "data.workers=0", "retrain.warmup_epochs=0",
                "rank.ground_truth_epochs=1"]


def rank_ground_truth(out: Path, data: Path, *overrides: str) -> dict:
    """`ranking.rank` with one epoch of real from-scratch training per architecture."""
    cfg = load_config(DEMO, [f"output_dir={out}", f"data.root={data}", *GROUND_TRUTH, *overrides])
    return ranking.rank(cfg, Path(cfg.output_dir) / "rank")


@pytest.fixture(scope="module")
def local_ground_truth(tiny_digits, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("rank-gt") / "run"
    return out, rank_ground_truth(out, tiny_digits, "launch.executor=local")


def test_rank_with_ground_truth(local_ground_truth) -> None:
    """`--ground-truth-epochs E` trains each architecture from scratch (retrain.train_arch) and
    correlates the proxies and model size with its val top-1."""
    out, result = local_ground_truth
    assert "trained_top1" in result["columns"] and "inherited_top1" not in result["columns"]
    trained = [row["trained_top1"] for row in result["rows"]]
    for i, top1 in enumerate(trained):
        summary = json.loads((out / "rank" / "ground_truth" / f"arch{i:03d}" / "summary.json").read_text())
        assert summary["epochs"] == 1 and summary["top1"] == top1 and 0.0 <= top1 <= 100.0
    pairs = {(c["x"], c["y"]) for c in result["correlations"]}
    assert ("macs", "trained_top1") in pairs and ("length_distortion", "trained_top1") in pairs
    assert (out / "rank" / "trained_top1_vs_proxies.png").is_file()


@pytest.mark.slurm
def test_rank_ground_truth_on_a_slurm_array(slurm_cluster, local_ground_truth, tiny_digits,
                                            tmp_path) -> None:
    """On Slurm every architecture trains in its own array task; the accuracies equal the
    in-process ones (same seeds, one thread, CPU)."""
    _, local = local_ground_truth
    result = rank_ground_truth(tmp_path / "run", tiny_digits, "launch.executor=slurm",
                               "launch.timeout_min=10")
    assert [r["trained_top1"] for r in result["rows"]] == [r["trained_top1"] for r in local["rows"]]
    logs = list((tmp_path / "run" / "rank" / "submitit").glob("*_0_log.out"))
    assert logs, "no Slurm array task logs under rank/submitit"
