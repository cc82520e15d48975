"""Proxy versus supernet ranking study (As-ViT Table 2 / Figure 2 for this project's spaces).

`rank.archs` architectures are sampled evenly across the MACs range (`search.macs_min/max`,
else the space's): the range is cut into that many equal bins and one architecture is drawn in
each (`space.sample_in_range`; a bin nobody falls into is drawn from the whole range). For each:
L^E, NTK condition, curvature, params, MACs, the inherited hold-out top-1 with weights of the
superformer checkpoint (when there is one) and, with `rank.ground_truth_epochs` E > 0 (or
`--ground-truth-epochs`), val top-1 after training from scratch for E epochs
(`retrain.train.train_arch`, in sequence in this process, or one Slurm array task per
architecture when launch.executor resolves to Slurm). Writes `<output_dir>/rank/ranking.csv`,
`correlations.json` (Kendall tau and Spearman rho of every pair of columns) and scatter plots.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
from itertools import combinations
from pathlib import Path
from typing import Any, Optional

import numpy as np
from scipy.stats import kendalltau, spearmanr

from vitas.core.checkpoint import atomic_write, write_json
from vitas.core.config import Config
from vitas.core.data import check_data_source, num_classes
from vitas.core.engine import check_recipe
from vitas.core.errors import UserError
from vitas.core.launch import resolve_executor, submit_array, wait_result
from vitas.core.layout import RANK, run_layout
from vitas.core.lock import StageLock
from vitas.core.logs import progress
from vitas.core.stage import Option, Stage, StageContext
from vitas.retrain.train import train_arch
from vitas.search.proxies.measures import check_proxy_config, ntk_batch, proxy_scores_many, proxy_superformer
from vitas.search.scoring.accuracy import AccuracyScorer
from vitas.supernet.checkpoint import superformer_path
from vitas.supernet.complexity import arch_cost
from vitas.supernet.space import SearchSpace, space_from_config

log = logging.getLogger("vitas.rank")

PROXY_COLUMNS = ("length_distortion", "ntk_condition", "curvature")
COST_COLUMNS = ("params", "macs")
ACCURACY_COLUMNS = ("inherited_top1", "trained_top1")
LOG_AXES = {"ntk_condition", "curvature", "params", "macs"}


def sample_archs(space: SearchSpace, cfg: Config, n: int) -> list[dict]:
    """`n` distinct architectures, one per equal-width MACs bin of the budget within the space's
    range, seeded by proxy.seed (a bin nobody falls into is drawn from the whole range)."""
    classes = num_classes(cfg.data)
    cost_fn = lambda a: arch_cost(a, space, classes)  # noqa: E731
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
        log.warning("rank: found %d distinct architectures of the %d asked (proxy.rank_archs) with "
                    "MACs in [%d, %d]; the space or the range is too small for more", len(archs), n, lo, hi)
    return sorted(archs.values(), key=lambda a: cost_fn(a).macs)


def train_one(cfg: Config, item: tuple[int, dict, int]) -> float:
    """Array-job entry: val top-1 of architecture `item` = (index, arch, epochs) trained from
    scratch into its own folder (locked: two tasks never train into one)."""
    index, arch, epochs = item
    folder = run_layout(cfg.output_dir).rank_ground_truth / f"arch{index:03d}"
    with StageLock(folder, "ground-truth training"):
        return float(train_arch(cfg, arch, folder, epochs)["top1"])


def ground_truth(cfg: Config, archs: list[dict], epochs: int) -> list[float]:
    """Val top-1 of each arch after `epochs` epochs from scratch (Slurm array, else in sequence)."""
    items = [(i, a, epochs) for i, a in enumerate(archs)]
    if resolve_executor(cfg.launch) == "slurm":
        jobs = submit_array(cfg, "vitas.search.ranking.study:train_one", items, stage=RANK)
        return [float(wait_result(job)) for job in jobs]
    return [train_one(cfg, item) for item in progress(items, desc=f"ground truth ({epochs} epochs)")]


def correlations(rows: list[dict], columns: list[str]) -> list[dict]:
    """Kendall tau and Spearman rho of every pair of `columns` over the rows where both are finite
    (None when fewer than 2 such rows or a column is constant there)."""
    out = []
    for x, y in combinations(columns, 2):
        pairs = [(r[x], r[y]) for r in rows if _finite(r.get(x)) and _finite(r.get(y))]
        entry: dict[str, Any] = {"x": x, "y": y, "n": len(pairs), "kendall_tau": None, "spearman_rho": None}
        a, b = np.array(pairs, dtype=np.float64).reshape(-1, 2).T
        if len(pairs) >= 2 and np.ptp(a) > 0 and np.ptp(b) > 0:  # undefined for a constant column
            entry["kendall_tau"] = _nan_none(kendalltau(a, b).statistic)
            entry["spearman_rho"] = _nan_none(spearmanr(a, b).statistic)
        out.append(entry)
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _nan_none(v: float) -> Optional[float]:
    return float(v) if math.isfinite(v) else None


def correlation_table(corr: list[dict]) -> str:
    """The correlations as an aligned text table."""
    lines = [f"{'x':<18} {'y':<18} {'n':>3} {'kendall_tau':>11} {'spearman_rho':>12}"]
    fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
    for c in corr:
        lines.append(f"{c['x']:<18} {c['y']:<18} {c['n']:>3} {fmt(c['kendall_tau']):>11} {fmt(c['spearman_rho']):>12}")
    return "\n".join(lines)


def plot(rows: list[dict], columns: list[str], corr: list[dict], out_dir: Path) -> list[Path]:
    """As-ViT Figure 2: each accuracy column (else MACs) against every proxy and cost column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    taus = {(c["x"], c["y"]): c["kendall_tau"] for c in corr}
    targets = [c for c in ACCURACY_COLUMNS if c in columns] or ["macs"]
    paths = []
    for target in targets:
        xs = [c for c in columns if c != target and c not in ACCURACY_COLUMNS]
        fig, axes = plt.subplots(1, len(xs), figsize=(3.6 * len(xs), 3.4), squeeze=False)
        for ax, x in zip(axes[0], xs):
            pts = np.array([(r[x], r[target]) for r in rows if _finite(r.get(x)) and _finite(r.get(target))])
            if len(pts):
                ax.scatter(pts[:, 0], pts[:, 1], s=18, alpha=0.8)
            if x in LOG_AXES and len(pts) and pts[:, 0].min() > 0 and pts[:, 0].max() > 10 * pts[:, 0].min():
                ax.set_xscale("log")
            tau = taus.get((x, target), taus.get((target, x)))
            ax.set_title(f"tau = {tau:.2f}" if tau is not None else "tau = -", fontsize=10)
            ax.set_xlabel(x)
            ax.set_ylabel(target)
        fig.tight_layout()
        path = out_dir / f"{target}_vs_proxies.png"
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
        plt.close(fig)
        paths.append(path)
    return paths


