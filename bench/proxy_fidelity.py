"""How well every training-free proxy, #params, MACs and the proxy ensembles rank the 100
AutoFormer-Ti subnets of ViT-Bench-101 (Auto-Prox, AAAI 2024) on its 7 accuracy targets.

Two steps, both resumable:

    nice -n 10 nohup python bench/proxy_fidelity.py compute --variant scratch > scratch.log &
    nice -n 10 nohup python bench/proxy_fidelity.py compute --variant super > super.log &
    python bench/proxy_fidelity.py heads     # optional: is the ranking the same with a 100-way head?
    python bench/proxy_fidelity.py report

`compute` scores each architecture with every proxy of `search.proxies.zoo` but curvature (see
STUDY_NAMES) under the default `proxy.*` settings (5 re-drawn initialisations, 10 angles, 16
images, As-ViT's NTK on the pooled features averaged over the inits) at 224 px (the benchmark's
`MODEL.IMG_SIZE`, patch 16). It runs one initialisation at a time over all architectures and
caches each per-init record in bench/results/proxy_fidelity_values_<variant>.json (rewritten
atomically after each; a rerun continues); `report` averages the inits every architecture has.
Each target is scored on the architecture that was trained for it:
- `scratch` (the six `*_base`/`*_kd` targets, trained from scratch): attention width = embedding
  width (head_dim = embed / heads), no relative positions, mean pooling, as the benchmark's
  `AutoFormerSub`; a plain StaticViT re-drawn whole per init.
- `super` (`imagenet_super`, inherited from an AutoFormer supernet): head_dim 64 and relative
  positions, the subnet of this project's AutoFormer-T superformer (yamls/autoformer-T.yaml).
The proxy batch is 16 digits of `vitas data digits` (no image of CIFAR-100, Flowers, Chaoyang or
ImageNet is available here), resized to 224 px without cropping, with their 10 labels and a
10-way head; the head is not searched, so it is the same for every architecture of a target.
#params and MACs are counted with the head each target was trained with (100, 102, 4, 1000).

`report` computes Kendall tau and Spearman rho with 95% bootstrap intervals of every score
against every target, globally and within 4 equal-count MACs bands (`search.ranking.stats`),
the difference to #params with a paired interval, top-10 overlap and regret, for every proxy,
As-ViT's L^E + kappa rank sum, and ensembles fixed before any proxy value was seen: `ensemble_rank`
(equal-weight rank aggregation of the seven proxies with a published direction, nothing fitted)
and three ridges fitted per target with 10-fold cross-validation, so that each architecture is
scored by a model that never saw it: on #params and MACs (`cost_ridge`), on the seven proxies
(`proxy_ridge`), on both (`ensemble_ridge`). Writes bench/results/proxy_fidelity.json and prints
the tables (BENCH_RESAMPLES bootstrap resamples, default 2000).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from vitas.core.checkpoint import write_json
from vitas.core.config import load_config
from vitas.core.data import write_digits
from vitas.search.proxies import ensemble
from vitas.search.proxies.measures import finite_mean, proxy_batch
from vitas.search.proxies.zoo import NAMES, PROXIES, architecture_cost, compute_proxies
from vitas.search.ranking import stats
from vitas.supernet.complexity import arch_cost
from vitas.supernet.model import Superformer
from vitas.supernet.space import space_from_config
from vitas.supernet.static import StaticViT

REPO = Path(__file__).resolve().parents[1]
# The benchmark file lives in the project's shared data beside the checkout (never in a clone).
DATA = REPO.parent / "shared" / "data" / "vitbench101_autoformer_100.json"
RESULTS = REPO / "bench" / "results"
IMG = 224
CLASSES = {"c100": 100, "flower": 102, "chaoyang": 4, "imagenet": 1000}  # heads the targets trained
PROXY_CLASSES = 10  # the digits' classes: the head the proxies are taken with
TARGETS = ("c100_base", "c100_kd", "flower_base", "flower_kd", "chaoyang_base", "chaoyang_kd", "imagenet_super")
# Fixed before any result was seen: the zero-fit ensemble takes every proxy with a published
# better-direction (not curvature, whose direction is assumed, nor the two cost baselines).
RANK_NAMES = ("length_distortion", "ntk_condition", "dss", "zico", "snip", "synflow", "nwot")
# Fitted (10-fold cross-validated) ridges: on the cost baselines alone, on the proxies alone, on
# both; the first tells how much of a fitted ensemble's gain a fit of #params and MACs gives.
RIDGES = {"cost_ridge": ("params", "macs"), "proxy_ridge": RANK_NAMES, "ensemble_ridge": RANK_NAMES + ("params", "macs")}
BANDS, FOLDS, TOP_K = 4, 10, 10
# Curvature is left out: its float64 pass would add a third to the study's CPU time, it is not a
# search proxy, and As-ViT found no use for it.
STUDY_NAMES = tuple(n for n in NAMES if n != "curvature")
RESAMPLES = int(os.environ.get("BENCH_RESAMPLES", "2000"))
log = logging.getLogger("proxy_fidelity")


def target_variant(target: str) -> str:
    """`super` for the supernet-inherited target, `scratch` for the ones trained from scratch."""
    return "super" if target == "imagenet_super" else "scratch"


def scratch_arch(arch: dict) -> dict:
    """The benchmark's from-scratch model: attention width = embedding width in every layer."""
    return dict(arch, attn_dim=[arch["embed_dim"]] * arch["depth"])


