"""Shared pytest fixtures."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from core.data import write_digits

# Tiny models run many times faster on one thread than on several competing ones; subprocesses
# (torchrun, submitit, the CLI) inherit the setting through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


# --- Slurm: tests that need a running cluster (slurm/local-cluster.sh start) ------------------
@pytest.fixture
def slurm_cluster() -> None:
    """Skip unless a Slurm cluster answers; under VITAS_REQUIRE_SLURM=1 (CI) fail instead."""
    reason = None
    if shutil.which("sbatch") is None:
        reason = "sbatch is not on PATH"
    else:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                              timeout=30, check=False)
        if proc.returncode != 0 or not {"idle", "mixed", "allocated"} & set(proc.stdout.split()):
            reason = f"no usable Slurm node (sinfo: {(proc.stdout + proc.stderr).strip()!r})"
    if reason is None:
        return
    if os.environ.get("VITAS_REQUIRE_SLURM") == "1":
        pytest.fail(f"VITAS_REQUIRE_SLURM=1 but {reason}; run `bash slurm/local-cluster.sh start`")
    pytest.skip(reason)


# --- Data: a small digits subset, written once per session ------------------------------------
@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits subset in the ImageNet layout: 12 train and 4 val images per class."""
    base = tmp_path_factory.mktemp("digits")
    write_digits(base / "full")
    root = base / "tiny"
    for split, keep in (("train", 12), ("val", 4)):
        for cls in sorted((base / "full" / split).iterdir()):
            (root / split / cls.name).mkdir(parents=True)
            for png in sorted(cls.iterdir())[:keep]:
                shutil.copy(png, root / split / cls.name / png.name)
    return root
