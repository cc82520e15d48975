"""The ranking study (`vitas rank`): how well each score ranks architectures, measured.

Architectures come from a ground-truth table (`rank.ground_truth`, `--ground-truth FILE`: the
user's own runs or a published benchmark; `search.ranking.tables`) or are drawn evenly over the
MACs range (`rank.archs`, one per equal-width bin of `search.macs_min/max` or the space's range).
Scores: the training-free proxies `rank.proxies` (`search.proxies.zoo`), the #params and MACs
baselines, and inherited hold-out top-1 from the superformer checkpoint when there is one
(`rank.inherited`). Targets: the table's accuracy columns (`rank.targets`, all by default) and,
with `rank.ground_truth_epochs` E > 0, `trained_top1`: the mean val top-1 of
`rank.ground_truth_seeds` from-scratch trainings (`search.ranking.ground_truth`), its seed spread
recorded beside it. With neither, inherited accuracy is the target (the proxies against the
superformer, As-ViT's Table 2 setting).

For every score against every target (`search.ranking.stats.fidelity`): Kendall tau and Spearman
rho with 95% bootstrap intervals resampling architectures, the same within `rank.bands`
equal-count MACs bands, top-k overlap, the regret of picking the best-scored architecture, and the
difference to the #params baseline with a paired interval. Scores are signed by their
better-direction first (kappa: lower is better), so a positive tau always means "ranks well".
Writes `rank/ranking.csv`, `rank/correlations.json` and one scatter figure per target with the
baselines' panels beside the scores'.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from vitas.core.checkpoint import atomic_write, write_json
from vitas.core.config import Config
from vitas.core.data import check_data_source, num_classes
from vitas.core.engine import check_recipe
from vitas.core.errors import UserError
from vitas.core.layout import RANK, run_layout
from vitas.core.logs import progress
from vitas.core.stage import Option, Stage, StageContext
from vitas.search.proxies import zoo
from vitas.search.proxies.measures import check_proxy_config, proxy_batch, proxy_superformer
from vitas.search.ranking.ground_truth import ground_truth
from vitas.search.ranking.stats import correlation_difference, fidelity
from vitas.search.ranking.tables import read_ground_truth
from vitas.search.scoring.accuracy import AccuracyScorer
from vitas.supernet.checkpoint import superformer_path
from vitas.supernet.models import create_model
from vitas.supernet.space import SearchSpace, space_from_config

log = logging.getLogger("vitas.rank")

BASELINES = ("params", "macs")
INHERITED, TRAINED = "inherited_top1", "trained_top1"
BETTER = {**{name: p.better for name, p in zoo.PROXIES.items()}, INHERITED: +1}
LOG_AXES = {"ntk_condition", "curvature", "params", "macs", "synflow", "snip", "dss"}


def sample_archs(space: SearchSpace, cfg: Config, n: int) -> list[dict]:
    """`n` distinct architectures, one per equal-width MACs bin of the budget within the space's
    range, seeded by proxy.seed (a bin nobody falls into is drawn from the whole range)."""
    classes = num_classes(cfg.data)
    cost_fn = lambda a: space.cost(a, classes)  # noqa: E731
    space_lo, space_hi = lo, hi = space.cost_span(cost_fn)["macs"]
    lo = max(lo, cfg.search.macs_min) if cfg.search.macs_min is not None else lo
    hi = min(hi, cfg.search.macs_max) if cfg.search.macs_max is not None else hi
    if lo > hi:
        raise UserError(f"no architecture of the space has MACs in [search.macs_min, search.macs_max] "
                        f"(the space spans {space_lo}..{space_hi})")
    rng = np.random.default_rng(cfg.proxy.seed)
    edges = np.linspace(lo, hi, n + 1)
    archs: dict[str, dict] = {}
    for b in range(n):
        for attempt in range(20):
            rng_range = (int(edges[b]), int(edges[b + 1])) if attempt < 10 else (lo, hi)
            try:
                arch = space.sample_in_range(rng, cost_fn, macs=rng_range, max_tries=500)
            except UserError:
                continue
            if space.key(arch) not in archs:
                archs[space.key(arch)] = space.canonical(arch)
                break
    if len(archs) < 2:
        raise UserError(f"found {len(archs)} distinct architecture(s) with MACs in [{lo}, {hi}]; "
                        "a ranking needs at least 2: widen search.macs_min/max")
    if len(archs) < n:
        log.warning("rank: found %d distinct architectures of the %d asked (rank.archs) with "
                    "MACs in [%d, %d]; the space or the range is too small for more", len(archs), n, lo, hi)
    return sorted(archs.values(), key=lambda a: cost_fn(a).macs)


def _has_checkpoint(cfg: Config) -> bool:
    try:
        superformer_path(cfg)
    except UserError:
        return False
    return True


def _inherited(cfg: Config) -> bool:
    return cfg.rank.inherited and cfg.space.kind == "vit" and _has_checkpoint(cfg)


def architectures(cfg: Config, space: SearchSpace) -> tuple[list[dict], dict[str, list], list]:
    """(archs, table targets, names): the table's, or `rank.archs` drawn over the MACs range."""
    if cfg.rank.ground_truth:
        table = read_ground_truth(cfg.rank.ground_truth, space, cfg.rank.targets)
        return table.archs, table.targets, table.names
    if cfg.rank.targets:
        raise UserError("rank.targets names columns of a ground-truth table: set rank.ground_truth")
    archs = sample_archs(space, cfg, cfg.rank.archs)
    return archs, {}, [None] * len(archs)


