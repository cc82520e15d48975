"""Launching a stage through submitit: on Slurm where `sbatch` exists, else submitit's local executor.

A job is named by an entry string `"module:attribute"`: a `Stage` (e.g.
`"vitas.supernet.train:STAGE"`), run through `core.stage.execute`, or a function taking a
`core.config.Config` (and an item, for array jobs). The string is resolved with importlib inside
the job, so core never imports a stage. Each task exports the torch.distributed environment
(`MASTER_ADDR`, `MASTER_PORT`, `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`) before
calling it; `execute` then sets up the process group from it (`core.dist.init_distributed`, env://). All GPUs of a node stay visible
to each task; a task picks `cuda:LOCAL_RANK`, as under torchrun.

The submitted callable implements submitit's `checkpoint()`: on preemption or timeout Slurm (or the
local executor) requeues the same job, and the stage resumes from `<output_dir>/<stage>/last.pth`.
Submitit's own files (pickles, stdout/stderr per task) go to `<output_dir>/<stage>/submitit/`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

from vitas.core.config import Config, LaunchConfig, config_from_dict
from vitas.core.errors import UserError
from vitas.core.stage import Stage, execute



def slurm_available() -> bool:
    """True when this machine can submit to Slurm (`sbatch` is on PATH)."""
    return shutil.which("sbatch") is not None


def resolve_executor(launch_cfg: LaunchConfig) -> str:
    """`launch.executor` made concrete: "slurm" or "local". UserError when Slurm is asked but absent."""
    kind = launch_cfg.executor
    if kind == "slurm" and not slurm_available():
        raise UserError("launch.executor is 'slurm' but `sbatch` is not on PATH "
                        "(use launch.executor=local, or start one with slurm/local-cluster.sh)")
    if kind == "auto":
        return "slurm" if slurm_available() else "local"
    return kind


def _check_launch(launch_cfg: LaunchConfig, kind: str) -> None:
    """UserErrors for settings no executor can honour, naming the key (value ranges are the
    config schema's)."""
    if not launch_cfg.job_name or any(c.isspace() for c in launch_cfg.job_name):
        raise UserError(f"launch.job_name must be a non-empty word, got {launch_cfg.job_name!r}")
    if kind == "local" and launch_cfg.nodes != 1:
        raise UserError(f"launch.nodes={launch_cfg.nodes} needs Slurm; the local executor runs "
                        "on one node (set launch.nodes=1)")


def create_executor(launch_cfg: LaunchConfig, folder: str | os.PathLike) -> submitit.AutoExecutor:
    """A submitit executor for `launch_cfg` writing its files to `folder`.

    `launch.executor`: "slurm" (needs `sbatch`), "local" (submitit's local executor: one node, one
    process per task) or "auto" (Slurm when `sbatch` exists). `max_requeue` bounds requeues after
    timeouts; preemptions always requeue.
    """
    kind = resolve_executor(launch_cfg)
    _check_launch(launch_cfg, kind)
    executor = submitit.AutoExecutor(folder=folder, cluster=kind,
                                     slurm_max_num_timeout=launch_cfg.max_requeue,
                                     local_max_num_timeout=launch_cfg.max_requeue)
    params: dict[str, Any] = {
        "name": launch_cfg.job_name,
        "timeout_min": launch_cfg.timeout_min,
        "nodes": launch_cfg.nodes,
        "tasks_per_node": launch_cfg.tasks_per_node,
        "cpus_per_task": launch_cfg.cpus_per_task,
        "mem_gb": launch_cfg.mem_gb,
    }
    if kind == "slurm":
        # Slurm without GRES rejects --gpus-per-node=0, so the flag is only sent when GPUs are asked.
        if launch_cfg.gpus_per_node > 0:
            params["gpus_per_node"] = launch_cfg.gpus_per_node
        params["slurm_partition"] = launch_cfg.partition
        params["slurm_array_parallelism"] = launch_cfg.array_parallelism
    else:
        # The local executor exposes exactly gpus_per_node GPUs (0: CPU only).
        params["gpus_per_node"] = launch_cfg.gpus_per_node
    executor.update_parameters(**params)
    return executor


def check_entry(entry: str) -> None:
    """`entry` must read "package.module:function" (checked without importing anything)."""
    module, sep, func = entry.partition(":")
    if not sep or not func.isidentifier() or not all(p.isidentifier() for p in module.split(".")):
        raise UserError(f"stage entry {entry!r} is not of the form 'package.module:function'")


def resolve_entry(entry: str) -> Callable[..., Any]:
    """Import "module:function" and return the function."""
    check_entry(entry)
    module, _, func = entry.partition(":")
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"stage entry {entry!r} cannot be loaded: {exc}") from None
    if not (callable(fn) or isinstance(fn, Stage)):
        raise UserError(f"stage entry {entry!r} is neither a Stage nor callable")
    return fn


