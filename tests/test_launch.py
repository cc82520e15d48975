"""core.launch and `vitas submit` on submitit's local executor and on a real Slurm (no mocks).

The submitted stage is tests/stage_toy.py: a gloo all-reduce across the job's tasks, then epochs
saved to `<output_dir>/toy/last.pth` and resumed from it after a requeue.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from submitit.core.utils import UncompletedJobError

from vitas.core.config import Config, load_config
from vitas.core.errors import UserError
from vitas.core.launch import StageJob, create_executor, submit_array, submit_stage, wait_result
from slurm_setup import release_requeued
from vitas.cli import main

TESTS = Path(__file__).resolve().parent
TOY = "stage_toy:run"


@pytest.fixture
def toy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs inherit this environment: they can import stage_toy, and each epoch takes a while."""
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", f"{TESTS}{os.pathsep}{path}" if path else str(TESTS))
    monkeypatch.setenv("VITAS_TOY_EPOCH_S", "0.5")


def make_cfg(out: Path, *overrides: str) -> Config:
    return load_config(None, [f"output_dir={out}", "launch.timeout_min=5", *overrides])


def read_ranks(cfg: Config) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(cfg.stage_dir("toy").glob("rank*.json"))]


def wait_for_epoch(cfg: Config, epoch: int, timeout_s: float) -> None:
    """Poll the toy's last.pth until it has reached `epoch`."""
    last = cfg.stage_dir("toy") / "last.pth"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if torch.load(last, weights_only=True)["epoch"] >= epoch:
                return
        except FileNotFoundError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"toy stage did not reach epoch {epoch} in {timeout_s}s")


def check_two_ranks(cfg: Config, result: dict, epochs: int) -> None:
    assert result["world_size"] == 2 and result["sum"] == 3.0  # (0 + 1) + (1 + 1)
    assert [(r["rank"], r["world_size"], r["sum"]) for r in read_ranks(cfg)] == [(0, 2, 3.0),
                                                                               (1, 2, 3.0)]
    assert result["history"] == list(range(epochs))


def test_local_two_tasks_all_reduce(tmp_path: Path, toy_env: None) -> None:
    cfg = make_cfg(tmp_path, "launch.executor=local", "launch.tasks_per_node=2",
                   "supernet.epochs=2")
    job = submit_stage(cfg, "toy", TOY)
    check_two_ranks(cfg, wait_result(job, timeout_s=120), epochs=2)
    assert (tmp_path / "toy" / "submitit").is_dir()


def test_local_array(tmp_path: Path, toy_env: None) -> None:
    cfg = make_cfg(tmp_path, "launch.executor=local")
    jobs = submit_array(cfg, "stage_toy:square", [7, 9], stage="search")
    assert [wait_result(job, timeout_s=120) for job in jobs] == [49, 81]
    assert (tmp_path / "search" / "submitit").is_dir()


def test_slurm_two_tasks_all_reduce(tmp_path: Path, toy_env: None, slurm_cluster: None) -> None:
    cfg = make_cfg(tmp_path, "launch.executor=slurm", "launch.tasks_per_node=2",
                   "supernet.epochs=2")
    job = submit_stage(cfg, "toy", TOY)
    check_two_ranks(cfg, wait_result(job, timeout_s=120), epochs=2)
    assert {r["job"] for r in read_ranks(cfg)} == {job.job_id}


def test_slurm_impossible_job_is_reported(tmp_path: Path, toy_env: None,
                                          slurm_cluster: None) -> None:
    cfg = make_cfg(tmp_path, "launch.executor=slurm", f"launch.cpus_per_task={4 * os.cpu_count()}")
    job = submit_stage(cfg, "toy", TOY)
    try:
        with pytest.raises(UncompletedJobError, match="can never start"):
            wait_result(job, timeout_s=30)
    finally:
        job.cancel()


