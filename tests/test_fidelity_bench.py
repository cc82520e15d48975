"""bench/fidelity.py on a toy size: the whole study (ground truth over seeds, superformers per
variant, rankings with intervals, search against random, stability) runs and reports."""
from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import kendalltau

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.long
@pytest.mark.timeout(1200)
def test_the_fidelity_study_runs_on_a_toy_size(tiny_digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "fidelity.json"
    cmd = [sys.executable, "bench/fidelity.py", "--toy", "--data", str(tiny_digits), "--work",
           str(tmp_path / "work"), "--out", str(out), "--no-doc", "--archs", "3", "--seeds", "2",
           "--random", "2", "--variants", "left-uniform,cyclic-sandwich"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["variants"]) == {"left-uniform", "cyclic-sandwich"}
    for variant in result["variants"].values():
        per_score = variant["rank"]["results"]["trained_top1"]
        assert {"inherited_top1", "params", "macs", "length_distortion"} <= set(per_score)
        assert set(per_score["inherited_top1"]["kendall"]) >= {"estimate", "low", "high", "n"}
        assert variant["supernet"]["steps"] > 0 and "margin" in variant["end_to_end"]
        for gene in ("patch_size", "embed_dim"):  # every architecture, by patch size and by embed width
            assert sum(p["archs"] for p in variant[f"by_{gene}"].values()) == 3
    runs = json.loads((tmp_path / "work" / "ground_truth.json").read_text())
    assert len(runs) == 3 and all(len(r["seed_runs"]) == 2 for r in runs)
    stable = result["stability"]["cyclic-sandwich"]
    assert set(result["stability"]) == {"cyclic-sandwich"} and "tau_between_seeds" in stable
    # the second seed's inherited top-1, in the table's order, as the first seed's is
    assert len(stable["inherited_top1_seed1"]) == len(result["variants"]["cyclic-sandwich"]["inherited_top1"])
    assert None not in stable["inherited_top1_seed1"]
    ranked = tmp_path / "work" / "supernets" / "cyclic-sandwich-seed1" / "rank-gt" / "rank" / "ranking.csv"
    with ranked.open() as f:
        seed1 = {json.dumps(json.loads(r["arch"]), sort_keys=True): float(r["inherited_top1"])
                 for r in csv.DictReader(f)}
    assert stable["inherited_top1_seed1"] == [seed1[json.dumps(r["arch"], sort_keys=True)] for r in runs]
    assert {"ground truth", "superformers", "ranking", "end to end", "total"} <= set(result["seconds"])
    assert "| inherited, cyclic-sandwich |" in proc.stdout
    assert result["ground_truth_noise"]["archs"] == 3
    assert set(result["variants"]["left-uniform"]["vs_default"]) == {"kendall", "kendall_banded"}
    assert "ground truth itself: seed 0 vs seed 1" in proc.stdout
    # Beside the superformers' searches, the same GA scoring by #params alone, retrained the same way.
    size = result["budget"]["params"]
    folder = tmp_path / "work" / f"search-params-{result['budget']['macs'][0]}-{result['budget']['macs'][1]}"
    searched = json.loads((folder / "search" / "arch.json").read_text())
    assert size["arch"] == searched and len(size["top1"]) == 2 and "margin" in size
    assert "scoring by #params alone" in proc.stdout
    # A second run recomputes nothing but what is new: a scoring variant, which ranks (and searches
    # with) the cyclic-sandwich superformer after fine-tuning each subnet, and trains no superformer.
    again = subprocess.run([*cmd[:-1], "left-uniform,cyclic-sandwich,cyclic-sandwich-ft50", "--end-to-end",
                            "all"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    variants = json.loads(out.read_text())["variants"]
    assert list(variants) == ["left-uniform", "cyclic-sandwich", "cyclic-sandwich-ft50"]
    assert variants["cyclic-sandwich-ft50"]["trained_as"] == "cyclic-sandwich"
    assert sorted(p.name for p in (tmp_path / "work" / "supernets").iterdir()) == [
        "cyclic-sandwich", "cyclic-sandwich-seed1", "left-uniform"]
    tuned = tmp_path / "work" / "supernets" / "cyclic-sandwich" / "rank-gt-cyclic-sandwich-ft50"
    assert "finetune_steps: 50" in (tuned / "rank" / "config.yaml").read_text()
    assert "margin" in variants["cyclic-sandwich-ft50"]["end_to_end"]
    # --partial trains nothing and ranks the trained superformers against the finished ground truth.
    part = tmp_path / "partial.json"
    proc = subprocess.run([*cmd[:-1], "left-uniform,cyclic-sandwich,cyclic-uniform", "--partial",
                           "--out", str(part)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    partial = json.loads(part.read_text())
    assert partial["partial"] and partial["archs"] == 3 and len(partial["ground_truth"]) == 3
    assert set(partial["variants"]) == {"left-uniform", "cyclic-sandwich"}  # cyclic-uniform never trained
    assert sorted(r["trained_top1"] for r in partial["ground_truth"]) == pytest.approx(
        sorted(r["trained_top1"] for r in runs), abs=1e-3)
    assert "PARTIAL: 3 of 3" in proc.stdout
    # A fresh clone (an empty --work) with the committed results and record: the ground truth and
    # the retrained architectures come from the record, and the variants it does not measure
    # again keep their rows.
    record = json.loads((tmp_path / "fidelity_record.json").read_text())
    assert len(record["ground_truth"]) == 3 and len(record["retrain"]) >= 2 * 2
    # The superformers' folders come along (they hold their rankings and searches), so the run
    # trains nothing unless the record fails.
    shutil.copytree(tmp_path / "work" / "supernets", tmp_path / "clone" / "supernets")
    fresh = subprocess.run([*cmd[:-1], "cyclic-sandwich", "--work", str(tmp_path / "clone")], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert not (tmp_path / "clone" / "ground_truth").exists()
    retrained = {p.name for p in (tmp_path / "clone" / "retrain").glob("*")}
    assert not retrained & set(record["retrain"]), retrained
    merged = json.loads(out.read_text())
    assert list(merged["variants"]) == ["left-uniform", "cyclic-sandwich", "cyclic-sandwich-ft50"]
    assert merged["carried_over"] == ["left-uniform", "cyclic-sandwich-ft50"]
    assert merged["variants"]["left-uniform"] == variants["left-uniform"]  # kept as measured
    assert len(merged["variants"]["cyclic-sandwich"]["inherited_top1"]) == 3
    assert None not in merged["variants"]["cyclic-sandwich"]["inherited_top1"]
    # --rescore trains nothing and ranks every row again from the inherited top-1 it keeps: against
    # the same table it reproduces each row's ranking exactly.
    rescore = [*cmd[:-2], "--work", str(tmp_path / "clone"), "--rescore"]
    superformers = sorted(p.name for p in (tmp_path / "clone" / "supernets").iterdir())
    same = subprocess.run(rescore, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert same.returncode == 0, same.stderr[-3000:]
    again = json.loads(out.read_text())
    assert again["completed"] == "rescored" and list(again["variants"]) == list(merged["variants"])
    for name, row in merged["variants"].items():
        assert again["variants"][name]["rank"]["results"]["trained_top1"]["inherited_top1"] == \
            row["rank"]["results"]["trained_top1"]["inherited_top1"]
    assert again["stability"] == merged["stability"] and again["budget"] == merged["budget"]
    # With a third ground-truth seed asked for, only that seed trains (one run per architecture),
    # the record keeps all three, and every row is ranked against the new means.
    grown = subprocess.run([*rescore, "--truth-seeds", "3", "--stability", "cyclic-sandwich"], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert grown.returncode == 0, grown.stderr[-3000:]
    assert len(list((tmp_path / "clone" / "ground_truth-seed2").glob("rank/ground_truth/*/seed2/summary.json"))) == 3
    assert not (tmp_path / "clone" / "ground_truth").exists()
    assert sorted(p.name for p in (tmp_path / "clone" / "supernets").iterdir()) == superformers
    truth = json.loads((tmp_path / "fidelity_record.json").read_text())["ground_truth"]
    assert [r["seed_runs"][:2] for r in truth] == [r["seed_runs"] for r in record["ground_truth"]]
    assert all(len(r["seed_runs"]) == 3 for r in truth)
    rescored = json.loads(out.read_text())
    assert rescored["truth_seeds"] == 3 and rescored["rescored"]["from_truth_seeds"] == 2
    means = [float(np.mean(r["seed_runs"])) for r in truth]
    # --stability: the second superformer (found in the cache, not trained again) ranked against the
    # new table, its tau to the first seed's kept scores
    stable = rescored["stability"]["cyclic-sandwich"]
    ranked = list((tmp_path / "clone" / "supernets" / "cyclic-sandwich-seed1").glob("rank-gt-*/rank/ranking.csv"))
    assert len(ranked) == 1 and stable["inherited_top1_seed1"] == merged["stability"]["cyclic-sandwich"]["inherited_top1_seed1"]
    first = rescored["variants"]["cyclic-sandwich"]["inherited_top1"]
    expected = kendalltau(first, stable["inherited_top1_seed1"]).statistic
    assert stable["tau_between_seeds"] == pytest.approx(expected, nan_ok=True)
    table = json.loads((tmp_path / "clone" / "ground_truth.json").read_text())
    assert [r["trained_top1"] for r in table] == pytest.approx(means)
    for row in rescored["variants"].values():
        tau = row["rank"]["results"]["trained_top1"]["inherited_top1"]["kendall"]["estimate"]
        expected = kendalltau(row["inherited_top1"], means).statistic  # nan: a toy superformer's ties
        assert tau == (None if np.isnan(expected) else pytest.approx(expected))
    # A run without --truth-seeds takes every seed the record has.
    assert subprocess.run(rescore, cwd=ROOT, capture_output=True, text=True, timeout=600).returncode == 0
    assert json.loads(out.read_text())["ground_truth_sha1"] == rescored["ground_truth_sha1"]


def test_each_variant_is_compared_with_the_default_paired_over_the_same_architectures() -> None:
    spec = importlib.util.spec_from_file_location("fidelity_study", ROOT / "bench" / "fidelity.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    target = np.linspace(50.0, 80.0, 24)
    noisy = list(target + np.random.default_rng(0).normal(0.0, 8.0, 24))
    result = {"variants": {study.DEFAULT: {"inherited_top1": noisy},
                           "exact": {"inherited_top1": list(target + 1.0)},
                           "same": {"inherited_top1": list(noisy)},
                           "unfinished": {"inherited_top1": [*noisy[:-1], None]}}}
    study.versus_default(result, [{"trained_top1": float(t)} for t in target], macs=list(range(24)),
                         bands=4, n_resamples=200)
    exact = result["variants"]["exact"]["vs_default"]
    assert exact["kendall"]["estimate"] == pytest.approx(1.0 - kendalltau(noisy, target).statistic)
    assert exact["kendall"]["low"] > 0 and exact["kendall_banded"]["low"] > 0
    assert study._verdict(exact) == "better globally and better within bands."
    same = result["variants"]["same"]["vs_default"]["kendall"]
    assert same["estimate"] == same["low"] == same["high"] == 0.0
    assert study._verdict(result["variants"]["same"]["vs_default"]) == "neither interval excludes zero."
    assert "vs_default" not in result["variants"]["unfinished"]  # a variant short of an architecture
    assert "vs_default" not in result["variants"][study.DEFAULT]


def test_carried_rows_keep_the_seconds_of_the_run_that_measured_them() -> None:
    """Over successive runs that each measure one more variant, a carried row keeps its
    superformer's seconds from the run that trained it, not from a superformer of the same name
    the cache holds later."""
    spec = importlib.util.spec_from_file_location("fidelity_carry", ROOT / "bench" / "fidelity.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    first = {"variants": {"a": {}, "b": {}}, "work_seconds": {"superformers": {"a": 10.0, "a-seed1": 11.0, "b": 20.0}}}
    second = {"variants": {"c": {}}}
    study.carry_variants(second, first, ["c"])
    second["work_seconds"] = {"superformers": {"a": 99.0, "c": 30.0}}  # `a` trained again since
    assert second["carried_over"] == ["a", "b"]
    assert second["carried_work_seconds"] == {"a": 10.0, "a-seed1": 11.0, "b": 20.0}
    third = {"variants": {"d": {}}}
    study.carry_variants(third, second, ["d"])
    assert third["carried_work_seconds"] == {"a": 10.0, "a-seed1": 11.0, "b": 20.0, "c": 30.0}


def test_results_are_rescored_only_on_the_architectures_they_were_measured_on() -> None:
    """A table grown by seeds keeps its architectures and first seeds: its old results can be ranked
    again. Other architectures, another order or changed first seeds cannot."""
    spec = importlib.util.spec_from_file_location("fidelity_same", ROOT / "bench" / "fidelity.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    truth = [{"arch": {"depth": d}, "seed_runs": [50.0 + d, 51.0 + d, 49.0 + d]} for d in range(4)]
    first = [{**r, "seed_runs": r["seed_runs"][:2]} for r in truth]
    old = {"variants": {"a": {}}, "archs": 4, "seeds": 2, "ground_truth_sha1": study.truth_sha1(first)}
    assert study.same_architectures(old, truth)
    assert study.same_architectures({**old, "truth_seeds": 3, "ground_truth_sha1": study.truth_sha1(truth)}, truth)
    assert not study.same_architectures(old, truth[::-1])
    assert not study.same_architectures({**old, "archs": 3}, truth[:3])
    changed = [{**truth[0], "seed_runs": [0.0, 51.0, 49.0]}, *truth[1:]]
    assert not study.same_architectures(old, changed)
    assert not study.same_architectures({**old, "partial": True}, truth)
