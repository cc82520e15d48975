"""Shared pytest fixtures."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from vitas.core.data import write_digits

# Tiny models run many times faster on one thread than on several competing ones; subprocesses
# (torchrun, submitit, the CLI) inherit the setting through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


# --- Slurm: tests that need a running cluster (slurm/local-cluster.sh start) ------------------
# States a node passes through between jobs (a finished job's clean-up, a requeue): wait them out.
_SLURM_USABLE = {"idle", "mixed", "allocated"}
_SLURM_READY_S = 120.0


def _slurm_unusable_reason() -> str | None:
    """None once the local node accepts jobs; otherwise why not, after waiting out busy states."""
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH"
    deadline = time.monotonic() + _SLURM_READY_S
    while True:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                              timeout=30, check=False)
        states = {s.rstrip("*~#!%$@^-") for s in proc.stdout.split()}
        if proc.returncode == 0 and _SLURM_USABLE & states:
            return None
        if proc.returncode != 0 or time.monotonic() > deadline:
            return f"no usable Slurm node (sinfo: {(proc.stdout + proc.stderr).strip()!r})"
        time.sleep(1.0)


@pytest.fixture
def slurm_cluster() -> None:
    """Skip unless a Slurm cluster answers; under VITAS_REQUIRE_SLURM=1 (CI) fail instead.

    A node still cleaning up the previous test's job reads "completing" for up to KillWait: the
    fixture waits (up to two minutes) for it to take jobs again rather than fail on a passing state.
    """
    reason = _slurm_unusable_reason()
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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """For xdist (`make test` runs two workers): the tests marked `long` are collected first, so a
    worker starts each of them early instead of one ending the run alone; the tests that queue
    Slurm jobs share one worker, since the one-node cluster runs one of their jobs at a time."""
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()) or item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