def test_slurm_refused_submission_is_a_user_error_and_leaves_nothing(tmp_path: Path,
                                                                     slurm_cluster: None) -> None:
    cfg = make_cfg(tmp_path / "run", "launch.executor=slurm", "launch.partition=nowhere")
    with pytest.raises(UserError, match="not submitted: .*[Ii]nvalid partition"):
        submit_stage(cfg, "toy", TOY)
    with pytest.raises(UserError, match="not submitted"):
        submit_array(cfg, "stage_toy:square", [1], stage="search")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("how", ["interrupt", "scontrol"])
def test_slurm_requeue_resumes(tmp_path: Path, toy_env: None, slurm_cluster: None,
                               how: str) -> None:
    """Preempted (submitit's checkpoint()) or requeued by an admin: the job runs again under the
    same id, resumes from last.pth, and every epoch runs exactly once. submitit ignores the SIGTERM
    of `scontrol requeue`, so the job must outlast KillWait (10 s) to be killed and requeued."""
    epochs = 10 if how == "interrupt" else 26
    cfg = make_cfg(tmp_path, "launch.executor=slurm", "launch.tasks_per_node=2",
                   f"supernet.epochs={epochs}")
    job = submit_stage(cfg, "toy", TOY)
    wait_for_epoch(cfg, 2, timeout_s=120)  # generous: the one node may be busy
    if how == "interrupt":
        job._interrupt()
    else:
        subprocess.run(["scontrol", "requeue", job.job_id], check=True)
    release_requeued(job.job_id, timeout_s=60)
    result = wait_result(job, timeout_s=120)
    check_two_ranks(cfg, result, epochs)
    assert len(result["starts"]) == 2 and result["starts"][0] == 0 and result["starts"][1] >= 2


def test_stage_job_checkpoint_is_the_same_stage(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path).to_dict()
    delayed = StageJob(TOY, cfg).checkpoint()
    assert isinstance(delayed.function, StageJob)
    assert (delayed.function.entry, delayed.function.config) == (TOY, cfg)


@pytest.mark.parametrize("overrides, message", [
    (["launch.executor=cloud"], "launch.executor must be one of"),
    (["launch.executor=local", "launch.nodes=2"], "launch.nodes=2 needs Slurm"),
    (["launch.tasks_per_node=0"], "launch.tasks_per_node must be >= 1"),
    (["launch.mem_gb=0"], "launch.mem_gb must be null or >= 1"),
    (["launch.job_name=two words"], "launch.job_name"),
])
def test_bad_launch_settings(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        create_executor(make_cfg(tmp_path, *overrides).launch, tmp_path)


def test_slurm_asked_without_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match="sbatch.* not on PATH"):
        create_executor(make_cfg(tmp_path, "launch.executor=slurm").launch, tmp_path)


def test_bad_entry_and_relative_output(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "launch.executor=local")
    with pytest.raises(UserError, match="package.module:function"):
        submit_stage(cfg, "toy", "stage_toy.run")
    cfg.output_dir = "runs/relative"
    with pytest.raises(UserError, match="absolute"):
        submit_stage(cfg, "toy", TOY)


def test_cli_submit_wait(tmp_path: Path, toy_env: None, capsys: pytest.CaptureFixture) -> None:
    yaml_path = tmp_path / "x.yaml"
    yaml_path.write_text(f"output_dir: {tmp_path}\nlaunch: {{executor: local}}\n")
    code = main(["submit", "evaluate", "--entry", TOY, "-c", str(yaml_path),
                 "launch.tasks_per_node=2", "supernet.epochs=1", "--wait"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "submitted evaluate" in out and str(tmp_path / "evaluate" / "submitit") in out
    assert len(read_ranks(load_config(yaml_path))) == 2


def test_cli_submit_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    yaml_path = tmp_path / "x.yaml"
    yaml_path.write_text(f"output_dir: {tmp_path}\n")
    assert main(["submit", "evaluate", "--entry", "no_such_module:run", "-c", str(yaml_path)]) == 2
    assert "module 'no_such_module'" in capsys.readouterr().err
    assert main(["submit", "evaluate", "--entry", TOY, "-c", str(yaml_path),
                 "launch.executor=local", "launch.nodes=2"]) == 2
    assert "launch.nodes=2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["submit", "toy", "-c", str(yaml_path)])
