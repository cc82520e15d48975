"""How much of inherited accuracy's ranking error is the noise of the few images it is scored on?

The fidelity study scores each architecture on the superformer's hold-out: 50 images per class,
300 in all on the counting set. Two architectures a point or two apart there differ by a handful of
images, while the ground truth's middle is ordered by gaps of that size. This bench separates that
noise from the superformer's own error, for each superformer the fidelity study trained:

1. every ground-truth architecture's prediction on each image of (a) the superformer's own
   hold-out (its top-1 must equal the study's `inherited_top1`, checked) and (b) a fresh set from
   the same generator that no run has seen (`vitas data counting --seed S`, its val/ images);
2. from the per-image correctness, Kendall tau (global and within the study's MACs bands) against
   the ground truth of scoring sets of n images, `--draws` class-balanced draws from the fresh set
   for each n: how tau grows with the scoring set, and where the hold-out lands among draws of its
   own size.

Results: `bench/results/holdout_noise.json` (a section of docs/FIDELITY.md reads it). It needs the
fidelity study's cache (`--work`: ground_truth.json and supernets/<variant>/).

    python bench/holdout_noise.py --config yamls/fidelity-counting.yaml \\
        --data runs/dataset-spread/data-counting --work runs/fidelity \\
        --variants cyclic-sandwich-alpha,cyclic-sandwich-bins-distill
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from vitas.core.config import Config, load_config
from vitas.core.data import build_dataset, create_loader, num_classes
from vitas.search.ranking.stats import banded_estimate, estimate
from vitas.search.scoring.accuracy import holdout_batches, sides
from vitas.supernet.checkpoint import read_superformer
from vitas.supernet.space import space_from_config

import fidelity  # bench/fidelity.py: the study's variants and their overrides

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "holdout_noise.json"
Batches = list[tuple[torch.Tensor, torch.Tensor]]


def correct_matrix(cfg: Config, archs: list[dict], batches: Batches) -> np.ndarray:
    """(architectures x images) booleans: is the superformer's top-1 right with each arch active."""
    if sides(cfg) != ("left",):
        raise SystemExit("a bilateral superformer scores two passes; this bench reads one")
    model, _ = read_superformer(cfg, space_from_config(cfg), num_classes(cfg.data))
    target = torch.cat([t for _, t in batches])
    rows = []
    with torch.inference_mode():
        for arch in archs:
            model.set_active(arch)
            pred = torch.cat([model(x).argmax(dim=1) for x, _ in batches])
            rows.append((pred == target).numpy())
    return np.stack(rows)


def image_batches(cfg: Config, root: Path, batch_size: int = 500) -> Batches:
    """The val/ images of another data folder of the same classes, decoded once, in batches."""
    data = dataclasses.replace(cfg.data, root=str(root))
    loader = create_loader(build_dataset(data, "val", cfg.space.img_size, is_training=False),
                           batch_size=batch_size, shuffle=False, workers=0, distributed=False)
    return [(x, t) for x, t in loader]


def balanced_draws(labels: np.ndarray, n: int, draws: int, seed: int) -> np.ndarray:
    """(draws x n) image indices, n / classes of each class per draw, without replacement."""
    classes = np.unique(labels)
    per = n // len(classes)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == c) for c in classes]
    if per > min(len(m) for m in members):
        raise SystemExit(f"{n} images need {per} per class; the fresh set has {min(len(m) for m in members)}")
    return np.stack([np.concatenate([rng.choice(m, per, replace=False) for m in members]) for _ in range(draws)])


def taus(correct: np.ndarray, truth: np.ndarray, macs: np.ndarray, bands: int) -> tuple[Optional[float], Optional[float]]:
    """Kendall tau of the archs' accuracy on these images against the truth, global and banded."""
    acc = correct.mean(axis=1)
    return estimate(acc, truth), banded_estimate(acc, truth, macs, bands)


def summary(values: list[Optional[float]]) -> dict:
    """Median, mean, 5th and 95th percentile of the defined values (a draw can tie every arch)."""
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    return {"median": float(np.median(v)), "mean": float(v.mean()), "p05": float(np.quantile(v, 0.05)),
            "p95": float(np.quantile(v, 0.95)), "draws": int(len(v))}


