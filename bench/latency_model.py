"""Latency models against measured latency: held-out error of the lookup table and the regression,
and how well each ranks architectures by speed, beside MACs and parameters.

Per space, on this CPU: every part of the space, `--samples` architectures to fit on and
`--holdout` further ones are timed together, in turn (`measure_for_model`: rounds interleave all
models, so load from other processes shifts them alike), on one thread with the CPU clock (steady
on a shared machine). Both predictors are fitted to the same samples; on the held-out
architectures the bench reports median / 90th-percentile / largest absolute percentage error and
Kendall tau / Spearman rho against measured latency, with those of MACs and parameters (the
reason the feature exists: equal MACs, different speed), over the whole space and among `--band`
architectures inside a search budget's MACs band (where a search chooses; there MACs hardly
separate them). Load averages are recorded with every
measurement: rerun on a quiet machine for numbers that hold. Measurements are cached under
runs/bench-latency/ (resumable). Writes bench/results/latency_model.json.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from scipy import stats

from vitas.core.config import load_config
from vitas.inference.latency import LatencySetting, ape_stats, fit_latency_model, measure_for_model, spread_archs
from vitas.inference.latency.measure import load_average
from vitas.supernet.complexity import arch_cost
from vitas.supernet.space import SearchSpace

ROOT = Path(__file__).resolve().parents[1]
SPACES = {  # name: (yaml, overrides, classes, MACs band of a search budget); batch 1
    "demo-digits": ("yamls/demo-digits.yaml", [], 10, (1_500_000, 2_000_000)),
    # 224 px (patches 14/16/32 need it); the YAML's 1.3G budget band
    "vitas-deit": ("yamls/vitas-deit-1.3G.yaml", [], 1000, (1_100_000_000, 1_300_000_000)),
    # 112 px to keep it short; the YAML's 1.0-1.4G band at 224 px scaled to about a quarter
    "autoformer-T-112": ("yamls/autoformer-T.yaml", ["space.img_size=112"], 1000, (300_000_000, 350_000_000)),
}


def rank_corr(x: list[float], y: list[float]) -> dict:
    """Kendall tau and Spearman rho of `x` against `y`."""
    return {"kendall_tau": float(stats.kendalltau(x, y).statistic),
            "spearman_rho": float(stats.spearmanr(x, y).statistic)}


def band_archs(space: SearchSpace, classes: int, band: tuple[int, int], n: int, exclude: set[str]) -> list[dict]:
    """`n` distinct architectures drawn uniformly among those with MACs in `band`."""
    rng, archs = random.Random(2), []
    while len(archs) < n:
        arch = space.sample_in_range(rng, lambda a: arch_cost(a, space, classes), macs=band)
        if space.key(arch) not in exclude:
            exclude.add(space.key(arch))
            archs.append(arch)
    return archs


def run_space(name: str, setting: LatencySetting, samples: int, holdout: int, band_n: int, cache_dir: Path) -> dict:
    yaml, overrides, classes, band = SPACES[name]
    cfg = load_config(ROOT / yaml, overrides)
    space = SearchSpace(cfg.space)
    started = time.time()
    fit_and_held = spread_archs(space, classes, samples, 0)
    fit_and_held += spread_archs(space, classes, holdout, 1, exclude=map(space.key, fit_and_held))
    in_band = band_archs(space, classes, band, band_n, {space.key(a) for a in fit_and_held})
    m = measure_for_model(space, classes, setting, parts=True, samples=samples, holdout=holdout, seed=0,
                          cache=cache_dir / f"{name}.jsonl", extra=in_band)
    models = {p: fit_latency_model(p, m.fit, m.table, setting, m.machine, space, classes)
              for p in ("lut", "regression")}
    measured = [s["median_ms"] for s in m.holdout]
    costs = [arch_cost(s["arch"], space, classes) for s in m.holdout]
    predicted = {p: [model.predict(s["arch"]) for s in m.holdout] for p, model in models.items()}
    loads = [s["loadavg"][0] for s in m.fit + m.holdout + m.extra if s["loadavg"]]
    band_measured = [s["median_ms"] for s in m.extra]
    band_costs = [arch_cost(s["arch"], space, classes) for s in m.extra]
    band_predicted = {p: [model.predict(s["arch"]) for s in m.extra] for p, model in models.items()}
    return {
        "space": name, "yaml": yaml, "overrides": overrides, "img_size": cfg.space.img_size,
        "num_classes": classes, "machine": m.machine, "parts": len(m.table), "fit_archs": len(m.fit), "holdout_archs": len(m.holdout),
        "seconds": round(time.time() - started, 1),
        "loadavg_1min_during": {"mean": statistics.fmean(loads), "max": max(loads)} if loads else None,
        "predictors": {p: {"fit": models[p].fit, "holdout": ape_stats(predicted[p], measured),
                           "rank_vs_measured": rank_corr(predicted[p], measured),
                           **({"calibration": models[p].calibration} if p == "lut" else {"coef": models[p].coef})}
                       for p in models},
        "macs_rank_vs_measured": rank_corr([c.macs for c in costs], measured),
        "params_rank_vs_measured": rank_corr([c.params for c in costs], measured),
        "budget_band": {
            "macs": list(band), "archs": len(m.extra),
            "measured_ms_range": [min(band_measured), max(band_measured)] if band_measured else None,
            "predictors": {p: {"error": ape_stats(band_predicted[p], band_measured),
                               "rank_vs_measured": rank_corr(band_predicted[p], band_measured)} for p in models},
            "macs_rank_vs_measured": rank_corr([c.macs for c in band_costs], band_measured),
            "params_rank_vs_measured": rank_corr([c.params for c in band_costs], band_measured),
        },
        "holdout": [{"arch": s["arch"], "macs": c.macs, "params": c.params, "measured_ms": s["median_ms"],
                     "iqr_ms": s["iqr_ms"], **{f"{p}_ms": predicted[p][i] for p in models}}
                    for i, (s, c) in enumerate(zip(m.holdout, costs))],
        "band": [{"arch": s["arch"], "macs": c.macs, "params": c.params, "measured_ms": s["median_ms"],
                  "iqr_ms": s["iqr_ms"], **{f"{p}_ms": band_predicted[p][i] for p in models}}
                 for i, (s, c) in enumerate(zip(m.extra, band_costs))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spaces", default="demo-digits,vitas-deit", help=f"comma-separated, of {list(SPACES)}")
    parser.add_argument("--samples", type=int, default=40, help="architectures the predictors are fitted to")
    parser.add_argument("--holdout", type=int, default=30, help="held-out architectures they are checked on")
    parser.add_argument("--band", type=int, default=30, help="architectures inside each space's budget band")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=4, help="timed calls per model and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per model and round")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "bench-latency")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latency_model.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    setting = LatencySetting(device="cpu", batch_size=1, precision="fp32", threads=1, backend="eager",
                             clock="cpu", warmup=args.warmup, repeats=args.repeats, rounds=args.rounds)
    load_start = load_average()
    results = []
    for name in args.spaces.split(","):
        r = run_space(name, setting, args.samples, args.holdout, args.band, args.cache)
        results.append(r)
        for p, v in r["predictors"].items():
            h, c = v["holdout"], v["rank_vs_measured"]
            print(f"{name:18s} {p:10s} held-out APE median {h['median_ape']:5.2f}% p90 {h['p90_ape']:5.2f}% "
                  f"max {h['max_ape']:5.2f}%  tau {c['kendall_tau']:.3f} rho {c['spearman_rho']:.3f}", flush=True)
        c = r["macs_rank_vs_measured"]
        print(f"{name:18s} {'MACs':10s} tau {c['kendall_tau']:.3f} rho {c['spearman_rho']:.3f}   "
              f"(load during: {r['loadavg_1min_during']})", flush=True)
        b = r["budget_band"]
        for p, v in b["predictors"].items():
            e, c = v["error"], v["rank_vs_measured"]
            print(f"{name:18s} band {p:10s} APE median {e['median_ape']:5.2f}% p90 {e['p90_ape']:5.2f}%  "
                  f"tau {c['kendall_tau']:.3f} rho {c['spearman_rho']:.3f}", flush=True)
        c = b["macs_rank_vs_measured"]
        print(f"{name:18s} band {'MACs':10s} tau {c['kendall_tau']:.3f} rho {c['spearman_rho']:.3f}  "
              f"(measured {b['measured_ms_range']} ms)", flush=True)
    payload = {"setting": vars(setting), "torch": torch.__version__, "loadavg_start": load_start,
               "loadavg_end": load_average(), "aim": "held-out median APE < 5% on this CPU",
               "note": "measured on a 2-core machine shared with other jobs; rerun on a quiet machine",
               "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps({r["space"]: {p: round(v["holdout"]["median_ape"], 2) for p, v in r["predictors"].items()}
                      for r in results}))


if __name__ == "__main__":
    main()
