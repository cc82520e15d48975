"""Own ground truth: each architecture trained from scratch for E epochs with S seeds.

Every (architecture, seed) trains into its own folder `rank/ground_truth/<arch key>/seed<s>/`
(`retrain.train.train_arch`: resumable, its `summary.json` is the cache), named by a hash of the
canonical architecture so a table of other architectures never reuses a wrong folder. The target
is the mean val top-1 over the seeds; the seed spread (sample standard deviation) is recorded
beside it. On Slurm every run is one array task; elsewhere they run in sequence in this process.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from vitas.core.config import Config
from vitas.core.launch import resolve_executor, submit_array, wait_result
from vitas.core.layout import RANK, run_layout
from vitas.core.lock import StageLock
from vitas.core.logs import progress
from vitas.retrain.train import train_arch


def arch_folder(cfg: Config, key: str) -> Path:
    """`rank/ground_truth/<12 hex digits of the canonical key's sha1>`."""
    return run_layout(cfg.output_dir).rank_ground_truth / hashlib.sha1(key.encode()).hexdigest()[:12]


def train_one(cfg: Config, item: tuple[str, dict, int, int]) -> float:
    """Array-job entry: val top-1 of `item` = (canonical key, arch, epochs, seed) trained from
    scratch into its own (locked) folder."""
    key, arch, epochs, seed = item
    folder = arch_folder(cfg, key) / f"seed{seed}"
    run_cfg = dataclasses.replace(cfg, retrain=dataclasses.replace(cfg.retrain, seed=seed, init="scratch"))
    with StageLock(folder, "ground-truth training"):
        if not (folder / "arch.json").is_file():
            (folder / "arch.json").write_text(json.dumps(arch) + "\n")
        return float(train_arch(run_cfg, arch, folder, epochs)["top1"])


def ground_truth(cfg: Config, keys: list[str], archs: list[dict], epochs: int, seeds: int) -> dict[str, Any]:
    """{"mean": [...], "std": [...], "runs": [[top1 per seed], ...]} of each architecture after
    `epochs` epochs from scratch with seeds retrain.seed, retrain.seed + 1, ..."""
    items = [(k, a, epochs, cfg.retrain.seed + s) for k, a in zip(keys, archs) for s in range(seeds)]
    if resolve_executor(cfg.launch) == "slurm":
        jobs = submit_array(cfg, "vitas.search.ranking.ground_truth:train_one", items, stage=RANK)
        top1 = [float(wait_result(job)) for job in jobs]
    else:
        top1 = [train_one(cfg, item) for item in progress(items, desc=f"ground truth ({epochs} epochs)")]
    runs = [top1[i * seeds:(i + 1) * seeds] for i in range(len(archs))]
    return {"mean": [float(np.mean(r)) for r in runs],
            "std": [float(np.std(r, ddof=1)) if len(r) > 1 else None for r in runs], "runs": runs}