def check(cfg: Config) -> None:
    """Every user error findable before the study runs: proxies and their options, data, the
    table (or a MACs range with architectures), something to rank against, the superformer, the
    ground-truth recipe, and bands the architectures can fill."""
    check_proxy_config(cfg.proxy)
    zoo.check_names(cfg.rank.proxies)
    if cfg.space.kind != "vit" and cfg.supernet.checkpoint:
        raise UserError(f"supernet.checkpoint is set, but a space.kind={cfg.space.kind} space has no "
                        "superformer (no inherited accuracy to rank)")
    check_data_source(cfg.data, holdout=_inherited(cfg))
    space = space_from_config(cfg)
    archs, table, _ = architectures(cfg, space)
    if not table and cfg.rank.ground_truth_epochs == 0 and not _inherited(cfg):
        raise UserError("nothing to rank against: give a table (--ground-truth FILE), train ground "
                        "truth (--ground-truth-epochs E) or a superformer checkpoint")
    if cfg.rank.bands > len(archs):
        raise UserError(f"rank.bands={cfg.rank.bands} is more than the {len(archs)} architectures")
    if _inherited(cfg):
        AccuracyScorer(cfg).check()
    if cfg.rank.ground_truth_epochs > 0:
        check_recipe(dataclasses.replace(cfg.retrain, epochs=cfg.rank.ground_truth_epochs), "retrain")


def score_rows(cfg: Config, space: SearchSpace, archs: list[dict]) -> list[dict]:
    """One row per architecture: params, MACs, the proxies, inherited top-1 when scored. Flat
    spaces score subnets of one fresh superformer; As-ViT topologies a freshly built model each."""
    classes = num_classes(cfg.data)
    flat = cfg.space.kind == "vit"
    model = proxy_superformer(cfg) if flat else None
    images, labels = proxy_batch(cfg)
    rows = []
    for i, arch in enumerate(progress(archs, desc="proxies")):
        cost = space.cost(arch, classes)
        net, sub = (model, arch) if flat else (create_model(space, arch, classes).eval(), None)
        record = zoo.compute_proxies(cfg.rank.proxies, net, sub, images, cfg.proxy, labels)
        rows.append({"index": i, "arch": arch, "params": cost.params, "macs": cost.macs, **record})
    if _inherited(cfg):
        for row, acc in zip(rows, AccuracyScorer(cfg).score(archs)):
            row[INHERITED] = acc["top1"]
    return rows


