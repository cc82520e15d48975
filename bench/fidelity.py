"""The fidelity study: does the superformer rank architectures, and better than counting them?

One rerunnable, resumable study, run through the real `vitas` command line:
1. data: the fidelity data set (`vitas data`), unless it exists;
2. ground truth: `--archs` architectures drawn evenly over the space's MACs range, each trained
   from scratch for the config's `retrain.epochs` with `--truth-seeds` seeds (default: all the
   record's, at least `--seeds`; `vitas rank --ground-truth-epochs E --ground-truth-seeds S`,
   which caches every run), written as a ground-truth table; a table with fewer seeds gets the
   missing ones, each seed one `vitas rank` (`retrain.seed`) over the same architectures;
3. superformers: one per variant (channel policy on the embed dimension, sampler, and the
   training options of `VARIANTS`), all at the same number of optimizer steps
   (`supernet.epochs` x steps per epoch), wall time per step recorded; the variants of
   `SCORINGS` train nothing and score another variant's superformer differently (each subnet
   fine-tuned for a few steps first);
4. ranking: per variant, `vitas rank --ground-truth TABLE` (inherited accuracy, #params, MACs;
   the proxies once): Kendall tau and Spearman rho with 95% bootstrap intervals, globally and
   within MACs bands, top-k overlap, regret, and the difference to #params; each variant's tau
   minus the default's, paired over the same architectures; beside them, how well the ground
   truth agrees with itself (seed 0 against seed 1);
5. end to end: within a middle MACs budget, each variant's GA choice (`vitas search`) and 8
   random architectures of the same budget (shared) are retrained with `--seeds` seeds: does the
   search beat the median random architecture by more than the seed spread? Beside them the same
   GA scoring by #params alone, retrained the same way: does it beat a search by size?
6. stability: the default variant (and those of `--stability`) trained again with another seed
   (in step 3, beside the first); Kendall tau between the two superformers' rankings, and each
   one's tau and banded tau against the truth (how far a variant's own seed moves the numbers
   that compare variants).

Everything is cached under `--work` (default runs/fidelity): rerunning continues where it
stopped and recomputes only what is missing. Results: `bench/results/fidelity.json` and the
table between the markers in `docs/FIDELITY.md`. What costs hours and is plain data is also kept
beside the results, in `fidelity_record.json` (committed): the ground-truth table and every
retrained (arch, seed)'s top-1, under a key of the config, the overrides and the data's bytes; a
fresh clone with the same key reuses them instead of training them again. A run that measures
only some variants keeps the others' rows of the results file when its ground truth is the same
(`carried_over` names them). `--toy` runs the whole study on a few digits
architectures for a minute (the test suite does).

`--rescore` trains no superformer but the second seeds of `--stability`: every row of the
results file is ranked again, from the inherited top-1 per architecture it keeps, against the
table as it is now (grown by seeds with `--truth-seeds`; its architectures and first seeds must be
those the rows were measured on). Ranked against the same table it reproduces every row's
numbers; the proxies are the default config's for every row, as the table shows them.

`--partial` trains nothing: it ranks the superformers already trained under `--work` against the
ground-truth architectures whose every seed has finished so far (a table that grows while the
ground truth is still training), writes `bench/results/fidelity_partial.json` and puts that table,
marked partial, in the doc until the full study replaces it.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from vitas.supernet.space import space_from_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "fidelity.json"
DOC = ROOT / "docs" / "FIDELITY.md"
BEGIN, END = "<!-- fidelity-table:begin -->", "<!-- fidelity-table:end -->"

# name -> (what it is, overrides). Every variant trains for the same epochs and global batch, so
# the same number of optimizer steps, except `-long2x`: a diagnostic of the budget, not a candidate.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "left-uniform": ("left sharing, one random subnet per step (AutoFormer)",
                     ["space.channels.embed=left", "supernet.sampling=uniform"]),
    "left-sandwich": ("left sharing, max + min + random per step (BigNAS sandwich)",
                      ["space.channels.embed=left", "supernet.sampling=sandwich"]),
    "cyclic-uniform": ("cyclic sharing of the embed dimension (ViTAS), uniform sampling",
                       ["space.channels.embed=cyclic", "supernet.sampling=uniform"]),
    "cyclic-sandwich": ("cyclic sharing, sandwich sampling",
                        ["space.channels.embed=cyclic", "supernet.sampling=sandwich"]),
    "bilateral-bcnet": ("bilateral sharing of the embed dimension, left and right pass (BCNet)",
                        ["space.channels.embed=bilateral", "supernet.sampling=bcnet"]),
    # The training options (supernet/sampling.py, supernet/train.py), on top of cyclic sharing.
    "cyclic-sandwich-distill": ("sandwich + in-place distillation from the max subnet (BigNAS)",
                                ["space.channels.embed=cyclic", "supernet.sampling=sandwich",
                                 "supernet.distill=true"]),
    "cyclic-sandwich-alpha": ("sandwich + AlphaNet's bounded alpha-divergence distillation",
                              ["space.channels.embed=cyclic", "supernet.sampling=sandwich",
                               "supernet.distill=true", "supernet.distill_loss=alpha"]),
    "cyclic-uniform-bins": ("uniform + cost-aware draws over 8 MACs bins (ElasticViT)",
                            ["space.channels.embed=cyclic", "supernet.sampling=uniform",
                             "supernet.cost_sampling=macs_bins"]),
    "cyclic-sandwich-bins-distill": ("sandwich + cost-aware draws + distillation",
                                     ["space.channels.embed=cyclic", "supernet.sampling=sandwich",
                                      "supernet.cost_sampling=macs_bins", "supernet.distill=true"]),
    "cyclic-sandwich-gradproj": ("sandwich + NASViT's gradient projection",
                                 ["space.channels.embed=cyclic", "supernet.sampling=sandwich",
                                  "supernet.grad_projection=true"]),
    "cyclic-sandwich-warmup": ("sandwich after a max-subnet warm-up of a tenth of the epochs",
                               ["space.channels.embed=cyclic", "supernet.sampling=sandwich",
                                "supernet.max_warmup_epochs={warmup}"]),
    "cyclic-sandwich-patchnorms": ("sandwich with a LayerNorm per patch size (slimmable networks' switchable norms)",
                                   ["space.channels.embed=cyclic", "supernet.sampling=sandwich",
                                    "space.norms=per_patch"]),
    "cyclic-sandwich-patchcycle": ("sandwich whose max and min subnets take the patch sizes in turn",
                                   ["space.channels.embed=cyclic", "supernet.sampling=sandwich",
                                    "supernet.patch_cycle=true"]),
    "cyclic-sandwich-noshift": ("sandwich without identity shifting: a subnet's layers on blocks drawn anywhere (ViTAS off)",
                                ["space.channels.embed=cyclic", "supernet.sampling=sandwich",
                                 "supernet.identity_shift=false"]),
    "cyclic-sandwich-progressive": ("sandwich after a max-subnet warm-up of a tenth of the epochs, then Once-for-All's "
                                    "progressive shrinking: depth, MLP width, heads with attention width and embed "
                                    "width released in turn over half the epochs left",
                                    ["space.channels.embed=cyclic", "supernet.sampling=sandwich",
                                     "supernet.max_warmup_epochs={warmup}",
                                     "supernet.progressive=[depth,mlp_dim,num_heads+attn_dim,embed_dim]"]),
    "cyclic-sandwich-holdout500": ("sandwich scored on a hold-out of 500 images per class (3,000) instead of 50: "
                                   "23 epochs over the 18,000 images left keep the optimizer steps",
                                   ["space.channels.embed=cyclic", "supernet.sampling=sandwich",
                                    "data.holdout_per_class=500", "supernet.epochs=23"]),
    "cyclic-sandwich-long2x": ("sandwich trained for twice the epochs (12,920 steps): not at the study's step budget, "
                               "it asks whether that budget is what limits the ranking",
                               ["space.channels.embed=cyclic", "supernet.sampling=sandwich", "supernet.epochs=40"]),
    "cyclic-sandwich-lr2x": ("sandwich at twice the config's peak learning rate (4e-3 instead of 2e-3), the same "
                             "schedule and steps: does a faster schedule buy what twice the steps did?",
                             ["space.channels.embed=cyclic", "supernet.sampling=sandwich", "supernet.lr=4.0e-3"]),
    "cyclic-sandwich-rand2": ("BigNAS's sandwich as published: max, min and two random subnets per step (a "
                              "third more passes, the same optimizer steps)",
                              ["space.channels.embed=cyclic", "supernet.sampling=sandwich",
                               "supernet.random_subnets=2"]),
    "cyclic-sandwich-ema": ("sandwich scored with an exponential moving average of the superformer's weights (decay "
                            "0.998: about the last 500 of the 6,460 steps) instead of its last weights",
                            ["space.channels.embed=cyclic", "supernet.sampling=sandwich", "supernet.ema=true",
                             "supernet.ema_decay=0.998"]),
    "cyclic-sandwich-entangled": ("sandwich with q/k entangled across head counts (ViTAS's private q/k off)",
                                  ["space.channels.embed=cyclic", "supernet.sampling=sandwich",
                                   "space.qk=entangled"]),
    "cyclic-sandwich-patchblocks": ("few-shot NAS split on the patch size: a block stack per patch size (only the "
                                    "head shared), the max and min passes taking the patch sizes in turn, so each "
                                    "stack gets its own sandwich every other step",
                                    ["space.channels.embed=cyclic", "supernet.sampling=sandwich",
                                     "space.blocks=per_patch", "supernet.patch_cycle=true"]),
    "cyclic-sandwich-patchblocks-nocycle": ("a block stack per patch size under the plain sandwich, whose max subnet is "
                                            "always patch 4: patch 8's stack trains only through the min subnet and "
                                            "random draws (does the offset follow the steps each grid gets?)",
                                            ["space.channels.embed=cyclic", "supernet.sampling=sandwich",
                                             "space.blocks=per_patch"]),
    "cyclic-sandwich-patchcycle-distill": ("sandwich with the patch cycle and in-place distillation from the step's max "
                                           "subnet: the two options that each evened out one group's shortfall "
                                           "(the patch sizes; the narrowest embed width), together",
                                           ["space.channels.embed=cyclic", "supernet.sampling=sandwich",
                                            "supernet.patch_cycle=true", "supernet.distill=true"]),
}
# Variants that score another variant's superformer differently (nothing trained of their own):
# name -> (what it is, the variant whose superformer it scores, scoring overrides).
SCORINGS: dict[str, tuple[str, str, list[str]]] = {
    "cyclic-sandwich-ft50": ("cyclic-sandwich, each subnet fine-tuned 50 steps before scoring",
                             "cyclic-sandwich", ["search.finetune_steps=50"]),
    "cyclic-sandwich-ft200": ("cyclic-sandwich, each subnet fine-tuned 200 steps before scoring",
                              "cyclic-sandwich", ["search.finetune_steps=200"]),
}
BASELINE_VARIANTS = ("left-uniform", "left-sandwich", "cyclic-uniform", "cyclic-sandwich", "bilateral-bcnet")
DEFAULT = "cyclic-sandwich"


class Study:
    """Paths, the base command line and a pool of worker slots for one study."""

    def __init__(self, config: Path, work: Path, data: Path, jobs: int, toy: bool, extra: list[str]):
        self.config, self.work, self.data, self.jobs, self.toy = config, work, data, jobs, toy
        self.extra = list(extra)
        self.base = [f"data.root={data}", "data.workers=0", *extra]
        self.times: dict[str, float] = {}
        self.record: dict = {"key": None, "ground_truth": None, "retrain": {}}

    def record_key(self, dataset: str) -> dict:
        """What the recorded runs depend on: the config's bytes, the overrides, and the data's
        bytes (every file's path and content: a data set generated again must equal the one the
        record was trained on, byte for byte)."""
        digest = hashlib.sha1()
        for f in sorted(p for p in self.data.rglob("*") if p.is_file()):
            digest.update(str(f.relative_to(self.data)).encode() + b"\0" + f.read_bytes())
        return {"config_sha1": hashlib.sha1(self.config.read_bytes()).hexdigest(), "overrides": self.extra,
                "dataset": dataset, "data_sha1": digest.hexdigest()}

    def load_record(self, path: Path, dataset: str) -> None:
        """The committed record of `path` if its key is this study's, else an empty one."""
        key = self.record_key(dataset)
        saved = json.loads(path.read_text()) if path.is_file() else {}
        self.record = saved if saved.get("key") == key else {"key": key, "ground_truth": None, "retrain": {}}

    def vitas(self, *args: str, log: Optional[Path] = None) -> dict:
        """Run `python -m vitas ARGS` (one thread); the JSON of its last stdout line."""
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        # Run from the work folder: a checkout's root would put its own `vitas/` first on the path.
        self.work.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "vitas", *args], cwd=self.work, env=env,
                              capture_output=True, text=True)
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"vitas {' '.join(args[:3])} ... failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def stage(self, stage: str, out: Path, *overrides: str, options: tuple[str, ...] = ()) -> dict:
        """A stage of the study's config into `out` (log in out/<stage>.log)."""
        return self.vitas(stage, "-c", str(self.config), *options, f"output_dir={out}", *self.base,
                          *overrides, log=out / f"{stage}.log")

    def overrides(self, name: str) -> list[str]:
        """A variant's overrides, `{warmup}` filled in (a tenth of the supernet epochs); a scoring
        variant's are its superformer's and its own."""
        import yaml

        if name in SCORINGS:
            return self.overrides(SCORINGS[name][1]) + SCORINGS[name][2]
        epochs = int(yaml.safe_load(self.config.read_text()).get("supernet", {}).get("epochs", 100))
        for item in self.base:
            if item.startswith("supernet.epochs="):
                epochs = int(item.split("=", 1)[1])
        return [o.replace("{warmup}", str(max(1, epochs // 10))) for o in VARIANTS[name][1]]

    def space_and_cost(self) -> tuple[Any, Any]:
        """The study's search space and its cost function (params and MACs of an arch)."""
        from vitas.core.config import load_config
        from vitas.core.data import num_classes

        cfg = load_config(self.config, self.base)
        space = space_from_config(cfg)
        classes = num_classes(cfg.data)
        return space, lambda arch: space.cost(arch, classes)

    def rank_settings(self) -> dict:
        """The MACs bands and bootstrap resamples of the study's rankings (`rank.*`)."""
        from vitas.core.config import load_config

        rk = load_config(self.config, self.base).rank
        return {"bands": rk.bands, "n_resamples": rk.bootstrap}

    def timed(self, name: str, fn: Any, *args: Any) -> Any:
        start = time.time()
        try:
            return fn(*args)
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.time() - start

    def parallel(self, fn: Any, items: list) -> list:
        """fn(item) for every item, `jobs` at a time (each a one-thread subprocess)."""
        with futures.ThreadPoolExecutor(max_workers=self.jobs) as pool:
            return list(pool.map(fn, items))


def trained_as(name: str) -> str:
    """The variant whose superformer `name` ranks (itself, unless it is a scoring variant)."""
    return SCORINGS[name][1] if name in SCORINGS else name


def folder_of(name: str, what: str) -> str:
    """The folder (in the superformer's run) of a variant's `what` ("rank-gt", "search-middle"):
    scoring variants share the run, so their folders carry their name."""
    return f"{what}-{name}" if name in SCORINGS else what


# ----------------------------------------------------------------------------- parts
def ensure_data(study: Study, name: str, size_args: list[str]) -> None:
    if not (study.data / "train").is_dir():
        study.vitas("data", name, str(study.data), *size_args)


def ground_truth(study: Study, archs: int, seeds: int, executor: str) -> Path:
    """The table of `archs` architectures' mean val top-1 over `seeds` seeds (trained once). A
    table already there (the cache's, else the record's) with fewer seeds gets the missing ones
    (`more_seeds`); one with more is averaged over its first `seeds` (the record keeps them all)."""
    table = study.work / "ground_truth.json"
    tables = [study.record.get("ground_truth"), json.loads(table.read_text()) if table.is_file() else None]
    recorded = max((t for t in tables if t and len(t) == archs), key=_seeds_of, default=None)
    if recorded is None:
        out = study.work / "ground_truth"
        _train_ground_truth(study, out, archs, executor, f"rank.ground_truth_seeds={seeds}")
        rows = _csv(out / "rank" / "ranking.csv")
        runs = json.loads((out / "rank" / "correlations.json").read_text())["ground_truth"]["runs"]
        recorded = [{"arch": json.loads(r["arch"]), "trained_top1": float(r["trained_top1"]),
                     "seed_runs": run} for r, run in zip(rows, runs)]
    have = _seeds_of(recorded)
    if have < seeds:
        recorded = more_seeds(study, recorded, range(have, seeds), executor)
    study.record["ground_truth"] = recorded
    _write(table, [{**r, "seed_runs": r["seed_runs"][:seeds], "trained_top1": float(np.mean(r["seed_runs"][:seeds]))}
                   for r in recorded])
    return table


def _seeds_of(rows: Optional[list[dict]]) -> int:
    """The seeds every architecture of a ground-truth table has (0 for no table)."""
    return min((len(r["seed_runs"]) for r in rows or []), default=0)


def _train_ground_truth(study: Study, out: Path, archs: int, executor: str, *overrides: str) -> None:
    """`vitas rank` training the `archs` architectures of the study from scratch into `out` (on
    Slurm, when the local cluster runs, one array task per (arch, seed), two at a time)."""
    study.stage("rank", out, f"rank.archs={archs}", "rank.proxies=[]", "rank.inherited=false",
                "launch.timeout_min=600", f"launch.executor={executor}", *overrides,
                options=("--ground-truth-epochs", str(_retrain_epochs(study))))


def more_seeds(study: Study, rows: list[dict], seeds: range, executor: str) -> list[dict]:
    """`rows` with the seeds `seeds` added to every architecture's runs: one `vitas rank` per
    seed (`retrain.seed` the config's plus s, as `vitas rank` numbers a table's seeds), into
    `ground_truth-seed<s>`, `jobs` at a time. The architectures are drawn by the config as the
    first seeds' were; a config that draws others is refused."""
    from vitas.core.config import load_config

    first = load_config(study.config, study.base).retrain.seed

    def one(seed: int) -> dict[str, float]:
        out = study.work / f"ground_truth-seed{seed}"
        _train_ground_truth(study, out, len(rows), executor, "rank.ground_truth_seeds=1",
                            f"retrain.seed={first + seed}")
        return _by_arch(out / "rank" / "ranking.csv", "trained_top1")

    added = study.parallel(one, list(seeds))
    keys = [_arch_key(r["arch"]) for r in rows]
    for seed, top1 in zip(seeds, added):
        if set(top1) != set(keys):
            raise SystemExit(f"seed {seed} of the ground truth drew other architectures than the table's: "
                             "the config or its space changed")
    return [{**r, "seed_runs": [*r["seed_runs"], *(top1[k] for top1 in added)]} for r, k in zip(rows, keys)]


def train_supernet(study: Study, name: str, seed: int = 0) -> Path:
    """The superformer of variant `name` (cached); returns its run folder."""
    out = study.work / "supernets" / (name if seed == 0 else f"{name}-seed{seed}")
    if not (out / "supernet" / "summary.json").is_file():
        study.stage("train-supernet", out, *study.overrides(name), f"supernet.seed={seed}")
    return out


def rank_variant(study: Study, name: str, run: Path, table: Path, proxies: list[str],
                 folder: str = "rank-gt") -> dict:
    """`vitas rank` of a variant's superformer against the ground-truth table (cached in `folder`)."""
    out = run / folder
    result = out / "rank" / "correlations.json"
    if not result.is_file():
        study.stage("rank", out, *study.overrides(name), f"rank.proxies={json.dumps(proxies)}",
                    "rank.targets=[trained_top1]",
                    f"supernet.checkpoint={run / 'supernet' / 'last.pth'}",
                    options=("--ground-truth", str(table)))
    return json.loads(result.read_text())


# where a superformer's error is looked for: gene -> (table column, table title)
GENES = {"patch_size": ("patch", "patch size"), "embed_dim": ("embed", "embed width")}


def by_gene(inherited: list[Optional[float]], truth: list[dict], gene: str) -> dict:
    """Per value of `gene` (patch size, embed width) over the ground-truth architectures: how many,
    Kendall tau of inherited against trained accuracy among them, and the mean points by which
    inherited accuracy falls short of trained (where a superformer's error is systematic rather
    than noise)."""
    from scipy.stats import kendalltau

    out = {}
    for value in sorted({r["arch"][gene] for r in truth}):
        part = [(x, r["trained_top1"]) for x, r in zip(inherited, truth) if r["arch"][gene] == value and x is not None]
        x, y = np.array(part, dtype=np.float64).T if part else (np.array([]), np.array([]))
        tau = float(kendalltau(x, y).statistic) if len(part) > 2 else None
        out[str(value)] = {"archs": len(part), "kendall": None if tau != tau else tau,
                           "shortfall": float(np.mean(y - x)) if part else None}
    return out


def breakdowns(variant: dict, truth: list[dict]) -> None:
    """A variant's `by_patch_size`, `by_embed_dim`, ... from its inherited top-1 per architecture
    (so rows carried over from an earlier run get them too)."""
    for gene in GENES:
        variant[f"by_{gene}"] = by_gene(variant["inherited_top1"], truth, gene)
    variant.pop("by_patch", None)  # the name before stop 24


def variant_entry(name: str, run: Path, corr: dict, truth: list[dict], folder: str = "rank-gt") -> dict:
    """A variant's row of the results: what it is, its ranking, its inherited top-1 per
    ground-truth architecture (in the table's order, for paired comparisons later) and its
    superformer's training."""
    summary = json.loads((run / "supernet" / "summary.json").read_text())
    what = SCORINGS[name][0] if name in SCORINGS else VARIANTS[name][0]
    entry = {"what": what, "trained_as": trained_as(name), "rank": corr,
             "inherited_top1": _in_table_order(run / folder_of(name, folder) / "rank" / "ranking.csv", truth),
             "supernet": {"steps": summary["steps"], "train_seconds": summary["train_seconds"],
                          "sec_per_step": summary["train_seconds"] / max(summary["steps"], 1),
                          "max_top1": summary["max_top1"], "min_top1": summary["min_top1"]}}
    breakdowns(entry, truth)
    return entry


def share_scores(result: dict, names: list[str], proxies: list[str]) -> None:
    """The proxies and baselines, ranked once with the first variant, in every variant's table
    (same architectures, same inits)."""
    shared = result["variants"][names[0]]["rank"]["results"]["trained_top1"]
    for n in names[1:]:
        for score in proxies + ["params", "macs"]:
            result["variants"][n]["rank"]["results"]["trained_top1"].setdefault(score, shared[score])


def versus_default(result: dict, truth: list[dict], macs: list[int], bands: int, n_resamples: int) -> None:
    """Each variant's Kendall tau minus the default's, paired over the same ground-truth
    architectures (a bootstrap over them; within MACs bands too): whether an option ranks better
    than the default on this table. A superformer's own seed moves tau as well, which this interval
    does not hold: the stability part measures that."""
    from vitas.search.ranking.stats import correlation_difference

    base = (result["variants"].get(DEFAULT) or {}).get("inherited_top1")
    if not base or None in base:
        return
    target = [r["trained_top1"] for r in truth]
    for name, v in result["variants"].items():
        mine = v.get("inherited_top1")
        if name == DEFAULT or not mine or None in mine:
            continue
        v["vs_default"] = {"kendall": correlation_difference(mine, base, target, n_resamples=n_resamples),
                           "kendall_banded": correlation_difference(mine, base, target, cost=macs,
                                                                    bands=min(bands, len(truth)),
                                                                    n_resamples=n_resamples)}


def retrain(study: Study, arch: dict, seed: int) -> float:
    """Val top-1 of `arch` trained from scratch with `seed` (cached by arch and seed)."""
    name = f"{_arch_key(arch)}-seed{seed}"
    summary = study.work / "retrain" / name / "retrain" / "summary.json"
    if not summary.is_file() and name in study.record["retrain"]:
        return study.record["retrain"][name]  # trained before, on a clone with the same config and data
    if not summary.is_file():
        study.stage("retrain", summary.parents[1], f"retrain.seed={seed}", options=("--arch", json.dumps(arch)))
    top1 = float(json.loads(summary.read_text())["top1"])
    study.record["retrain"][name] = top1
    return top1


def random_archs(study: Study, budget: tuple[int, int], n: int) -> list[dict]:
    """`n` distinct architectures drawn uniformly over the genome inside the budget (the
    search's own sampler), fixed once for the whole study."""
    path = study.work / "random_archs.json"
    if not path.is_file():
        space, cost = study.space_and_cost()
        rng = np.random.default_rng(1)
        found: dict[str, dict] = {}
        for _ in range(100 * n):
            arch = space.sample_in_range(rng, cost, macs=budget)
            found.setdefault(space.key(arch), arch)
            if len(found) == n:
                break
        _write(path, list(found.values()))
    return json.loads(path.read_text())


def search_choice(study: Study, name: str, run: Path, budget: tuple[int, int]) -> dict:
    """The GA's choice within `budget` with variant `name`'s superformer."""
    out = run / folder_of(name, "search-middle")
    arch = out / "search" / "arch.json"
    if not arch.is_file():
        study.stage("search", out, *study.overrides(name), "search.algorithm=ga",
                    f"search.macs_min={budget[0]}", f"search.macs_max={budget[1]}",
                    f"supernet.checkpoint={run / 'supernet' / 'last.pth'}")
    return json.loads(arch.read_text())


def size_choice(study: Study, budget: tuple[int, int]) -> dict:
    """The same GA within `budget` scoring by #params alone (no superformer): the architecture a
    search by size would pick, against which a superformer's search has to show its worth (cached
    per budget)."""
    out = study.work / f"search-params-{budget[0]}-{budget[1]}"
    arch = out / "search" / "arch.json"
    if not arch.is_file():
        study.stage("search", out, "search.algorithm=ga", "search.scorer=proxy", "proxy.names=[params]",
                    "proxy.weights=[1.0]", "proxy.combine=weighted",
                    f"search.macs_min={budget[0]}", f"search.macs_max={budget[1]}")
    return json.loads(arch.read_text())


def ground_truth_noise(rows: list[dict]) -> dict:
    """How well the ground truth agrees with itself: Kendall tau (95% interval) between the
    rankings of its first two seeds, and their mean absolute difference. A score ranked against
    the seed mean can hardly be trusted far beyond this."""
    from vitas.search.ranking.stats import correlation

    pairs = [r["seed_runs"][:2] for r in rows if len(r.get("seed_runs") or []) >= 2]
    if len(pairs) < 3:
        return {}
    a, b = np.array(pairs).T
    out = {"archs": len(pairs), "kendall_seed0_vs_seed1": correlation(a, b, "kendall"),
           "mean_abs_difference": float(np.mean(np.abs(a - b)))}
    seeds = min(len(r["seed_runs"]) for r in rows)
    if seeds >= 4 and len(pairs) == len(rows):  # two halves of the seeds, each a mean
        runs = np.array([r["seed_runs"][:seeds] for r in rows])
        first, second = runs[:, :seeds // 2].mean(axis=1), runs[:, seeds // 2:seeds // 2 * 2].mean(axis=1)
        out["halves"] = {"seeds_each": seeds // 2, "kendall": correlation(first, second, "kendall"),
                         "mean_abs_difference": float(np.mean(np.abs(first - second)))}
    return out


def work_seconds(study: Study) -> dict:
    """What each part of the study cost, summed over everything in the cache (so a rerun that
    computes nothing still reports it): training seconds from each run's summary, and the wall
    time of each rank and search stage (config.yaml written at its start, summary.json at its end).
    Ground-truth runs that finished before summaries kept the time of every session, and were
    resumed since, report under a second: they are counted as unrecorded."""
    def train(paths: list[Path]) -> tuple[float, int]:
        times = [float(json.loads(p.read_text()).get("train_seconds", 0.0)) for p in paths]
        return sum(times), sum(t < 1.0 for t in times)  # < 1 s: a finished run resumed, no record

    def stages(pattern: str) -> float:
        return sum(p.stat().st_mtime - (p.parent / "config.yaml").stat().st_mtime
                   for p in study.work.glob(pattern) if (p.parent / "config.yaml").is_file())

    gt, unrecorded = train(sorted(study.work.glob("ground_truth*/rank/ground_truth/*/seed*/summary.json")))
    return {"ground truth training": round(gt, 1), "ground truth runs without a record": unrecorded,
            "superformers": {p.parent.parent.name: round(json.loads(p.read_text())["train_seconds"], 1)
                             for p in sorted(study.work.glob("supernets/*/supernet/summary.json"))},
            "ranking": round(stages("supernets/*/rank-gt*/rank/summary.json"), 1),
            "searches": round(stages("supernets/*/search-middle*/search/summary.json"), 1),
            "end-to-end retraining": round(train(sorted(study.work.glob("retrain/*/retrain/summary.json")))[0], 1)}


# ----------------------------------------------------------------------------- helpers
def _arch_key(arch: dict) -> str:
    return hashlib.sha1(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:12]


def _by_arch(ranking: Path, column: str) -> dict[str, float]:
    """A column of a `vitas rank` ranking.csv, by architecture key."""
    return {_arch_key(json.loads(r["arch"])): float(r[column]) for r in _csv(ranking)}


def _in_table_order(ranking: Path, truth: list[dict]) -> list[Optional[float]]:
    """The inherited top-1 of a ranking.csv per ground-truth architecture, in the table's order."""
    scores = _by_arch(ranking, "inherited_top1")
    return [scores.get(_arch_key(r["arch"])) for r in truth]


def _table_tag(table: Path) -> str:
    """A short fingerprint of a ground-truth table file (names the rankings made against it)."""
    return hashlib.sha1(table.read_bytes()).hexdigest()[:8]


def _retrain_epochs(study: Study) -> int:
    import yaml

    tree = yaml.safe_load(study.config.read_text())
    return int(tree.get("retrain", {}).get("epochs", 300))


def _csv(path: Path) -> list[dict]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def _write(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def _kendall(corr: dict, target: str, score: str, banded: bool = False) -> dict:
    return corr["results"][target][score]["kendall_banded" if banded else "kendall"]


def _topk(entry: dict) -> str:
    key = next((k for k in entry if k.startswith("top") and k.endswith("_overlap")), None)
    return "-" if key is None or entry[key] is None else f"{entry[key]:.2f} ({key[:-8]})"


def _num(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}"


def _signed(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:+.2f}"


def _cell(c: dict) -> str:
    if c.get("estimate") is None:
        return "-"
    if c.get("low") is None:
        return f"{c['estimate']:+.2f}"
    return f"{c['estimate']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]"


# ----------------------------------------------------------------------------- report
def table_markdown(result: dict) -> str:
    """The fidelity table: one row per score (each variant's inherited accuracy, the proxies,
    the baselines), Kendall tau with 95% intervals, global and within MACs bands."""
    target = "trained_top1"
    lines = ["| score | Kendall tau (95% CI) | within MACs bands | top-k overlap | regret (points) | "
             "search vs random (points) | s/step | tau minus the default's (paired) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, v in result["variants"].items():
        corr = v["rank"]
        e2e = v.get("end_to_end", {})
        margin = "-" if "margin" not in e2e else f"{e2e['margin']:+.2f} (spread {e2e['seed_spread']:.2f})"
        entry = corr["results"][target]["inherited_top1"]
        lines.append(f"| inherited, {name} | {_cell(entry['kendall'])} | {_cell(entry['kendall_banded'])} | "
                     f"{_topk(entry)} | {_num(entry['regret'])} | {margin} | "
                     f"{v['supernet']['sec_per_step']:.3f} | {_versus(v)} |")
    noise = result.get("ground_truth_noise") or {}
    if noise:
        lines.append(f"| ground truth itself: seed 0 vs seed 1 ({noise['archs']} archs) | "
                     f"{_cell(noise['kendall_seed0_vs_seed1'])} | - | - | - | - | - | - |")
    halves = noise.get("halves")
    if halves:
        n = halves["seeds_each"]
        lines.append(f"| ground truth itself: mean of seeds 0-{n - 1} vs seeds {n}-{2 * n - 1} | "
                     f"{_cell(halves['kendall'])} | - | - | - | - | - | - |")
    first = next(iter(result["variants"].values()))["rank"]["results"][target]
    by_size = (result.get("budget") or {}).get("params")  # the GA's choice scoring by #params
    for score in result["proxies"] + ["params", "macs"]:
        entry = first[score]
        tag = " (baseline)" if score in ("params", "macs") else ""
        search = "-" if score != "params" or not by_size else \
            f"{by_size['margin']:+.2f} (spread {by_size['seed_spread']:.2f})"
        lines.append(f"| {score}{tag} | {_cell(entry['kendall'])} | {_cell(entry['kendall_banded'])} | "
                     f"{_topk(entry)} | {_num(entry['regret'])} | {search} | - | - |")
    return "\n".join(lines)


def _versus(variant: dict) -> str:
    """The table cell of a variant's paired difference to the default: global; within bands."""
    vs = variant.get("vs_default")
    if not vs:
        return "-"
    return f"{_cell(vs['kendall'])}; bands {_cell(vs['kendall_banded'])}"


def gene_table(result: dict, gene: str) -> str:
    """Per variant and value of `gene`: Kendall tau within the value and the mean shortfall of
    inherited against trained accuracy."""
    values = sorted({g for v in result["variants"].values() for g in v.get(f"by_{gene}", {})}, key=int)
    if not values:
        return ""
    head = " | ".join(f"{GENES[gene][0]} {g}: tau, shortfall" for g in values)
    lines = [f"| variant | {head} |", "| --- |" + " --- |" * len(values)]
    for name, v in result["variants"].items():
        cells = []
        for g in values:
            c = v.get(f"by_{gene}", {}).get(g)
            cells.append("-" if c is None or c["shortfall"] is None
                         else f"{_signed(c['kendall'])}, {c['shortfall']:.1f} ({c['archs']} archs)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_doc(result: dict, doc: Path) -> None:
    text = doc.read_text() if doc.is_file() else "# Fidelity\n"
    parts = [(f"By {title} (inherited accuracy against trained, points short):", gene_table(result, gene))
             for gene, (_, title) in GENES.items()]
    genes = "".join(f"\n{title}\n\n{table}\n" for title, table in parts if table)
    block = f"{BEGIN}\n{table_markdown(result)}\n{genes}\n{result['summary_text']}\n{END}"
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## The fidelity table (bench/fidelity.py)\n\n" + block + "\n"
    doc.write_text(text)


def _verdict(vs: dict) -> str:
    """Where a paired difference to the default is shown: an interval clear of zero."""
    said = []
    for key, part in (("kendall", "globally"), ("kendall_banded", "within bands")):
        c = vs[key]
        if c["low"] is not None and (c["low"] > 0 or c["high"] < 0):
            said.append(f"{'better' if c['low'] > 0 else 'worse'} {part}")
    return (" and ".join(said) or "neither interval excludes zero") + "."


def summarise(result: dict) -> str:
    """Plain sentences: where inherited accuracy beats #params and MACs, and where it does not."""
    lines = []
    target = "trained_top1"
    for name, v in result["variants"].items():
        res = v["rank"]["results"][target]
        inh, par, mac = (res[s]["kendall"] for s in ("inherited_top1", "params", "macs"))
        band = res["inherited_top1"]["kendall_banded"]
        if inh["estimate"] is None:
            continue
        beats = inh["low"] is not None and inh["low"] > max(par["estimate"] or -1, mac["estimate"] or -1)
        paired = res["inherited_top1"].get("vs_params")
        lines.append(f"- {name}: inherited tau {_num(inh['estimate'])} vs #params {_num(par['estimate'])}, "
                     f"MACs {_num(mac['estimate'])}; within MACs bands {_num(band['estimate'])} vs #params "
                     f"{_num(res['params']['kendall_banded']['estimate'])}. "
                     + ("Its interval's lower end is above both baselines." if beats else
                        "It does NOT beat the size baselines with confidence.")
                     + (f" Paired against #params on the same architectures: {_cell(paired)}, within bands "
                        f"{_cell(res['inherited_top1']['vs_params_banded'])}." if paired else ""))
    for name, v in result["variants"].items():
        vs = v.get("vs_default")
        if vs and vs["kendall"]["estimate"] is not None:
            lines.append(f"- {name} against {DEFAULT}, paired over the same architectures: tau "
                         f"{_cell(vs['kendall'])}, within MACs bands {_cell(vs['kendall_banded'])}; "
                         + _verdict(vs))
    budget = result.get("budget")
    if budget:
        rnd = budget["random"]
        lines.append(f"- End to end, MACs {budget['macs'][0]:,} to {budget['macs'][1]:,}: the median of "
                     f"{len(rnd['top1'])} random architectures, retrained, is {rnd['median']:.2f} % (mean seed "
                     f"spread {rnd['seed_spread']:.2f}); the GA's choice beats it by more than the seed spread "
                     f"with {', '.join(n for n, v in budget['variants'].items() if v['beats_random']) or 'no variant'}.")
        size = budget.get("params")
        if size:
            ahead = [n for n, v in budget["variants"].items()
                     if v["mean"] - size["mean"] > max(v["seed_spread"], size["seed_spread"])]
            lines.append(f"- The same GA scoring by #params alone (no superformer) picks an architecture that "
                         f"retrains to {size['mean']:.2f} % ({size['margin']:+.2f} against the random median, seed "
                         f"spread {size['seed_spread']:.2f}). Each variant's choice minus it: "
                         + ", ".join(f"{n} {v['mean'] - size['mean']:+.2f}" for n, v in budget["variants"].items())
                         + "; beyond both choices' seed spreads: " + (", ".join(ahead) or "none") + ".")
    for name, stability in (result.get("stability") or {}).items():
        taus, bands = stability["tau_vs_truth"], stability["banded_vs_truth"]
        lines.append(f"- Stability: two {name} superformers (supernet.seed 0 and 1) rank the architectures "
                     f"with tau {_signed(stability['tau_between_seeds'])} to each other, "
                     + (f"{_signed(taus[0])} and {_signed(taus[1])} to the ground truth ({_signed(bands[0])} and "
                        f"{_signed(bands[1])} within MACs bands)." if None not in taus else
                        f"{_signed(taus[0])} and (seed 1: unknown, its scores were not kept) to the ground truth "
                        f"({_signed(bands[0])} within MACs bands)."))
    noise = result.get("ground_truth_noise") or {}
    if noise:
        c = noise["kendall_seed0_vs_seed1"]
        lines.append(f"- The ground truth agrees with itself at tau {_cell(c)} (seed 0 against seed 1 of "
                     f"{noise['archs']} architectures, mean |difference| {noise['mean_abs_difference']:.2f} "
                     "points): a score at that tau against the seed mean ranks about as well as a second "
                     "training run of the ground truth would.")
        halves = noise.get("halves")
        if halves:
            n = halves["seeds_each"]
            lines.append(f"- Its two halves, the mean of seeds 0-{n - 1} against that of seeds {n}-{2 * n - 1}, agree at "
                         f"tau {_cell(halves['kendall'])} (mean |difference| {halves['mean_abs_difference']:.2f} points); "
                         f"the table ranks by the mean of all {2 * n}.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="the study's YAML (space, data, recipes)")
    parser.add_argument("--data", type=Path, help="data folder (created with `vitas data` if missing)")
    parser.add_argument("--dataset", default="digits", help="`vitas data` generator of --data")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "fidelity")
    parser.add_argument("--archs", type=int, default=24)
    parser.add_argument("--seeds", type=int, default=2, help="seeds of every retraining (and of the ground truth)")
    parser.add_argument("--truth-seeds", type=int, default=None,
                        help="seeds of the ground truth alone (default: all the record's, at least --seeds); a "
                             "recorded table with fewer gets the missing ones trained, one with more is "
                             "averaged over its first")
    parser.add_argument("--random", type=int, default=8, help="random architectures in the end-to-end check")
    parser.add_argument("--variants", default=",".join(BASELINE_VARIANTS),
                        help=f"comma-separated, of {list(VARIANTS)} (or 'all')")
    parser.add_argument("--stability", default="",
                        help=f"comma-separated variants trained again with supernet.seed=1 ({DEFAULT} always is)")
    parser.add_argument("--end-to-end", default="trained", choices=("trained", "all"),
                        help="variants whose GA choice is retrained against random: those that train a "
                             "superformer (default; a fine-tuned search costs finetune_steps more steps "
                             "per scored subnet) or all")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--toy", action="store_true", help="a minute-long run on digits (tests)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--doc", type=Path, default=DOC, help="the doc whose table to rewrite")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite the doc")
    parser.add_argument("--ground-truth-executor", default="local", choices=("local", "slurm"),
                        help="slurm: one array task per (arch, seed), as many at once as the cluster has CPUs")
    parser.add_argument("--partial", action="store_true",
                        help="train nothing: rank the trained superformers against the finished ground truth")
    parser.add_argument("--rescore", action="store_true",
                        help="train no superformer: rank every row of --out again from its inherited top-1 per "
                             "architecture against the ground truth as it is now (after --truth-seeds added seeds)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run")
    args = parser.parse_args()
    extra = list(args.overrides)
    if args.toy:
        args.config = args.config or ROOT / "yamls" / "demo-digits.yaml"
        args.archs, args.seeds, args.random = min(args.archs, 4), min(args.seeds, 2), min(args.random, 2)
        extra = ["supernet.epochs=1", "retrain.epochs=1", "search.population=4", "search.generations=1",
                 "rank.bands=1", "rank.bootstrap=100", "proxy.inits=1", "proxy.thetas=4",
                 "proxy.ntk_images=4", "data.holdout_per_class=5", "search.finetune_batch_size=8", "search.macs_min=null",
                 "search.macs_max=null", *extra]
    if args.config is None or args.data is None:
        parser.error("--config and --data are needed (or --toy)")
    names = [*VARIANTS, *SCORINGS] if args.variants == "all" else [n for n in args.variants.split(",") if n]
    for n in names:
        if n not in VARIANTS and n not in SCORINGS:
            parser.error(f"unknown variant {n!r}; variants: {[*VARIANTS, *SCORINGS]}")
    for n in filter(None, args.stability.split(",")):
        if n not in VARIANTS:
            parser.error(f"--stability: {n!r} is not a variant that trains a superformer; variants: {list(VARIANTS)}")
    study = Study(args.config.resolve(), args.work.resolve(), args.data.resolve(), args.jobs, args.toy, extra)
    proxies = ["length_distortion", "ntk_condition"]
    if args.partial:
        return run_partial(study, names, args, proxies)
    start = time.time()
    study.timed("data", ensure_data, study, args.dataset, [])
    study.load_record(record_path(args.out), args.dataset)
    args.truth_seeds = args.truth_seeds or max(args.seeds, _seeds_of(study.record.get("ground_truth")))
    table = study.timed("ground truth", ground_truth, study, args.archs, args.truth_seeds,
                        args.ground_truth_executor)
    gt_rows = json.loads(table.read_text())
    _write(record_path(args.out), study.record)  # hours of training, kept before the superformers train
    if args.rescore:
        return run_rescore(study, args, table, gt_rows, proxies)
    trained = list(dict.fromkeys(trained_as(n) for n in names))
    stable = list(dict.fromkeys(n for n in [DEFAULT, *args.stability.split(",")] if n in names))
    # the stability part's second seeds train beside the first ones, `jobs` at a time
    pairs = [(n, 0) for n in trained] + [(n, 1) for n in stable]
    superformers = dict(zip(pairs, study.timed("superformers", study.parallel,
                                               lambda p: train_supernet(study, *p), pairs)))
    runs = {n: superformers[(trained_as(n), 0)] for n in names}
    result: dict[str, Any] = {"config": str(args.config), "data": str(args.data), "archs": args.archs,
                              "seeds": args.seeds, "truth_seeds": args.truth_seeds, "proxies": proxies,
                              "variants": {}, "ground_truth_sha1": truth_sha1(gt_rows)}
    ranks = study.timed("ranking", study.parallel,
                        lambda n: rank_variant(study, n, runs[n], table, proxies if n == names[0] else [],
                                               folder=folder_of(n, "rank-gt")),
                        names)
    for n, corr in zip(names, ranks):
        result["variants"][n] = variant_entry(n, runs[n], corr, gt_rows)
    share_scores(result, names, proxies)
    result["ground_truth_noise"] = ground_truth_noise(gt_rows)
    earlier = earlier_results(args.out, gt_rows)
    carry_variants(result, earlier, names)
    for n in result.get("carried_over", []):  # rows from before stop 24 lack the embed breakdown
        if result["variants"][n].get("inherited_top1"):
            breakdowns(result["variants"][n], gt_rows)
    _, cost = study.space_and_cost()
    versus_default(result, gt_rows, [cost(r["arch"]).macs for r in gt_rows], **study.rank_settings())
    publish(result, study, start, args, done="ranking")  # what there is so far, in case of a stop

    searched = names if args.end_to_end == "all" else [n for n in names if n not in SCORINGS]
    budget = study.timed("end to end", _end_to_end, study, searched, runs, gt_rows, args)
    carry_end_to_end(result, earlier, budget)
    result["budget"] = budget
    for n in names:
        result["variants"][n]["end_to_end"] = budget["variants"].get(n, {})
    publish(result, study, start, args, done="end to end")
    result["stability"] = {**{n: v for n, v in (earlier.get("stability") or {}).items() if n not in stable},
                           **dict(zip(stable, study.timed("stability", study.parallel,
                                                          lambda n: _stability(study, n, runs[n], table), stable)))}
    publish(result, study, start, args, done="all")
    print(table_markdown(result))
    print(result["summary_text"])
    print("time spent by this run: " + ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items()))
    print("work in the cache: " + json.dumps(result["work_seconds"]))
    return 0


def publish(result: dict, study: Study, start: float, args: Any, done: str, prefix: str = "") -> None:
    """Write the results so far (JSON and the doc's table), marking how far the study got; this
    run's seconds and the cache's work under `prefix`ed keys (a rescore keeps the measuring runs')."""
    result["completed"] = done
    result[f"{prefix}seconds"] = {**{k: round(v, 1) for k, v in study.times.items()},
                                  "total": round(time.time() - start, 1)}
    result[f"{prefix}work_seconds"] = work_seconds(study)
    result["summary_text"] = summarise(result)
    _write(args.out, result)
    _write(record_path(args.out), study.record)
    if not args.no_doc:
        write_doc(result, args.doc)


def record_path(out: Path) -> Path:
    """The record kept beside a results file (see the module docstring)."""
    return out.with_name(f"{out.stem}_record.json")


def truth_sha1(rows: list[dict]) -> str:
    """A fingerprint of a ground-truth table: its architectures and every seed's top-1."""
    return hashlib.sha1(json.dumps([[r["arch"], r["seed_runs"]] for r in rows], sort_keys=True).encode()).hexdigest()


def same_architectures(old: dict, truth: list[dict]) -> bool:
    """Whether results `old` were measured on `truth`'s architectures, in its order, against the
    first of its seeds (the table has since grown by seeds, not by architectures)."""
    seeds = old.get("truth_seeds", old.get("seeds"))
    if not old.get("variants") or old.get("partial") or old.get("archs") != len(truth) or not seeds:
        return False
    first = [{"arch": r["arch"], "seed_runs": r["seed_runs"][:seeds]} for r in truth]
    return old.get("ground_truth_sha1") == truth_sha1(first)


def earlier_results(out: Path, truth: list[dict]) -> dict:
    """The results already in `out` if they were measured against this same ground truth, else {}.
    Results written before the table's fingerprint was kept are matched by the ground truth's
    agreement with itself (tau between seeds with its bootstrap interval, and the mean |difference|
    to full float precision), which a different table would not reproduce."""
    if not out.is_file():
        return {}
    old = json.loads(out.read_text())
    if old.get("partial") or old.get("archs") != len(truth):
        return {}
    if "ground_truth_sha1" in old:
        return old if old["ground_truth_sha1"] == truth_sha1(truth) else {}
    return old if old.get("ground_truth_noise") == ground_truth_noise(truth) else {}


def carry_variants(result: dict, earlier: dict, names: list[str]) -> None:
    """Keep the rows of variants measured earlier against the same ground truth and not measured
    now (in their old order, this run's after them); `carried_over` names them."""
    carried = [n for n in earlier.get("variants", {}) if n not in names]
    if not carried:
        return
    fresh = result["variants"]
    result["variants"] = {n: fresh.get(n) or earlier["variants"][n] for n in earlier["variants"]}
    result["variants"].update({n: v for n, v in fresh.items() if n not in result["variants"]})
    result["carried_over"] = carried
    for part in ("budget", "stability"):  # until this run's end-to-end and stability parts replace them
        if part in earlier:
            result[part] = earlier[part]
    # a carried row's superformer seconds: from the run that measured it (the cache may since hold
    # another superformer of the same name, trained again)
    then = [n for n in earlier["variants"] if n not in earlier.get("carried_over", [])]
    measured = {n: s for n, s in earlier.get("work_seconds", {}).get("superformers", {}).items()
                if n.split("-seed")[0] in then}
    result["carried_work_seconds"] = {n: s for n, s in {**measured, **earlier.get("carried_work_seconds", {})}.items()
                                      if n.split("-seed")[0] in carried}


def carry_end_to_end(result: dict, earlier: dict, budget: dict) -> None:
    """The carried variants' end-to-end rows, kept where the earlier budget and random
    architectures are this run's (else dropped: their margin was against another median)."""
    old = earlier.get("budget") or {}
    same = old.get("macs") == budget["macs"] and (old.get("random") or {}).get("archs") == budget["random"]["archs"]
    for n in result.get("carried_over", []):
        kept = old.get("variants", {}).get(n) if same else None
        result["variants"][n]["end_to_end"] = kept or {}
        if kept:
            budget["variants"][n] = kept


def partial_table(study: Study, seeds: int) -> tuple[Path, list[dict]]:
    """The ground-truth table of the architectures whose `seeds` seeds have all finished (mean
    val top-1), from the cache the ground-truth stage fills; written as ground_truth_partial.json."""
    rows = []
    for folder in sorted((study.work / "ground_truth" / "rank" / "ground_truth").glob("*")):
        runs = [folder / f"seed{s}" for s in range(seeds)]
        if all((r / "summary.json").is_file() for r in runs):
            top1 = [float(json.loads((r / "summary.json").read_text())["top1"]) for r in runs]
            rows.append({"arch": json.loads((runs[0] / "arch.json").read_text()),
                         "trained_top1": float(np.mean(top1)), "seed_runs": top1})
    if len(rows) < 3:
        raise SystemExit(f"only {len(rows)} ground-truth architectures have all {seeds} seeds: too few to rank")
    table = study.work / "ground_truth_partial.json"
    _write(table, [{"arch": r["arch"], "trained_top1": r["trained_top1"]} for r in rows])
    return table, rows


def run_partial(study: Study, names: list[str], args: Any, proxies: list[str]) -> int:
    """Rank every already-trained variant against the partial ground truth (see the docstring)."""
    start = time.time()
    table, rows = partial_table(study, args.truth_seeds or args.seeds)
    tag = _table_tag(table)
    trained = [n for n in names
               if (study.work / "supernets" / trained_as(n) / "supernet" / "summary.json").is_file()]
    if not trained:
        raise SystemExit(f"no superformer of {names} has finished under {study.work / 'supernets'}")
    result: dict[str, Any] = {"partial": True, "config": str(args.config), "data": str(args.data),
                              "archs": len(rows), "archs_planned": args.archs, "seeds": args.seeds,
                              "ground_truth": rows, "proxies": proxies, "variants": {}}
    for i, n in enumerate(trained):
        run = study.work / "supernets" / trained_as(n)
        corr = rank_variant(study, n, run, table, proxies if i == 0 else [],
                            folder=folder_of(n, f"rank-gt-partial-{tag}"))
        result["variants"][n] = variant_entry(n, run, corr, rows, folder=f"rank-gt-partial-{tag}")
    share_scores(result, trained, proxies)
    result["ground_truth_noise"] = ground_truth_noise(rows)
    result["summary_text"] = (f"PARTIAL: {len(rows)} of {args.archs} ground-truth architectures "
                              f"({args.seeds} seeds each), variants {', '.join(trained)}; no end-to-end check.\n"
                              + summarise(result))
    result["seconds"] = {"ranking": round(time.time() - start, 1)}
    out_json = args.out.with_name("fidelity_partial.json") if args.out == RESULTS else args.out
    _write(out_json, result)
    if not args.no_doc:
        write_doc(result, args.doc)
    print(table_markdown(result))
    print(result["summary_text"])
    return 0


def run_rescore(study: Study, args: Any, table: Path, gt_rows: list[dict], proxies: list[str]) -> int:
    """Train no superformer but the second seeds `--stability` names: rank every row of the results
    file again, from the inherited top-1 per architecture it keeps, against the ground truth as it
    is now (the same architectures with more seeds); the proxies and baselines ranked once more by
    `vitas rank` without a superformer (training-free). A `--stability` variant's second
    superformer (trained, or found in the cache) is ranked too and replaces its stability entry:
    its tau to the kept first seed's scores. The end-to-end check does not depend on the table's
    seeds and is kept."""
    from scipy.stats import kendalltau

    from vitas.core.config import load_config
    from vitas.search.ranking.stats import banded_estimate, estimate
    from vitas.search.ranking.study import INHERITED, TRAINED, report

    start = time.time()
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if not same_architectures(old, gt_rows):
        raise SystemExit(f"{args.out} was not measured on this ground truth's architectures: nothing to rescore")
    sizes = study.work / f"rank-gt-sizes-{_table_tag(table)}"
    if not (sizes / "rank" / "correlations.json").is_file():
        study.stage("rank", sizes, f"rank.proxies={json.dumps(proxies)}", f"rank.targets=[{TRAINED}]",
                    "rank.inherited=false", options=("--ground-truth", str(table)))
    shared = json.loads((sizes / "rank" / "correlations.json").read_text())["results"][TRAINED]
    by_key = {_arch_key(json.loads(r["arch"])): r for r in _csv(sizes / "rank" / "ranking.csv")}
    sized = [by_key[_arch_key(r["arch"])] for r in gt_rows]
    target = [r["trained_top1"] for r in gt_rows]
    macs = [float(r["macs"]) for r in sized]
    cfg = load_config(study.config, study.base)
    bands = min(cfg.rank.bands, len(gt_rows))
    result = {**old, "truth_seeds": _seeds_of(gt_rows), "ground_truth_sha1": truth_sha1(gt_rows), "variants": {}}
    if old["ground_truth_sha1"] != result["ground_truth_sha1"]:  # else: the table it was rescored from stays
        result["rescored"] = {"from_ground_truth_sha1": old["ground_truth_sha1"],
                              "from_truth_seeds": old.get("truth_seeds", old["seeds"])}
    for name, v in old["variants"].items():
        scores = v.get("inherited_top1") or []
        if len(scores) != len(gt_rows) or None in scores:
            print(f"{name}: no inherited top-1 for every architecture, left out of the rescored table")
            continue
        rows = [{"params": float(r["params"]), "macs": float(r["macs"]), INHERITED: x, TRAINED: t}
                for r, x, t in zip(sized, scores, target)]
        entry = report(rows, [INHERITED], [TRAINED], cfg)[TRAINED][INHERITED]
        result["variants"][name] = {**v, "rank": {**v["rank"], "results": {TRAINED: {**shared, INHERITED: entry}}}}
        result["variants"][name].pop("vs_default", None)
        breakdowns(result["variants"][name], gt_rows)
    versus_default(result, gt_rows, macs, bands=cfg.rank.bands, n_resamples=cfg.rank.bootstrap)
    stable = [n for n in args.stability.split(",") if n in result["variants"]]
    again = dict(zip(stable, study.timed("stability", study.parallel,
                                         lambda n: second_seed(study, n, table, gt_rows), stable)))
    result["stability"] = {}
    for name, st in {**(old.get("stability") or {}), **again}.items():  # seed 1's scores kept since stop 28
        first, second = (result["variants"].get(name) or {}).get("inherited_top1"), st.get("inherited_top1_seed1")
        pair = [x if x and None not in x else None for x in (first, second)]
        if name in again:
            st = {**st, "tau_between_seeds": float(kendalltau(*pair).statistic)}
        result["stability"][name] = {
            **st, "tau_vs_truth": [None if x is None else estimate(x, target) for x in pair],
            "banded_vs_truth": [None if x is None else banded_estimate(x, target, macs, bands) for x in pair]}
    result["ground_truth_noise"] = ground_truth_noise(gt_rows)
    publish(result, study, start, args, done="rescored", prefix="rescore_")
    print(table_markdown(result))
    print(result["summary_text"])
    return 0


def second_seed(study: Study, name: str, table: Path, truth: list[dict]) -> dict:
    """Variant `name`'s superformer of supernet.seed 1 (trained once, cached) ranked against
    `table`: its inherited top-1 per architecture in the table's order (`inherited_top1_seed1`)."""
    run = train_supernet(study, name, seed=1)
    folder = f"rank-gt-{_table_tag(table)}"  # one per table
    rank_variant(study, name, run, table, [], folder=folder)
    return {"inherited_top1_seed1": _in_table_order(run / folder / "rank" / "ranking.csv", truth),
            "seed1_train_seconds": json.loads((run / "supernet" / "summary.json").read_text())["train_seconds"]}


def _end_to_end(study: Study, names: list[str], runs: dict[str, Path], gt_rows: list[dict], args: Any) -> dict:
    """GA choice of each variant vs the median of random architectures, inside a middle budget."""
    _, cost = study.space_and_cost()
    macs = sorted(cost(r["arch"]).macs for r in gt_rows)
    budget = (int(np.quantile(macs, 1 / 3)), int(np.quantile(macs, 2 / 3)))
    randoms = random_archs(study, budget, args.random)
    seeds = list(range(args.seeds))
    random_top1 = study.parallel(lambda item: retrain(study, *item), [(a, s) for a in randoms for s in seeds])
    per_random = [float(np.mean(random_top1[i * len(seeds):(i + 1) * len(seeds)])) for i in range(len(randoms))]
    spread = [float(np.std(random_top1[i * len(seeds):(i + 1) * len(seeds)], ddof=1)) for i in range(len(randoms))] if len(seeds) > 1 else [0.0]
    median = float(statistics.median(per_random))
    choices = study.parallel(lambda n: search_choice(study, n, runs[n], budget), names)
    out = {"macs": list(budget), "random": {"archs": randoms, "top1": per_random, "median": median,
                                            "seed_spread": float(np.mean(spread))}, "variants": {}}

    def retrained(arch: dict) -> dict:
        top1 = study.parallel(lambda s: retrain(study, arch, s), seeds)
        mean, sd = float(np.mean(top1)), float(np.std(top1, ddof=1)) if len(top1) > 1 else 0.0
        return {"arch": arch, "top1": top1, "mean": mean, "margin": mean - median, "seed_spread": sd,
                "beats_random": bool(mean - median > max(np.mean(spread), sd))}

    out["params"] = retrained(size_choice(study, budget))
    for n, arch in zip(names, choices):
        out["variants"][n] = retrained(arch)
    return out


def _stability(study: Study, name: str, run: Path, table: Path) -> dict:
    """Kendall tau between the inherited accuracies of two superformers of variant `name` trained
    with other seeds, each one's tau (global and banded) against the ground truth, and the second
    one's inherited top-1 per ground-truth architecture (in the table's order, so that later
    comparisons can be paired over both seeds without the superformers)."""
    from scipy.stats import kendalltau

    other = train_supernet(study, name, seed=1)
    a = rank_variant(study, name, run, table, [])
    b = rank_variant(study, name, other, table, [])
    x = [float(r["inherited_top1"]) for r in _csv(run / "rank-gt" / "rank" / "ranking.csv")]
    y = [float(r["inherited_top1"]) for r in _csv(other / "rank-gt" / "rank" / "ranking.csv")]
    tau = kendalltau(x, y).statistic
    return {"tau_between_seeds": float(tau),
            "inherited_top1_seed1": _in_table_order(other / "rank-gt" / "rank" / "ranking.csv",
                                                    json.loads(table.read_text())),
            "tau_vs_truth": [_kendall(a, "trained_top1", "inherited_top1")["estimate"],
                             _kendall(b, "trained_top1", "inherited_top1")["estimate"]],
            "banded_vs_truth": [_kendall(a, "trained_top1", "inherited_top1", banded=True)["estimate"],
                                _kendall(b, "trained_top1", "inherited_top1", banded=True)["estimate"]]}


if __name__ == "__main__":
    sys.exit(main())