def measure(study: "fidelity.Study", name: str, rows: list[dict], *, fresh: Batches, macs: np.ndarray,
            bands: int, sizes: list[int], draws: int, table_row: Optional[list]) -> dict:
    """One superformer (`name`: a variant, or `VARIANT-seedN` for another seed of it): its
    hold-out's tau, the `fresh` images' (decoded once for all superformers), and tau over draws
    of each size; with the results table's row of the variant, how closely this superformer's
    hold-out accuracies rank like that row's (the same superformer gives 1; one trained again, on
    this or another machine, less)."""
    run = study.work / "supernets" / name
    variant = re.sub(r"-seed\d+$", "", name)
    cfg = load_config(study.config, [*study.base, *study.overrides(variant),
                                     f"supernet.checkpoint={run / 'supernet' / 'last.pth'}"])
    archs = [r["arch"] for r in rows]
    truth = np.array([r["trained_top1"] for r in rows])
    held = correct_matrix(cfg, archs, holdout_batches(cfg, 500))
    recorded = [float(r["inherited_top1"]) for r in fidelity._csv(run / "rank-gt" / "rank" / "ranking.csv")]
    if not np.allclose(100 * held.mean(axis=1), recorded, atol=1e-6):
        raise SystemExit(f"{name}: the hold-out top-1 here differs from the study's inherited_top1")
    labels = torch.cat([t for _, t in fresh]).numpy()
    new = correct_matrix(cfg, archs, fresh)
    out = {"holdout_images": int(held.shape[1]), "fresh_images": int(new.shape[1]),
           "train_seconds": json.loads((run / "supernet" / "summary.json").read_text())["train_seconds"],
           "tau_vs_table_row": None if table_row is None else estimate(held.mean(axis=1), table_row)}
    out["holdout"] = dict(zip(("tau", "banded"), taus(held, truth, macs, bands)))
    out["fresh"] = dict(zip(("tau", "banded"), taus(new, truth, macs, bands)))
    out["fresh_top1"] = (100 * new.mean(axis=1)).tolist()
    out["by_size"] = {}
    for n in sizes:
        idx = balanced_draws(labels, n, draws, seed=n)
        pairs = [taus(new[:, i], truth, macs, bands) for i in idx]
        out["by_size"][str(n)] = {"tau": summary([p[0] for p in pairs]), "banded": summary([p[1] for p in pairs])}
        if n == held.shape[1]:
            below = np.mean([p[0] < out["holdout"]["tau"] for p in pairs])
            out["holdout_tau_quantile"] = float(below)  # where the hold-out lands among draws of its size
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="the fidelity study's data folder")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "fidelity", help="the fidelity study's cache")
    parser.add_argument("--variants", required=True,
                        help="comma-separated superformers of the study (VARIANT, or VARIANT-seedN for another seed)")
    parser.add_argument("--fresh", type=Path, default=ROOT / "runs" / "holdout-noise" / "data-counting-seed1",
                        help="unseen images (written with `vitas data counting --seed 1` if missing)")
    parser.add_argument("--fresh-per-class", type=int, default=2000)
    parser.add_argument("--sizes", default="300,1200,3000,6000,12000")
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    study = fidelity.Study(args.config.resolve(), args.work.resolve(), args.data.resolve(), 1, False, [])
    if not (args.fresh / "val").is_dir():
        study.vitas("data", "counting", str(args.fresh.resolve()), "--seed", "1", "--train-per-class", "1",
                    "--val-per-class", str(args.fresh_per_class))
    rows = json.loads((study.work / "ground_truth.json").read_text())
    start = time.time()
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if result.get("ground_truth_sha1") != fidelity.truth_sha1(rows):
        result = {"ground_truth_sha1": fidelity.truth_sha1(rows), "variants": {}}
    result.update({"config": str(args.config), "fresh": {"seed": 1, "per_class": args.fresh_per_class},
                   "draws": args.draws, "ground_truth_noise": fidelity.ground_truth_noise(rows)})
    table = json.loads(fidelity.RESULTS.read_text()) if fidelity.RESULTS.is_file() else {}
    same_table = table.get("ground_truth_sha1") == fidelity.truth_sha1(rows)
    # what every superformer shares: the unseen images (the variants change no transform) and the costs
    fresh = image_batches(load_config(study.config, study.base), args.fresh.resolve())
    _, cost = study.space_and_cost()
    macs = np.array([cost(r["arch"]).macs for r in rows], dtype=np.float64)
    bands = study.rank_settings()["bands"]
    for name in filter(None, args.variants.split(",")):
        row = (table.get("variants", {}).get(name) or {}).get("inherited_top1") if same_table else None
        result["variants"][name] = measure(study, name, rows, fresh=fresh, macs=macs,
                                           bands=bands,
                                           sizes=[int(s) for s in args.sizes.split(",")], draws=args.draws,
                                           table_row=row)
        print(name, json.dumps({k: v for k, v in result["variants"][name].items() if k != "fresh_top1"}))
    result["seconds"] = round(time.time() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fidelity._write(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