def signed(rows: list[dict], score: str) -> list[Optional[float]]:
    """A score's column, times its better-direction (so higher always predicts better)."""
    sign = BETTER.get(score, +1)
    return [None if r.get(score) is None else sign * float(r[score]) for r in rows]


def report(rows: list[dict], scores: list[str], targets: list[str], cfg: Config) -> dict:
    """Every score against every target: `fidelity` plus the difference to #params."""
    rk = cfg.rank
    bands = min(rk.bands, len(rows))
    kw = dict(n_resamples=rk.bootstrap, seed=cfg.proxy.seed)
    cost = [r["macs"] for r in rows]
    results: dict[str, dict] = {}
    for target in targets:
        y = [r.get(target) for r in rows]
        results[target] = {}
        for score in scores:
            x = signed(rows, score)
            entry = fidelity(x, y, cost, bands=bands, top_k=min(rk.top_k, len(rows)), **kw)
            if score != "params":
                entry["vs_params"] = correlation_difference(x, signed(rows, "params"), y, **kw)
                entry["vs_params_banded"] = correlation_difference(x, signed(rows, "params"), y,
                                                                   cost=cost, bands=bands, **kw)
            results[target][score] = entry
    return results


def table_text(results: dict) -> str:
    """Kendall tau [95% interval], global and within MACs bands, of every score per target."""
    def cell(c: dict) -> str:
        if c["estimate"] is None:
            return "-"
        return f"{c['estimate']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]" if c["low"] is not None else f"{c['estimate']:+.2f}"

    lines = []
    for target, per_score in results.items():
        lines.append(f"target {target}: Kendall tau [95% CI]   (within MACs bands)")
        for score, entry in per_score.items():
            mark = " (baseline)" if score in BASELINES else ""
            lines.append(f"  {score + mark:<28} {cell(entry['kendall']):>22}   {cell(entry['kendall_banded']):>22}")
    return "\n".join(lines)


