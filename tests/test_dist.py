"""Distributed set-up: no-ops in one process; real 2-process gloo groups under torchrun, Slurm-style
and submitit-style environments (collectives, broadcast, rank-0-only logging, loader shards).

Run as a script, this file is the worker: `python tests/test_dist.py OUT_DIR [loader]`.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitas.core.dist import (all_reduce_mean, all_reduce_sum, barrier, broadcast_object, cleanup,
                       export_env, init_distributed, is_distributed, is_main, main_only)

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "SUBMITIT_EXECUTOR", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS",
               "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_NODEID")


def worker(out: Path, check_loader: bool) -> None:
    """One rank: run every helper and write what it saw to OUT/rank<r>.json."""
    from vitas.core.logs import RunLogger, progress

    info = init_distributed()
    seen = {
        "rank": info.rank, "world": info.world_size, "local_rank": info.local_rank,
        "device": str(info.device), "distributed": is_distributed(), "is_main": is_main(),
        "mean": all_reduce_mean(torch.tensor([info.rank + 1.0, 10.0 * info.rank])).tolist(),
        "sum": all_reduce_sum(torch.tensor([info.rank + 1])).tolist(),
        "obj": broadcast_object({"arch": [1, "x"]} if info.rank == 0 else None),
        "main_only": main_only(lambda: "ran")(),
    }
    with RunLogger(out / "logs") as logger:
        logger.log(1, rank=info.rank)
    for _ in progress(range(3), desc=f"progress-rank{info.rank}"):
        pass
    if check_loader:
        from torch.utils.data import TensorDataset

        from vitas.core.data import create_loader

        data = TensorDataset(torch.arange(11))
        train = create_loader(data, 2, shuffle=True, seed=0, drop_last=True, workers=0)
        train.sampler.set_epoch(0)
        seen["train"] = [int(v) for (batch,) in train for v in batch]
        evaluation = create_loader(data, 4, shuffle=False, workers=0)
        seen["eval"] = [int(v) for (batch,) in evaluation for v in batch]
    barrier()
    (out / f"rank{info.rank}.json").write_text(json.dumps(seen))
    cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}


def check_ranks(out: Path, stdout: str) -> list[dict]:
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r, seen in enumerate(ranks):
        assert seen["rank"] == r and seen["world"] == 2 and seen["distributed"]
        assert seen["device"] == "cpu" and seen["is_main"] == (r == 0)
        assert seen["mean"] == [1.5, 5.0] and seen["sum"] == [3]
        assert seen["obj"] == {"arch": [1, "x"]}
        assert seen["main_only"] == ("ran" if r == 0 else None)
    lines = (out / "logs" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["rank"] for line in lines] == [0.0]  # rank 1 wrote nothing
    assert len(list((out / "logs").glob("events.out.tfevents.*"))) == 1
    assert "progress-rank0" in stdout and "progress-rank1" not in stdout
    return ranks


def test_single_process_is_a_no_op(monkeypatch):
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0) and not is_distributed()
    x = torch.tensor([2.0, 4.0])
    assert torch.equal(all_reduce_mean(x), x) and torch.equal(all_reduce_sum(x), x)
    assert broadcast_object({"a": 1}) == {"a": 1} and is_main()
    assert main_only(lambda: 7)() == 7
    barrier()
    cleanup()


def test_torchrun_two_processes(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__)), str(tmp_path), "loader"]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = check_ranks(tmp_path, proc.stdout)
    train = [r["train"] for r in ranks]
    assert len(train[0]) == len(train[1]) == 4 and not set(train[0]) & set(train[1])
    assert sorted(ranks[0]["eval"] + ranks[1]["eval"]) == list(range(11))  # each image once


@pytest.mark.parametrize("style", ["slurm", "submitit"])
def test_scheduler_environment_two_processes(tmp_path, style):
    """Two plain processes carrying the variables `srun` (or submitit's local executor) sets."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = clean_env()
        if style == "slurm":
            env.update(SLURM_JOB_ID="4242", SLURM_PROCID=str(rank), SLURM_NTASKS="2",
                       SLURM_STEP_NUM_TASKS="2", SLURM_LOCALID=str(rank), SLURM_NODEID="0",
                       SLURM_JOB_NODELIST="localhost", MASTER_PORT=port)
        else:
            env.update(SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_JOB_ID="4242",
                       SUBMITIT_LOCAL_NTASKS="2", SUBMITIT_LOCAL_JOB_NUM_NODES="1",
                       SUBMITIT_LOCAL_NODEID="0", SUBMITIT_LOCAL_GLOBALID=str(rank),
                       SUBMITIT_LOCAL_LOCALID=str(rank), MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__)), str(tmp_path)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    check_ranks(tmp_path, "".join(out for out, _ in outputs))


def test_slurm_batch_script_is_one_process(monkeypatch):
    """In an sbatch script (no `srun` step) --ntasks=4 must not make one process wait for four."""
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[03-04]")
    export_env()
    assert os.environ["WORLD_SIZE"] == "1" and os.environ["MASTER_ADDR"] == "node03"
    assert 20000 <= int(os.environ["MASTER_PORT"]) < 60000


if __name__ == "__main__":
    worker(Path(sys.argv[1]), check_loader=sys.argv[2:] == ["loader"])