def scratch_model(arch: dict, classes: int) -> StaticViT:
    return StaticViT(scratch_arch(arch), num_classes=classes, img_size=IMG, qkv_bias=True, rel_pos=False,
                     pool="mean").eval()


def setup(digits: Path) -> tuple[Any, torch.Tensor, torch.Tensor, Superformer]:
    """The AutoFormer-T config on the digits at 224 px, the proxy batch and the fresh superformer."""
    if not (digits / "train").is_dir():
        write_digits(digits)
    cfg = load_config(REPO / "yamls" / "autoformer-T.yaml",
                      [f"data.root={digits}", f"data.num_classes={PROXY_CLASSES}", "data.crop_pct=1.0"])
    images, labels = proxy_batch(cfg)
    return cfg, images, labels, Superformer(space_from_config(cfg), PROXY_CLASSES).eval()


def compute(variant: str, cache: Path, digits: Path, rows: list[dict]) -> dict:
    """Every study proxy of every architecture of `variant`, one initialisation at a time over all
    architectures (init-major: an interrupted run still has whole inits), each record written
    to `cache` as it is done. Init k is `compute_proxies` with `proxy.seed + k` and one init,
    exactly init k of the default settings; their mean over inits is the default's value."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    cfg, images, labels, superformer = setup(digits)
    settings = {"variant": variant, "proxy": cfg.proxy.__dict__ | {"names": list(STUDY_NAMES)}, "img_size": IMG,
                "images": "digits (vitas data digits), 16, eval transform at 224 px, crop_pct 1.0",
                "proxy_head_classes": PROXY_CLASSES, "torch": torch.__version__}
    if done.get("settings", settings) != settings:
        raise SystemExit(f"{cache} was computed with other settings: {done['settings']}")
    done["settings"] = settings
    values = done.setdefault("values", {})
    for k in range(cfg.proxy.inits):
        one = dataclasses.replace(cfg.proxy, inits=1, seed=cfg.proxy.seed + k)
        for i, row in enumerate(rows):
            inits = values.setdefault(str(i), [])
            if len(inits) > k:
                continue
            start = time.perf_counter()
            if variant == "super":
                rec = compute_proxies(STUDY_NAMES, superformer, row["arch"], images, one, labels)
            else:
                rec = compute_proxies(STUDY_NAMES, scratch_model(row["arch"], PROXY_CLASSES), None, images, one, labels)
            inits.append(rec | {"seconds": time.perf_counter() - start})
            write_json(done, cache)
            log.info("%s init %d arch %d: %.1f s valid=%s", variant, k, i, inits[-1]["seconds"], rec["valid"])
    return done


def head_check(results: Path, digits: Path, rows: list[dict], archs: int = 20) -> dict:
    """The head-dependent proxies (a loss or the logits in them) of the first `archs` scratch
    architectures at init 0 with CIFAR-100's 100-way head instead of the digits' 10-way one, and
    their Kendall tau with the 10-way values of the cache: does the head's width change the ranking?"""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    rows = rows[:archs]
    cache = json.loads((results / "proxy_fidelity_values_scratch.json").read_text())["values"]
    cfg, images, labels, _ = setup(digits)
    one = dataclasses.replace(cfg.proxy, inits=1)
    names = ("snip", "zico", "synflow")
    wide = [compute_proxies(names, scratch_model(r["arch"], 100), None, images, one, labels) for r in rows]
    out = {"archs": archs, "head": 100, "kendall_with_10_way": {
        n: stats.estimate([w[n] for w in wide], [cache[str(i)][0][n] for i in range(archs)]) for n in names}}
    write_json(out, results / "proxy_fidelity_heads.json")
    log.info("head check: %s", out)
    return out