def plot(rows: list[dict], scores: list[str], results: dict, out_dir: Path) -> list[Path]:
    """One figure per target: the target against every score (baselines in grey), each panel
    titled with its Kendall tau and interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for target, per_score in results.items():
        fig, axes = plt.subplots(1, len(scores), figsize=(3.4 * len(scores), 3.3), squeeze=False)
        for ax, score in zip(axes[0], scores):
            pts = np.array([(r[score], r[target]) for r in rows if _finite(r.get(score)) and _finite(r.get(target))])
            if len(pts):
                ax.scatter(pts[:, 0], pts[:, 1], s=16, alpha=0.8,
                           c="tab:gray" if score in BASELINES else "tab:blue")
            if score in LOG_AXES and len(pts) and pts[:, 0].min() > 0 and pts[:, 0].max() > 10 * pts[:, 0].min():
                ax.set_xscale("log")
            k = per_score[score]["kendall"]
            title = "tau -" if k["estimate"] is None else f"tau {k['estimate']:+.2f}"
            if k["low"] is not None:
                title += f" [{k['low']:+.2f}, {k['high']:+.2f}]"
            ax.set_title(title + (" (baseline)" if score in BASELINES else ""), fontsize=9)
            ax.set_xlabel(score)
            ax.set_ylabel(target)
        fig.tight_layout()
        path = out_dir / f"{target}_vs_scores.png"
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)
        paths.append(path)
    return paths


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def rank(cfg: Config, out_dir: Path) -> dict:
    """Run the ranking study into `out_dir`; returns the summary (also summary.json)."""
    space = space_from_config(cfg)
    archs, table, names = architectures(cfg, space)
    log.info("ranking %d architectures", len(archs))
    rows = score_rows(cfg, space, archs)
    for i, row in enumerate(rows):
        row["name"] = names[i]
        row.update({t: table[t][i] for t in table})
    targets = list(table)
    gt: dict[str, Any] = {}
    if cfg.rank.ground_truth_epochs > 0:
        trained = ground_truth(cfg, [space.key(a) for a in archs], archs, cfg.rank.ground_truth_epochs,
                               cfg.rank.ground_truth_seeds)
        for row, mean, std in zip(rows, trained["mean"], trained["std"]):
            row[TRAINED], row[TRAINED + "_std"] = mean, std
        targets.append(TRAINED)
        spread = [s for s in trained["std"] if s is not None]
        gt = {"epochs": cfg.rank.ground_truth_epochs, "seeds": cfg.rank.ground_truth_seeds,
              "runs": trained["runs"], "seed_std_mean": float(np.mean(spread)) if spread else None}
    scores = [p for p in cfg.rank.proxies if p not in BASELINES] + list(BASELINES)
    if INHERITED in rows[0]:
        scores.append(INHERITED)
    if not targets:
        targets, scores = [INHERITED], [s for s in scores if s != INHERITED]
    results = report(rows, scores, targets, cfg)
    layout = run_layout(cfg.output_dir)
    _write_csv(rows, scores + [t for t in targets if t not in scores], layout.rank_table)
    correlations = {"archs": len(rows), "targets": targets, "scores": scores, "baselines": list(BASELINES),
                    "bands": min(cfg.rank.bands, len(rows)), "confidence": 0.95,
                    "bootstrap": cfg.rank.bootstrap, "ground_truth": gt, "results": results}
    write_json(correlations, layout.rank_correlations)
    plots = plot(rows, scores, results, out_dir)
    tau = {t: {s: e["kendall"]["estimate"] for s, e in per.items()} for t, per in results.items()}
    return {"archs": len(rows), "targets": targets, "scores": scores, "kendall_tau": tau,
            "table": table_text(results), "plots": [str(p) for p in plots], "output": str(out_dir)}


def _write_csv(rows: list[dict], columns: list[str], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    extra = [c for c in (TRAINED + "_std",) if c in rows[0]]
    writer.writerow(["index", "name", *columns, *extra, "valid", "arch"])
    for r in rows:
        writer.writerow([r["index"], r.get("name") or "", *[r.get(c) for c in columns],
                         *[r.get(c) for c in extra], r["valid"], json.dumps(r["arch"])])
    atomic_write(path, lambda f: f.write(buf.getvalue()), mode="w")


def run(cfg: Config, ctx: StageContext) -> dict:
    """Stage entry (`vitas rank`, `vitas submit rank`)."""
    return rank(cfg, ctx.dir)


STAGE = Stage(
    name="rank", folder=RANK, check=check, run=run, report=lambda s: [s["table"], f"outputs in {s['output']}"],
    options=(
        Option("--ground-truth", "rank.ground_truth", "a table of architectures and accuracies "
               "(CSV or JSON, arch as the project's JSON dict)", metavar="FILE"),
        Option("--ground-truth-epochs", "rank.ground_truth_epochs", "train every architecture "
               "from scratch for E epochs (0: no training)", metavar="E"),
        Option("--ground-truth-seeds", "rank.ground_truth_seeds", "... with S seeds (their mean is "
               "the target, their spread recorded)", metavar="S"),
        Option("--bands", "rank.bands", "equal-count MACs bands for within-budget correlations",
               metavar="K"),
    ),
    help="how well proxies, size and inherited accuracy rank architectures, with intervals",
    description="For a ground-truth table (--ground-truth FILE) or rank.archs architectures drawn "
    "evenly over the MACs range: the proxies rank.proxies, #params, MACs and inherited hold-out "
    "top-1 (with a superformer checkpoint) against every target (the table's columns, and with "
    "E > 0 ground-truth epochs the mean val top-1 of S seeds trained from scratch): Kendall tau "
    "and Spearman rho with 95% bootstrap intervals, the same within MACs bands, top-k overlap, "
    "regret, and the difference to #params. Writes OUTPUT_DIR/rank/{ranking.csv,"
    "correlations.json,*.png}; the last line of stdout is a JSON object {archs, targets, scores, "
    "kendall_tau, output}.",
    last_line=("archs", "targets", "scores", "kendall_tau", "output"))
