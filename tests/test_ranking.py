"""The ranking study: MACs-stratified sampling, ground-truth tables, scores against targets with
intervals and baselines, own ground truth over seeds (in process and on a Slurm array)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from vitas.cli import main as cli_main
from vitas.core.checkpoint import save_checkpoint
from vitas.core.config import load_config
from vitas.core.data import write_digits
from vitas.search.ranking import study as ranking
from vitas.supernet.complexity import arch_cost
from vitas.supernet.model import Superformer
from vitas.supernet.space import space_from_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "yamls" / "demo-digits.yaml"
FAST = ["proxy.inits=1", "proxy.thetas=4", "proxy.ntk_images=4", "rank.archs=6", "rank.bands=2",
        "rank.bootstrap=200"]


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


def test_vitas_rank_against_the_superformer(demo_run, capsys) -> None:
    """Without ground truth the proxies and baselines rank against inherited accuracy."""
    out, data = demo_run
    assert cli_main(["rank", "-c", str(DEMO), f"output_dir={out}", f"data.root={data}", *FAST]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(printed[-1])
    assert summary["archs"] == 6 and summary["targets"] == ["inherited_top1"]
    assert summary["scores"] == ["length_distortion", "ntk_condition", "curvature", "params", "macs"]
    assert any("params (baseline)" in line for line in printed)  # the printed table
    with open(out / "rank" / "ranking.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all(float(r["length_distortion"]) > 0 for r in rows)
    corr = json.loads((out / "rank" / "correlations.json").read_text())
    entry = corr["results"]["inherited_top1"]["ntk_condition"]
    assert set(entry) >= {"kendall", "spearman", "kendall_banded", "regret", "vs_params"}
    assert (out / "rank" / "inherited_top1_vs_scores.png").stat().st_size > 1000


def write_table(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows))
    return path


def table_rows(cfg, n: int = 8) -> list[dict]:
    space = space_from_config(cfg)
    archs = ranking.sample_archs(space, cfg, n)
    return [{"arch": a, "acc_params": arch_cost(a, space, 10).params,
             "acc_reversed": -float(arch_cost(a, space, 10).macs)} for a in archs]


def test_a_target_equal_to_a_score_gives_tau_one(demo_run, tmp_path, capsys) -> None:
    out, data = demo_run
    cfg = load_config(DEMO, [f"output_dir={tmp_path}", f"data.root={data}", *FAST])
    table = write_table(tmp_path / "gt.json", table_rows(cfg))
    assert cli_main(["rank", "-c", str(DEMO), f"output_dir={tmp_path}", f"data.root={data}", *FAST,
                     "rank.inherited=false", "rank.proxies=[length_distortion]",
                     "--ground-truth", str(table)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["targets"] == ["acc_params", "acc_reversed"]
    tau = summary["kendall_tau"]
    assert tau["acc_params"]["params"] == pytest.approx(1.0)
    assert tau["acc_reversed"]["macs"] == pytest.approx(-1.0)
    results = json.loads((tmp_path / "rank" / "correlations.json").read_text())["results"]
    ci = results["acc_params"]["params"]["kendall"]
    assert ci["low"] == pytest.approx(1.0) and ci["high"] == pytest.approx(1.0)
    assert results["acc_params"]["params"]["regret"] == 0.0


@pytest.mark.parametrize("edit, needle", [
    (lambda rows: [dict(r, acc_params="high") for r in rows], "'high' is not a number"),
    (lambda rows: rows + [rows[0]], "the same architecture as row 1"),
    (lambda rows: [dict(rows[0], arch=dict(rows[0]["arch"], embed_dim=999))] + rows[1:], "embed_dim"),
    (lambda rows: rows[:1], "at least 2 architectures"),
    (lambda rows: [{k: v for k, v in r.items() if k != "arch"} for r in rows], "has no 'arch'"),
])
def test_bad_tables_are_one_line_and_write_nothing(demo_run, tmp_path, capsys, edit, needle) -> None:
    out, data = demo_run
    cfg = load_config(DEMO, [f"output_dir={tmp_path}", f"data.root={data}", *FAST])
    table = write_table(tmp_path / "gt.json", edit(table_rows(cfg, 4)))
    run = tmp_path / "run"
    assert cli_main(["rank", "-c", str(DEMO), f"output_dir={run}", f"data.root={data}", *FAST,
                     "--ground-truth", str(table)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not run.exists()


def test_unknown_target_column_and_csv_tables(demo_run, tmp_path, capsys) -> None:
    out, data = demo_run
    cfg = load_config(DEMO, [f"output_dir={tmp_path}", f"data.root={data}", *FAST])
    rows = table_rows(cfg, 4)
    csv_path = tmp_path / "gt.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["arch", "top1"])
        for r in rows:
            writer.writerow([json.dumps(r["arch"]), r["acc_params"]])
    base = ["rank", "-c", str(DEMO), f"data.root={data}", *FAST, "rank.inherited=false",
            "rank.proxies=[length_distortion]", "--ground-truth", str(csv_path)]
    assert cli_main([*base, f"output_dir={tmp_path / 'a'}", "rank.targets=[top5]"]) == 2
    assert "has no column 'top5'" in capsys.readouterr().err
    assert cli_main([*base, f"output_dir={tmp_path / 'b'}"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["kendall_tau"]["top1"]["params"] == 1.0


GROUND_TRUTH = [*FAST, "rank.archs=3", "rank.bands=1", "retrain.batch_size=32", "data.workers=0",
                "retrain.warmup_epochs=0", "rank.ground_truth_epochs=1", "rank.ground_truth_seeds=2",
                "rank.inherited=false", "rank.proxies=[length_distortion]"]


def rank_ground_truth(out: Path, data: Path, *overrides: str) -> dict:
    """`ranking.rank` with one epoch of real from-scratch training per architecture and seed."""
    cfg = load_config(DEMO, [f"output_dir={out}", f"data.root={data}", *GROUND_TRUTH, *overrides])
    ranking.rank(cfg, Path(cfg.output_dir) / "rank")
    return json.loads((Path(cfg.output_dir) / "rank" / "correlations.json").read_text())


@pytest.fixture(scope="module")
def local_ground_truth(tiny_digits, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("rank-gt") / "run"
    return out, rank_ground_truth(out, tiny_digits, "launch.executor=local")


def test_rank_with_ground_truth_over_seeds(local_ground_truth) -> None:
    """--ground-truth-epochs E --ground-truth-seeds S trains each architecture S times from
    scratch; the target is the mean, the spread is recorded, every run has its own folder."""
    out, corr = local_ground_truth
    assert corr["targets"] == ["trained_top1"] and corr["ground_truth"]["seeds"] == 2
    runs = corr["ground_truth"]["runs"]
    assert len(runs) == 3 and all(len(r) == 2 for r in runs)
    summaries = sorted((out / "rank" / "ground_truth").glob("*/seed*/summary.json"))
    assert len(summaries) == 6
    tops = sorted(json.loads(p.read_text())["top1"] for p in summaries)
    assert tops == sorted(t for r in runs for t in r)
    with open(out / "rank" / "ranking.csv") as f:
        rows = list(csv.DictReader(f))
    for row, r in zip(rows, runs):
        assert float(row["trained_top1"]) == pytest.approx(sum(r) / 2)
        assert row["trained_top1_std"] != ""


@pytest.mark.slurm
def test_rank_ground_truth_on_a_slurm_array(slurm_cluster, local_ground_truth, tiny_digits,
                                            tmp_path) -> None:
    """On Slurm every (architecture, seed) trains in its own array task; the accuracies equal the
    in-process ones (same seeds, one thread, CPU)."""
    _, local = local_ground_truth
    corr = rank_ground_truth(tmp_path / "run", tiny_digits, "launch.executor=slurm", "launch.timeout_min=10")
    assert corr["ground_truth"]["runs"] == local["ground_truth"]["runs"]
    logs = list((tmp_path / "run" / "rank" / "submitit").glob("*_0_log.out"))
    assert logs, "no Slurm array task logs under rank/submitit"


def test_rank_on_the_asvit_space(tiny_digits, tmp_path, capsys) -> None:
    """As-ViT topologies (no superformer): the proxies of freshly built models and the baselines
    against a table; a superformer checkpoint is refused for such a space."""
    yaml_path = ROOT / "yamls" / "asvit-digits.yaml"
    base = ["rank", "-c", str(yaml_path), f"data.root={tiny_digits}", "proxy.inits=1", "proxy.thetas=4",
            "proxy.ntk_images=4", "rank.bands=1", "rank.bootstrap=100", "rank.proxies=[length_distortion]"]
    cfg = load_config(yaml_path, [f"output_dir={tmp_path}", f"data.root={tiny_digits}"])
    space = space_from_config(cfg)
    rng = __import__("numpy").random.default_rng(0)
    archs = list({space.key(a): a for a in (space.sample(rng) for _ in range(12))}.values())[:4]
    rows = [{"arch": a, "acc": float(space.cost(a, 10).params)} for a in archs]
    table = write_table(tmp_path / "gt.json", rows)
    assert cli_main([*base, f"output_dir={tmp_path / 'run'}", "--ground-truth", str(table)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["kendall_tau"]["acc"]["params"] == pytest.approx(1.0)
    assert summary["scores"] == ["length_distortion", "params", "macs"]
    assert cli_main([*base, f"output_dir={tmp_path / 'no'}", "--ground-truth", str(table),
                     "supernet.checkpoint=x.pth"]) == 2
    assert "has no superformer" in capsys.readouterr().err