def mean_record(inits: list[dict], count: int) -> dict:
    """The proxies averaged over the first `count` inits (None when any is None: never averaged in)."""
    rec = {n: finite_mean([r[n] for r in inits[:count]]) for n in STUDY_NAMES}
    return rec | {"seconds": sum(r["seconds"] for r in inits[:count])}


def trained_cost(arch: dict, target: str, spaces: dict[str, Any]) -> tuple[int, int]:
    """(params, MACs) of `arch` as trained for `target`, with that target's head (analytic,
    `supernet.complexity`, in the space of its variant)."""
    variant = target_variant(target)
    arch = arch if variant == "super" else scratch_arch(arch)
    cost = arch_cost(arch, spaces[variant], CLASSES[target.split("_")[0]])
    return cost.params, cost.macs


def cost_spaces(rows: list[dict]) -> dict[str, Any]:
    """The AutoFormer-T space (supernet: relative positions) and the same without them (scratch);
    checks once that the analytic count equals the scratch model's own parameter count."""
    spaces = {"super": space_from_config(load_config(REPO / "yamls" / "autoformer-T.yaml")),
              "scratch": space_from_config(load_config(REPO / "yamls" / "autoformer-T.yaml", ["space.rel_pos=false"]))}
    arch = rows[0]["arch"]
    counted = architecture_cost(scratch_model(arch, 100), None, (3, IMG, IMG))
    assert trained_cost(arch, "c100_base", spaces) == counted, "analytic cost != counted cost"
    return spaces


def scores_of(records: list[dict], acc: list[float]) -> dict[str, np.ndarray]:
    """Every proxy (in its better-direction) and the ensembles, one score per record."""
    out = {n: np.array([np.nan if r[n] is None else PROXIES[n].better * r[n] for r in records], dtype=np.float64)
           for n in STUDY_NAMES}
    out["asvit_rank"] = ensemble.rank_ensemble(["length_distortion", "ntk_condition"]).score(records)
    out["ensemble_rank"] = ensemble.rank_ensemble(RANK_NAMES).score(records)
    for name, features in RIDGES.items():
        out[name] = ensemble.cross_validated_scores(records, acc, features, folds=FOLDS, seed=0)
    return out


def variant_records(cache: dict) -> tuple[list[int], list[dict], int]:
    """(architecture indices, records averaged over the inits every one of them has, that count)."""
    values = {int(i): inits for i, inits in cache["values"].items() if inits}
    count = min(len(v) for v in values.values())
    idx = sorted(values)
    return idx, [mean_record(values[i], count) for i in idx], count


def init_agreement(cache: dict) -> dict[str, Optional[float]]:
    """Kendall tau between each proxy's values at init 0 and at init 1 over the architectures:
    how much of a proxy's ranking is the architecture's and how much the draw's."""
    inits = [v for v in cache["values"].values() if len(v) >= 2]
    return {n: stats.estimate([v[0][n] for v in inits], [v[1][n] for v in inits])
            for n in STUDY_NAMES if PROXIES[n].per_init}


