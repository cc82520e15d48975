"""Superformer training on the real local Slurm (slurm/local-cluster.sh): a 2-task job through
submitit, preempted in the middle (submitit's `job._interrupt()`: checkpoint() requeues it), resumes
from last.pth and finishes with the right epoch count; `vitas submit train-supernet` requeued by
`scontrol requeue` does the same; and slurm/train-supernet.sbatch runs under `sbatch --wait`.
Without a cluster these skip, or fail under VITAS_REQUIRE_SLURM=1 (the `slurm_cluster` fixture).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit

from vitas.core.checkpoint import load_checkpoint
from vitas.core.errors import UserError
from vitas.core.launch import wait_result
from slurm_setup import release_requeued
from train_setup import ROOT, cli, tiny_config, train_env, write_yaml

pytestmark = pytest.mark.slurm
EPOCHS, STEPS = 3, 5  # tiny_config: 5 steps per epoch


def slurm_tree(out: Path, data: Path) -> dict:
    tree = tiny_config(out, data, epochs=EPOCHS, save_every_steps=1)
    tree["launch"] = {"executor": "slurm", "tasks_per_node": 2, "cpus_per_task": 1, "timeout_min": 10}
    return tree


def wait_for_step(last: Path, step: int, timeout_s: float) -> None:
    """Poll last.pth until training has saved global step `step`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if load_checkpoint(last)["step"] >= step:
                return
        except UserError:  # not written yet
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{last} did not reach step {step} in {timeout_s}s")


def check_resumed(summary: dict, out: Path, at_least: int) -> None:
    """Two ranks, resumed from a saved mid-run step (not from zero), the full epoch count."""
    assert summary["world_size"] == 2
    assert summary["epochs"] == EPOCHS and summary["steps"] == EPOCHS * STEPS
    epoch, step = summary["resumed_from"]
    assert step >= at_least and 0 <= epoch < EPOCHS
    state = load_checkpoint(out / "supernet" / "last.pth")
    assert (state["epoch"], state["step"]) == (EPOCHS, EPOCHS * STEPS)
    steps = [json.loads(line)["step"] for line in (out / "supernet" / "log.jsonl").read_text().splitlines()]
    assert steps[0] == 1 and steps.count(1) == 1  # the second start did not begin at step 1


def test_two_task_job_preempted_resumes(tmp_path: Path, tiny_digits: Path, slurm_cluster: None) -> None:
    """`vitas submit train-supernet` (2 tasks), preempted at step >= 3 (SIGTERM + USR2: submitit's
    checkpoint() requeues the job): the second start resumes from last.pth and finishes."""
    tree = slurm_tree(tmp_path, tiny_digits)
    proc = subprocess.run(cli("submit", "train-supernet", "-c", str(write_yaml(tree, tmp_path / "s.yaml"))),
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["executor"] == "slurm" and report["stage"] == "train-supernet"
    job = submitit.SlurmJob(folder=report["folder"], job_id=report["job_id"])
    wait_for_step(tmp_path / "supernet" / "last.pth", 3, timeout_s=120)
    job._interrupt()
    release_requeued(job.job_id, timeout_s=60)
    check_resumed(wait_result(job, timeout_s=240), tmp_path, at_least=3)
    assert "resuming from" in Path(job.paths.stderr).read_text()


def test_sbatch_script(tmp_path: Path, tiny_digits: Path, slurm_cluster: None) -> None:
    """slurm/train-supernet.sbatch: two srun tasks of `vitas train-supernet`, one epoch."""
    cfg = write_yaml(tiny_config(tmp_path, tiny_digits, epochs=1), tmp_path / "b.yaml")
    env = train_env()
    env["VITAS_PYTHON"] = sys.executable
    proc = subprocess.run(["sbatch", "--wait", f"--output={tmp_path}/sbatch-%j.out",
                           "slurm/train-supernet.sbatch", "-c", str(cfg)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = "".join(p.read_text() for p in tmp_path.glob("sbatch-*.out"))
    assert proc.returncode == 0, proc.stderr + log[-3000:]
    assert "2 task(s)" in log
    summary = json.loads((tmp_path / "supernet" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    reports = [json.loads(line) for line in log.splitlines() if line.startswith('{"max_top1"')]
    assert len(reports) == 1 and reports[0]["epochs"] == 1  # printed by rank 0 only
