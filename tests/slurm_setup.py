"""Helpers shared by the tests that run on the real local Slurm (slurm/local-cluster.sh)."""
from __future__ import annotations

import subprocess
import time


def release_requeued(job_id: str, timeout_s: float) -> None:
    """Slurm holds a requeued batch job for about two minutes (BeginTime): start it now."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                               text=True, check=False).stdout.strip()
        if state == "PENDING" and subprocess.run(
                ["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                capture_output=True, check=False).returncode == 0:
            return
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} was not requeued within {timeout_s}s")