def check(cfg: Config) -> None:
    """Every user error findable before the study runs: proxy options, data, a MACs range with
    architectures, the superformer (when there is one) and, with ground truth, the recipe."""
    check_proxy_config(cfg.proxy)
    check_data_source(cfg.data, holdout=_has_checkpoint(cfg))
    space = space_from_config(cfg)
    sample_archs(space, cfg, cfg.rank.archs)
    if _has_checkpoint(cfg):
        AccuracyScorer(cfg).check()
    if cfg.rank.ground_truth_epochs > 0:
        check_recipe(dataclasses.replace(cfg.retrain, epochs=cfg.rank.ground_truth_epochs), "retrain")


def rank(cfg: Config, out_dir: Path) -> dict:
    """Run the ranking study into `out_dir`; returns {"rows", "columns", "correlations",
    "plots", "output"}."""
    epochs = cfg.rank.ground_truth_epochs
    space = space_from_config(cfg)
    classes = num_classes(cfg.data)
    archs = sample_archs(space, cfg, cfg.rank.archs)
    model, images = proxy_superformer(cfg), ntk_batch(cfg)
    log.info("ranking %d architectures", len(archs))

    rows = []
    for i, arch in enumerate(progress(archs, desc="proxies")):
        cost = arch_cost(arch, space, classes)
        rows.append({"index": i, "arch": arch, "params": cost.params, "macs": cost.macs,
                     **proxy_scores_many(model, [arch], images, cfg.proxy)[0]})
    columns = list(PROXY_COLUMNS + COST_COLUMNS)
    if _has_checkpoint(cfg):
        for row, acc in zip(rows, AccuracyScorer(cfg).score(archs)):
            row["inherited_top1"] = acc["top1"]
        columns.append("inherited_top1")
    else:
        log.warning("no superformer checkpoint (supernet.checkpoint or %s): inherited accuracy left out",
                    run_layout(cfg.output_dir).supernet_checkpoint)
    if epochs > 0:
        for row, top1 in zip(rows, ground_truth(cfg, archs, epochs)):
            row["trained_top1"] = top1
        columns.append("trained_top1")

    corr = correlations(rows, columns)
    layout = run_layout(cfg.output_dir)
    _write_csv(rows, columns, layout.rank_table)
    write_json({"archs": len(rows), "ground_truth_epochs": epochs, "columns": columns,
                "correlations": corr}, layout.rank_correlations)
    plots = plot(rows, columns, corr, out_dir)
    return {"rows": rows, "columns": columns, "correlations": corr, "plots": [str(p) for p in plots],
            "output": str(out_dir)}


def _has_checkpoint(cfg: Config) -> bool:
    try:
        superformer_path(cfg)
    except UserError:
        return False
    return True


def _write_csv(rows: list[dict], columns: list[str], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    header = ["index"] + columns + ["valid", "arch"]
    writer.writerow(header)
    for r in rows:
        writer.writerow([r["index"]] + [r.get(c) for c in columns] + [r["valid"], json.dumps(r["arch"])])
    atomic_write(path, lambda f: f.write(buf.getvalue()), mode="w")


def run(cfg: Config, ctx: StageContext) -> dict:
    """Stage entry (`vitas rank`, `vitas submit rank`): the study with `rank.ground_truth_epochs`."""
    result = rank(cfg, ctx.dir)
    return {"archs": len(result["rows"]), **{k: result[k] for k in ("columns", "correlations", "plots", "output")}}


def _report(summary: dict) -> list[str]:
    return [correlation_table(summary["correlations"]), f"outputs in {summary['output']}"]


STAGE = Stage(
    name="rank", folder=RANK, check=check, run=run, report=_report,
    options=(Option("--ground-truth-epochs", "rank.ground_truth_epochs", "train every architecture "
                    "from scratch for E epochs (default rank.ground_truth_epochs; 0: no training)",
                    metavar="E"),),
    help="correlate proxies, cost, inherited and trained accuracy over sampled archs",
    description="Sample rank.archs architectures evenly across the MACs range, compute L^E, NTK "
    "condition, curvature, params, MACs, inherited hold-out top-1 (from the superformer "
    "checkpoint when there is one) and, with E > 0 ground-truth epochs, val top-1 after training "
    "each from scratch. Writes OUTPUT_DIR/rank/{ranking.csv,correlations.json,*.png} and prints "
    "Kendall tau / Spearman rho of every pair of columns; the last line of stdout is a JSON "
    "object {archs, columns, correlations, output}.",
    last_line=("archs", "columns", "correlations", "output"))