def report(results: Path, rows: list[dict]) -> dict:
    """Statistics of every score against every target (see the module docstring)."""
    caches = {v: json.loads((results / f"proxy_fidelity_values_{v}.json").read_text())
              for v in ("scratch", "super") if (results / f"proxy_fidelity_values_{v}.json").is_file()}
    spaces = cost_spaces(rows)
    out: dict = {"settings": {v: c["settings"] for v, c in caches.items()}, "bands": BANDS, "folds": FOLDS,
                 "bootstrap": {"resamples": RESAMPLES, "confidence": 0.95, "method": "percentile", "seed": 0},
                 "variants": {}, "targets": {}}
    records_of = {}
    for variant, cache in caches.items():
        idx, recs, count = variant_records(cache)
        records_of[variant] = (idx, recs)
        out["variants"][variant] = {
            "archs": len(idx), "inits": count, "seconds_per_arch": float(np.mean([r["seconds"] for r in recs])),
            "invalid": {n: sum(r[n] is None for r in recs) for n in STUDY_NAMES},
            "kendall_with_params": {n: stats.estimate([r[n] for r in recs], [r["params"] for r in recs])
                                    for n in STUDY_NAMES if n != "params"},
            "kendall_init0_init1": init_agreement(cache) if count >= 2 else None}
    for target in TARGETS:
        variant = target_variant(target)
        if variant not in records_of:
            continue
        idx, recs = records_of[variant]
        costs = [trained_cost(rows[i]["arch"], target, spaces) for i in idx]
        records = [dict(r, params=p, macs=m) for r, (p, m) in zip(recs, costs)]
        acc = [rows[i]["acc"][target] for i in idx]
        macs = [m for _, m in costs]
        scores = scores_of(records, acc)
        entry = {"variant": variant, "archs": len(idx), "scores": {}}
        for name, score in scores.items():
            f = stats.fidelity(score, acc, macs, bands=BANDS, top_k=TOP_K, n_resamples=RESAMPLES)
            f["vs_params"] = {k: stats.correlation_difference(score, scores["params"], acc, cost=c, bands=BANDS,
                                                              n_resamples=RESAMPLES)
                              for k, c in (("global", None), ("banded", macs))}
            entry["scores"][name] = f
        out["targets"][target] = entry
        log.info("report: %s done", target)
    heads = results / "proxy_fidelity_heads.json"
    out["head_check"] = json.loads(heads.read_text()) if heads.is_file() else None
    out["summary"] = summary(out["targets"])
    write_json(out, results / "proxy_fidelity.json")
    print(table(out))
    return out


def summary(targets: dict) -> dict:
    """Per score: the targets where its Kendall tau beats #params' globally, within bands, and
    where its global interval's lower end is above 0; `aim_met`: all three on >= 5 targets."""
    out = {}
    for name in next(iter(targets.values()))["scores"] if targets else []:
        where = {"beats_params": [], "beats_params_banded": [], "low_above_0": []}
        for target, entry in targets.items():
            f = entry["scores"][name]
            for key, diff in (("beats_params", f["vs_params"]["global"]), ("beats_params_banded", f["vs_params"]["banded"])):
                if diff["estimate"] is not None and diff["estimate"] > 0:
                    where[key].append(target)
            if (f["kendall"]["low"] or 0) > 0:
                where["low_above_0"].append(target)
        both = [t for t in where["beats_params"] if t in where["beats_params_banded"] and t in where["low_above_0"]]
        out[name] = where | {"all_three": both, "aim_met": len(both) >= 5}
    return out


def _ci(c: dict) -> str:
    if c["estimate"] is None:
        return "invalid" if c.get("degenerate") else "-"
    return f"{c['estimate']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]"


def table(out: dict) -> str:
    """Markdown tables: Kendall tau (global and within MACs bands) of every score on every target."""
    targets = list(out["targets"])
    lines = []
    for key, title in (("kendall", "Kendall tau"), ("kendall_banded", f"Kendall tau within {out['bands']} MACs bands")):
        lines += [f"{title} (95% bootstrap interval)", "",
                  "| score | " + " | ".join(targets) + " |", "| --- |" + " --- |" * len(targets)]
        for name in out["targets"][targets[0]]["scores"] if targets else []:
            cells = [_ci(out["targets"][t]["scores"][name][key]) for t in targets]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["compute", "report", "heads"])
    parser.add_argument("--variant", choices=["scratch", "super"], help="compute: the architectures to score")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the caches and the report")
    parser.add_argument("--benchmark", type=Path, default=DATA,
                        help="the 100 ViT-Bench-101 architectures with their accuracies (JSON)")
    parser.add_argument("--digits", type=Path, default=Path(os.environ.get("VITAS_DIGITS", REPO / "data" / "digits")))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not args.benchmark.is_file():
        parser.error(f"benchmark file not found: {args.benchmark} (give --benchmark)")
    rows = json.loads(args.benchmark.read_text())
    if args.step == "compute":
        if args.variant is None:
            parser.error("compute needs --variant")
        compute(args.variant, args.results / f"proxy_fidelity_values_{args.variant}.json", args.digits, rows)
    elif args.step == "heads":
        head_check(args.results, args.digits, rows)
    else:
        report(args.results, rows)


if __name__ == "__main__":
    main()
