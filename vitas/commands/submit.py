"""`vitas submit STAGE -c CONFIG [key=value ...] [--wait]`: run a stage as a submitit job.

Slurm where `sbatch` exists, submitit's local executor otherwise (`launch.executor` decides).
Nodes, tasks, GPUs, time, partition come from the config's `launch` section or overrides such as
`launch.tasks_per_node=2`. Before anything is queued or written the stage's `preflight` runs: every
value `vitas STAGE` refuses is refused here with the same one line and exit 2. A preempted or
timed-out job is requeued and resumes from its last.pth.
"""
from __future__ import annotations

import argparse
import importlib.util
import json

from submitit.core.utils import FailedJobError, UncompletedJobError

from vitas.core.errors import UserError
from vitas.core.launch import check_entry, resolve_entry, resolve_executor, submit_stage, wait_result
from vitas.core.layout import run_layout
from vitas.core.stage import Stage, preflight
from vitas.stages import STAGES, add_stage_args, get_stage, stage_config


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `vitas submit STAGE` with one sub-parser per stage."""
    parser = subparsers.add_parser(
        "submit", help="run a stage as a Slurm (or local) job through submitit",
        description="Submit a stage through submitit: to Slurm where `sbatch` exists, else to "
        "submitit's local executor (launch.executor=auto|slurm|local). Job settings come from the "
        "`launch` section (nodes, tasks_per_node, gpus_per_node, cpus_per_task, mem_gb, partition, "
        "timeout_min, job_name, max_requeue). The stage's checks run before anything is queued. "
        "Logs go to OUTPUT_DIR/<stage>/submitit/. The last line of stdout is a JSON object "
        "{job_id, stage, executor, folder, state}.")
    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, entry in STAGES.items():
        stage = get_stage(name)
        sub = stages.add_parser(name, help=f"submit `vitas {name}` (writes to OUTPUT_DIR/{stage.folder})",
                                description=f"Submit `vitas {name}` as a job; it writes to "
                                f"OUTPUT_DIR/{stage.folder} and resumes from its last.pth when "
                                f"requeued. {stage.description}")
        add_stage_args(sub, stage)
        sub.add_argument("--entry", metavar="MODULE:ATTRIBUTE", default=entry,
                         help=f"stage object or function taking a Config to run instead (default {entry})")
        sub.add_argument("--wait", action="store_true",
                         help="wait for the job; exit 1 if it failed")
        sub.set_defaults(func=_submit)


def _check_module(entry: str) -> None:
    """UserError when the module of "module:function" cannot be found (it is imported in the job)."""
    check_entry(entry)
    module = entry.partition(":")[0]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise UserError(f"module '{module}' of entry '{entry}' is not installed")


def _submit(args: argparse.Namespace) -> int:
    stage, entry = get_stage(args.stage), args.entry
    _check_module(entry)
    cfg = stage_config(args, stage)
    executor = resolve_executor(cfg.launch)
    target = resolve_entry(entry)
    if isinstance(target, Stage):  # the same refusals as `vitas STAGE`, before anything is queued
        preflight(target, cfg)
    job = submit_stage(cfg, stage.folder, entry)
    logs = run_layout(cfg.output_dir).stage(stage.folder) / "submitit"
    launch = cfg.launch
    print(f"submitted {args.stage}: job {job.job_id} on {executor} "
          f"({launch.nodes} node(s) x {launch.tasks_per_node} task(s))")
    print(f"logs: {logs}")
    report = {"job_id": job.job_id, "stage": args.stage, "executor": executor,
              "folder": str(logs), "state": "submitted"}
    code = 0
    if args.wait:
        try:
            wait_result(job)
            report["state"] = "completed"
            print(f"job {job.job_id} completed")
        except (FailedJobError, UncompletedJobError) as exc:
            report["state"] = "failed"
            lines = str(exc).strip().splitlines()
            print(f"job {job.job_id} failed: {lines[-1] if lines else type(exc).__name__}")
            print(f"see {job.paths.stderr}")
            code = 1
    print(json.dumps(report))
    return code
