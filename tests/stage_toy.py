"""A toy stage for the launch tests: distributed all-reduce plus resumable epochs.

`run(cfg)` joins the process group (`core.dist.init_distributed`, gloo on CPU) from the environment
that `core.launch.StageJob` exported, all-reduces each rank's `rank + 1`, writes `rank<r>.json` per rank, then counts
`cfg.supernet.epochs` epochs (each sleeps `VITAS_TOY_EPOCH_S` seconds), saving
`<output_dir>/toy/last.pth` after each one and resuming from it when requeued.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from vitas.core import dist
from vitas.core.config import Config


def _save(state: dict, path: Path) -> None:
    """Write atomically, so that an interruption never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def run(cfg: Config) -> dict:
    """Run the toy stage; returns what rank 0 saw (world size, all-reduced sum, history)."""
    info = dist.init_distributed()
    rank, world = info.rank, info.world_size
    out = cfg.stage_dir("toy")
    out.mkdir(parents=True, exist_ok=True)
    total = dist.all_reduce_sum(torch.tensor([float(rank + 1)]))
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "world_size": world, "sum": total.item(), "job": os.environ.get("SLURM_JOB_ID")}))

    last = out / "last.pth"
    state = torch.load(last, weights_only=True) if last.exists() else {"epoch": 0, "history": [], "starts": []}
    state["starts"].append(state["epoch"])
    for epoch in range(state["epoch"], cfg.supernet.epochs):
        time.sleep(float(os.environ.get("VITAS_TOY_EPOCH_S", "0")))
        dist.barrier()  # all ranks finish the epoch before it counts
        state["epoch"] = epoch + 1
        state["history"].append(epoch)
        if rank == 0:
            _save(state, last)
    dist.barrier()
    dist.cleanup()
    return {"world_size": world, "sum": total.item(), **state}


def square(cfg: Config, x: int) -> int:
    """An array element for `submit_array`: one item in, one result out."""
    return x * x
