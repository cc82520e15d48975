"""Does a data set tell architectures apart? Trained accuracy spread between architectures vs seeds.

Draws `--archs` architectures of the config's space, one per MACs bin (bins evenly spaced in
log MACs between the space's cheapest and costliest architecture, so that small and large ones,
both patch sizes and every depth take part; fixed `--arch-seed`), and trains each from scratch
with `--seeds` seeds (`retrain.seed=S`) at the config's fixed retrain budget, through the real
command line: `python -m vitas retrain -c CONFIG --arch JSON output_dir=RUN retrain.seed=S`, one
process at a time, one thread (OMP_NUM_THREADS=1). Every run is cached in its folder (skipped
when its `retrain/summary.json` exists), so the study resumes where it stopped.

Reports, and writes under `--name` into bench/results/dataset_spread.json (other names kept):
every run's val top-1 and time (wall and CPU seconds), per-architecture mean and std, the
variance between architecture means, the pooled within-architecture (seed) variance, their ratio
(aim >= 4), the between-architecture variance component (the means' variance less the part that
seed noise puts into it) over the seed variance, a one-way ANOVA, the range of the architecture
means (aim >= 15 points) and Spearman's rho of mean accuracy against MACs.

Run against a frozen copy of the code (see docs/FIDELITY.md), e.g.
  PYTHONPATH=/work/snap-pkgs nice -n 10 nohup python /work/snap/bench/dataset_spread.py \
      --name counting --config yamls/fidelity-counting.yaml --dataset counting \
      --data runs/dataset-spread/data-counting --work runs/dataset-spread \
      --results bench/results/dataset_spread.json > spread.log &
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from vitas.core.checkpoint import write_json
from vitas.core.config import load_config
from vitas.supernet.space import space_from_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "dataset_spread.json"
AIM_RATIO, AIM_RANGE = 4.0, 15.0


def draw_archs(config: Path, count: int, seed: int) -> list[dict]:
    """One architecture per MACs bin, `count` bins evenly spaced in log MACs over the space."""
    cfg = load_config(config)
    space = space_from_config(cfg)
    classes = cfg.data.num_classes

    def cost(arch: dict) -> Any:
        return space.cost(arch, classes)

    lo, hi = space.cost_span(cost)["macs"]
    edges = np.geomspace(lo, hi, count + 1)
    rng = np.random.default_rng(seed)
    archs = []
    for a, b in zip(edges[:-1], edges[1:]):
        arch = space.sample_in_range(rng, cost, macs=(int(np.floor(a)), int(np.ceil(b))),
                                     max_tries=20000)
        c = cost(arch)
        archs.append({"arch": arch, "macs": c.macs, "params": c.params})
    return archs


def cpu_of_children() -> float:
    """User + system CPU seconds of the finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def vitas(args: list[str], log: Path) -> tuple[float, float]:
    """Run `python -m vitas ARGS` on one thread, output to `log`; (wall, CPU) seconds.

    It runs in the log's folder: in a checkout's root, `-m vitas` would import that checkout's
    `vitas/` instead of the frozen copy on PYTHONPATH."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cpu, start = cpu_of_children(), time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "vitas", *args], stdout=out,
                              stderr=subprocess.STDOUT, env=env, cwd=log.parent, check=False)
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise SystemExit(f"vitas {' '.join(args[:2])} failed ({proc.returncode}); see {log}:\n"
                         + "\n".join(tail))
    return time.perf_counter() - start, cpu_of_children() - cpu


def train(config: Path, data: Path, arch: dict, seed: int, run: Path) -> dict:
    """One from-scratch training (cached): val top-1 and the time it took."""
    summary, timing = run / "retrain" / "summary.json", run / "timing.json"
    if not summary.is_file():
        run.mkdir(parents=True, exist_ok=True)
        wall, cpu = vitas(["retrain", "-c", str(config), "--arch", json.dumps(arch),
                           f"output_dir={run}", f"retrain.seed={seed}", f"data.root={data}",
                           "data.workers=0"], run / "log.txt")
        write_json({"wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1)}, timing)
    result = json.loads(summary.read_text())
    return {"top1": result["top1"], "train_seconds": result["train_seconds"],
            **json.loads(timing.read_text())}


def spread(runs: list[dict], seeds: int) -> dict:
    """Between-architecture and seed variance of val top-1, and the aims."""
    ids = sorted({r["arch_id"] for r in runs})
    groups = [[r["top1"] for r in runs if r["arch_id"] == i] for i in ids]
    means = np.array([np.mean(g) for g in groups])
    between = float(np.var(means, ddof=1))
    within = float(np.mean([np.var(g, ddof=1) for g in groups]))  # pooled: equal group sizes
    anova = stats.f_oneway(*groups)
    return {
        "between_arch_variance": round(between, 3),
        "within_arch_variance": round(within, 3),
        "ratio": round(between / within, 2),
        "component_ratio": round((between - within / seeds) / within, 2),
        "range": round(float(means.max() - means.min()), 2),
        "anova_F": round(float(anova.statistic), 1), "anova_p": float(anova.pvalue),
        "aims": {"ratio>=4": between / within >= AIM_RATIO,
                 "range>=15": float(means.max() - means.min()) >= AIM_RANGE},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="key of this study in the results file")
    parser.add_argument("--config", type=Path, required=True, help="space + retrain budget YAML")
    parser.add_argument("--dataset", required=True, help="`vitas data` generator of --data")
    parser.add_argument("--data", type=Path, required=True, help="data folder (made if missing)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "dataset-spread",
                        help="cache of the runs (default runs/dataset-spread)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON file of all studies")
    parser.add_argument("--archs", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--arch-seed", type=int, default=0)
    args = parser.parse_args()
    config, data = args.config.resolve(), args.data.resolve()
    work = (args.work / args.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    data_time = None
    if not (data / "train").is_dir():
        wall, cpu = vitas(["data", args.dataset, str(data), "--seed", "0"], work / "data.log")
        data_time = {"wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1)}
        print(f"data: {data} in {wall:.0f} s ({cpu:.0f} CPU s)", flush=True)

    archs = draw_archs(config, args.archs, args.arch_seed)
    runs = []
    for i, entry in enumerate(archs):
        arch_id = f"a{i:02d}-" + hashlib.sha1(json.dumps(entry["arch"], sort_keys=True)
                                              .encode()).hexdigest()[:8]
        for seed in range(args.seeds):
            result = train(config, data, entry["arch"], seed, work / f"{arch_id}-s{seed}")
            runs.append({"arch_id": arch_id, "seed": seed, **entry, **result})
            print(f"{arch_id} seed {seed}: top1 {result['top1']:.2f}  macs {entry['macs']:,}  "
                  f"{result['wall_seconds']:.0f} s wall, {result['cpu_seconds']:.0f} CPU s",
                  flush=True)

    per_arch = []
    for arch_id in dict.fromkeys(r["arch_id"] for r in runs):
        rs = [r for r in runs if r["arch_id"] == arch_id]
        top1 = [r["top1"] for r in rs]
        per_arch.append({"arch_id": arch_id, "arch": rs[0]["arch"], "macs": rs[0]["macs"],
                         "params": rs[0]["params"], "top1": top1,
                         "mean": round(float(np.mean(top1)), 2),
                         "std": round(float(np.std(top1, ddof=1)), 2),
                         "cpu_seconds": round(float(np.mean([r["cpu_seconds"] for r in rs])), 1),
                         "wall_seconds": round(float(np.mean([r["wall_seconds"] for r in rs])), 1)})
    summary = spread(runs, args.seeds)
    summary["spearman_mean_vs_macs"] = round(float(stats.spearmanr(
        [a["macs"] for a in per_arch], [a["mean"] for a in per_arch]).statistic), 3)
    result = {"config": str(args.config), "dataset": args.dataset, "archs": args.archs,
              "seeds": args.seeds, "arch_seed": args.arch_seed, "summary": summary,
              "per_arch": per_arch, "runs": runs, "data_time": data_time,
              "run_cpu_seconds": round(sum(r["cpu_seconds"] for r in runs), 1),
              "run_wall_seconds": round(sum(r["wall_seconds"] for r in runs), 1),
              "study_wall_seconds": round(time.perf_counter() - start, 1)}
    everything = json.loads(args.results.read_text()) if args.results.is_file() else {}
    everything[args.name] = result
    write_json(everything, args.results)

    print("\n| arch | patch | depth | embed | MACs | top-1 per seed | mean | std | CPU s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for a in sorted(per_arch, key=lambda a: a["macs"]):
        print(f"| {a['arch_id'][:3]} | {a['arch']['patch_size']} | {a['arch']['depth']} | "
              f"{a['arch']['embed_dim']} | {a['macs']:,} | "
              f"{', '.join(f'{t:.1f}' for t in a['top1'])} | {a['mean']:.1f} | {a['std']:.2f} | "
              f"{a['cpu_seconds']:.0f} |")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