class StageJob:
    """The callable submitit pickles: runs the entry's Stage (or `entry(Config, *args)`) in each
    task of the job.

    Holds only the entry string and the resolved config as a plain dict, so that the pickle does
    not depend on stage code. `checkpoint()` makes submitit requeue the same job on preemption or
    timeout; the stage resumes from its own `last.pth`.
    """

    def __init__(self, entry: str, config: dict) -> None:
        check_entry(entry)
        self.entry = entry
        self.config = config

    def __call__(self, *args: Any) -> Any:
        """Export the rank set-up of this task for env:// and run the stage."""
        # A requeued job keeps its id: a result this task left last time (e.g. the error of a rank
        # whose peer was preempted) must not pass for the result of this run.
        submitit.JobEnvironment().paths.result_pickle.unlink(missing_ok=True)
        env = submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False, overwrite=True)
        print(f"vitas: {self.entry} rank {env.rank}/{env.world_size} "
              f"(master {env.master_addr}:{env.master_port})", flush=True)
        target = resolve_entry(self.entry)
        if isinstance(target, Stage):
            return execute(target, config_from_dict(self.config))
        return target(config_from_dict(self.config), *args)

    def checkpoint(self, *args: Any) -> submitit.helpers.DelayedSubmission:
        """Requeue the same stage with the same arguments (it resumes from its last.pth)."""
        return submitit.helpers.DelayedSubmission(self.__class__(self.entry, self.config), *args)


def _stage_folder(cfg: Config, stage: str) -> Path:
    """`<output_dir>/<stage>/submitit`, after checking that output_dir is absolute."""
    if not os.path.isabs(cfg.output_dir):
        raise UserError(f"output_dir must be an absolute path for a submitted job, "
                        f"got {cfg.output_dir!r}")
    if not stage or "/" in stage or stage in (".", ".."):
        raise UserError(f"stage name {stage!r} must be a plain folder name")
    return cfg.stage_dir(stage) / "submitit"


@contextlib.contextmanager
def _submission(folder: Path) -> Iterator[None]:
    """Turn a refused submission (sbatch's error) into a one-line UserError, and remove the
    folders this submission created, so that a refused job leaves nothing behind."""
    created = folder
    while not created.parent.exists():
        created = created.parent
    existed = created.exists()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):  # submitit prints sbatch's stderr as well
            yield
    except (FailedJobError, UserError) as exc:
        if not existed:
            shutil.rmtree(created, ignore_errors=True)
        if isinstance(exc, UserError):
            raise
        lines = [line for line in str(exc).splitlines() if line.strip()] or ["no reason given"]
        raise UserError(f"the job was not submitted: {lines[-1].strip()}") from None


def submit_stage(cfg: Config, stage: str, entry: str) -> submitit.Job:
    """Submit `entry(cfg)` as one job with `cfg.launch`'s nodes and tasks; returns the job."""
    folder = _stage_folder(cfg, stage)
    check_entry(entry)
    with _submission(folder):
        executor = create_executor(cfg.launch, folder)
        return executor.submit(StageJob(entry, cfg.to_dict()))


def submit_array(cfg: Config, entry: str, items: Sequence[Any],
                 stage: str = "search") -> list[submitit.Job]:
    """Submit `entry(cfg, item)` for each item as a job array (Slurm) or parallel local jobs.

    Each element is one task on one node (GPUs and CPUs per `cfg.launch`); Slurm runs at most
    `launch.array_parallelism` at once. The local executor starts all items together, so pass a
    few chunks of work (e.g. `search.array_jobs` lists of candidates), not one item per candidate.
    """
    if not items:
        raise UserError("submit_array: no items to submit")
    folder = _stage_folder(cfg, stage)
    check_entry(entry)
    with _submission(folder):
        executor = create_executor(dataclasses.replace(cfg.launch, nodes=1, tasks_per_node=1), folder)
        return executor.map_array(StageJob(entry, cfg.to_dict()), list(items))


_ACTIVE_SLURM_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
                        "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING",
                        "STAGE_OUT", "RESV_DEL_HOLD"}
# Pending reasons under which a job never starts: it asks more than the partition has.
_IMPOSSIBLE_REASONS = {"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit",
                       "BadConstraints"}


def _slurm_state(job_id: str) -> tuple[str, str]:
    """(state, pending reason) from squeue; ("", "") once Slurm has forgotten the job."""
    proc = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T %r"],
                          capture_output=True, text=True, check=False)
    fields = proc.stdout.split() if proc.returncode == 0 else []
    return (fields[0], fields[1] if len(fields) > 1 else "") if fields else ("", "")


def _results_written(job: submitit.Job) -> bool:
    """Every task of the job has written its result (or error) file."""
    return all(job.task(i).paths.result_pickle.exists() for i in range(job.num_tasks))


def wait_result(job: submitit.Job, timeout_s: float | None = None, poll_s: float = 1.0) -> Any:
    """Wait for `job` and return task 0's result; raise the job's own error if it failed.

    Slurm jobs are watched through their result files and `squeue`, not submitit's `sacct` (absent
    without accounting): a job that left the queue without results (killed, cancelled) raises
    `UncompletedJobError` naming its log, and so does one that can never start (it asks for more
    than the partition has). TimeoutError after `timeout_s`.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    gone_since = None
    slurm = isinstance(job, submitit.SlurmJob)
    while not (_results_written(job) if slurm else job.done()):
        if slurm:
            state, reason = _slurm_state(job.job_id)
            if state == "PENDING" and reason in _IMPOSSIBLE_REASONS:
                raise UncompletedJobError(
                    f"job {job.job_id} can never start (Slurm reason {reason}): it asks for more "
                    f"than the partition offers; check the launch settings and `scancel {job.job_id}`")
            if state not in _ACTIVE_SLURM_STATES:
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > 5.0:  # grace for the result files to land
                    raise UncompletedJobError(f"job {job.job_id} ended ({state or 'gone'}) "
                                              f"without a result; see {job.paths.stderr}")
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job.job_id} still running after {timeout_s:.0f}s")
        time.sleep(poll_s)
    return job.results()[0]
