"""Search spread over processes and jobs: 2 gloo ranks under torchrun, and a submitit job array,
each give exactly the single-process search (same scores, same path, same choice).

Run as a script, this file is the rank worker: `python tests/test_search_dist.py BASE OUT`.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vitas.core.checkpoint import save_checkpoint
from vitas.core.config import load_config
from vitas.core.data import write_digits
from vitas.supernet.model import Superformer
from vitas.supernet.space import space_from_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "yamls" / "demo-digits.yaml"
SEARCH = ["search.population=6", "search.generations=1", "search.macs_max=2000000"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "SUBMITIT_EXECUTOR", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS")


def tiny_cfg(base: Path, out: Path, *overrides: str):
    """Demo config on the tiny data set (7 hold-out images per class: 70, odd shards over 2 ranks)."""
    return load_config(DEMO, [f"output_dir={out}", f"data.root={base / 'digits'}",
                              "data.holdout_per_class=7", "search.batch_size=16",
                              f"supernet.checkpoint={base / 'supernet.pth'}", *SEARCH, *overrides])


def worker(base: Path, out: Path) -> None:
    """One rank: the whole `vitas search` stage, then this rank's own (un-broadcast) scores."""
    from vitas.core import dist
    from vitas.core.stage import execute
    from vitas.search.runner import STAGE
    from vitas.search.scoring.accuracy import AccuracyScorer

    dist.init_distributed()  # joined here, so execute leaves the group to this worker
    summary = execute(STAGE, tiny_cfg(base, out))
    scorer = AccuracyScorer(tiny_cfg(base, out))
    archs = [scorer.space.sample(np.random.default_rng(i)) for i in range(4)]
    own = scorer.compute(archs)  # no cache, no broadcast: this rank's all-reduced numbers
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps({"summary": summary, "own": own}))
    dist.cleanup()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits data and a seeded, untrained superformer checkpoint."""
    base = tmp_path_factory.mktemp("dist")
    write_digits(base / "digits")
    cfg = tiny_cfg(base, base / "unused")
    space = space_from_config(cfg)
    torch.manual_seed(0)
    save_checkpoint({"model": Superformer(space, 10).state_dict(), "config": cfg.to_dict(),
                     "space": space.spec(), "epoch": 1}, base / "supernet.pth")
    return base


def single_process(base: Path, out: Path, *overrides: str) -> dict:
    from vitas.core.stage import execute
    from vitas.search.runner import STAGE

    execute(STAGE, tiny_cfg(base, out, *overrides))
    return json.loads((out / "search" / "result.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def without_config(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "config"}


def test_two_gloo_ranks_score_and_search_like_one_process(base: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, str(base), str(out)],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # every rank saw the same search and the same all-reduced scores

    single = single_process(base, tmp_path / "single")
    from vitas.search.scoring.accuracy import AccuracyScorer

    scorer = AccuracyScorer(tiny_cfg(base, tmp_path / "single"))
    archs = [scorer.space.sample(np.random.default_rng(i)) for i in range(4)]
    assert ranks[0]["own"] == scorer.compute(archs)
    assert all(m["images"] == 70 for m in ranks[0]["own"])
    ddp = json.loads((out / "search" / "result.json").read_text())
    assert without_config(ddp) == without_config(single)
    assert ranks[0]["summary"]["arch"] == single["chosen"]["arch"]


def test_array_job_scoring_equals_in_process_scoring(base: Path, tmp_path: Path) -> None:
    """search.array_jobs=2 on submitit's local executor: chunks scored in other processes."""
    over = ["search.generations=0", "launch.executor=local", "launch.timeout_min=10"]
    arrayed = single_process(base, tmp_path / "array", "search.array_jobs=2", *over)
    local = single_process(base, tmp_path / "local", *over)
    assert without_config(arrayed) == without_config(local)
    logs = list((tmp_path / "array" / "search" / "submitit").glob("*_log.out"))
    assert len(logs) == 2  # two array elements ran


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
