"""`vitas submit STAGE -c CONFIG [key=value ...] [--wait]`: run a stage as a submitit job.

Slurm where `sbatch` exists, submitit's local executor otherwise (`launch.executor` decides).
Nodes, tasks, GPUs, time, partition come from the config's `launch` section or overrides such as
`launch.tasks_per_node=2`. A preempted or timed-out job is requeued and resumes from its last.pth.
"""
from __future__ import annotations

import argparse
import importlib.util
import json

from submitit.core.utils import FailedJobError, UncompletedJobError

from vitas.core.errors import UserError
from vitas.core.launch import check_entry, resolve_executor, submit_stage, wait_result
from vitas.commands._common import add_config_args, config_from_args

# stage name -> (folder under output_dir, entry point "module:function" taking a Config)
STAGES: dict[str, tuple[str, str]] = {
    "train-supernet": ("supernet", "vitas.supernet.train:run"),
    "search": ("search", "vitas.search.runner:run"),
    "rank": ("rank", "vitas.search.ranking.study:run"),
    "scale": ("scale", "vitas.search.scaling:run"),
    "retrain": ("retrain", "vitas.retrain.train:run"),
    "evaluate": ("evaluate", "vitas.inference.evaluate:run"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `vitas submit STAGE` with one sub-parser per stage."""
    parser = subparsers.add_parser(
        "submit", help="run a stage as a Slurm (or local) job through submitit",
        description="Submit a stage through submitit: to Slurm where `sbatch` exists, else to "
        "submitit's local executor (launch.executor=auto|slurm|local). Job settings come from the "
        "`launch` section (nodes, tasks_per_node, gpus_per_node, cpus_per_task, mem_gb, partition, "
        "timeout_min, job_name, max_requeue). Logs go to OUTPUT_DIR/<stage>/submitit/. The last "
        "line of stdout is a JSON object {job_id, stage, executor, folder, state}.")
    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for stage, (folder, entry) in STAGES.items():
        sub = stages.add_parser(stage, help=f"run {entry} (writes to OUTPUT_DIR/{folder})",
                                description=f"Submit `{entry}` as a job; it writes to "
                                f"OUTPUT_DIR/{folder} and resumes from its last.pth when requeued.")
        add_config_args(sub)
        sub.add_argument("--entry", metavar="MODULE:FUNCTION", default=entry,
                         help=f"function taking a Config to run instead (default {entry})")
        sub.add_argument("--wait", action="store_true",
                         help="wait for the job; exit 1 if it failed")
        sub.set_defaults(func=_submit, folder=folder)


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
    folder, entry = args.folder, args.entry
    _check_module(entry)
    cfg = config_from_args(args)
    executor = resolve_executor(cfg.launch)
    job = submit_stage(cfg, folder, entry)
    logs = cfg.stage_dir(folder) / "submitit"
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
