"""The stage contract: every stage (train-supernet, search, rank, scale, retrain, evaluate) has
one shape, and `execute` is the only place that runs one.

A `Stage` declares its name, its folder under `output_dir`, a pure `check(cfg)` that raises every
user error findable without running (bad values, missing inputs, an incompatible saved state),
and `run(cfg, ctx)` returning the summary whose `last_line` keys the CLI prints as its last
stdout line. `execute` refuses bad input before anything is written (`preflight`: the stage's
check, a writable output folder, no live run in the folder), then sets up the process group and
logging, takes the folder's lock, writes `config.yaml`, runs, writes `summary.json`, and in
`finally` releases the lock and tears the process group down. A refusal that only running can
find (a UserError from `run` before the stage wrote anything of its own) puts the folder back as
it was: the previous `config.yaml`, or no folder at all. The CLI, `vitas submit` (which runs
`preflight` before queueing) and the submitit job all go through it.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from vitas.core import dist
from vitas.core.checkpoint import atomic_write, write_json
from vitas.core.config import Config, save_config
from vitas.core.errors import UserError
from vitas.core.layout import CONFIG, SUMMARY, RunLayout, run_layout
from vitas.core.lock import LOCK_NAME, StageLock
from vitas.core.logs import setup_logging


@dataclass(frozen=True)
class Option:
    """A stage's command-line option that sets a config key (`--arch A` is `retrain.arch=A`)."""

    flag: str
    key: str
    help: str
    metavar: Optional[str] = None
    is_flag: bool = False  # a switch: present sets the key to true


@dataclass(frozen=True)
class StageContext:
    """What `execute` hands a stage's `run`: the run layout, the stage folder, the process set-up,
    and whether the run is recorded in its folder (config.yaml, summary.json, lock)."""

    layout: RunLayout
    dir: Path
    dist: dist.DistInfo
    record: bool = True


@dataclass(frozen=True)
class Stage:
    """One pipeline stage (see the module docstring)."""

    name: str
    folder: str
    help: str
    description: str
    check: Callable[[Config], None]
    run: Callable[[Config, StageContext], dict]
    options: tuple[Option, ...] = ()
    last_line: tuple[str, ...] = ()
    report: Optional[Callable[[dict], list[str]]] = None
    config_required: bool = True

    def stdout_summary(self, summary: dict) -> dict:
        """The JSON object printed as the last stdout line."""
        return {k: summary[k] for k in self.last_line if k in summary}


def check_writable(folder: Path) -> None:
    """UserError naming the path and the cause when `folder` cannot be created or written: a
    file in the way, a read-only file system, missing permission."""
    probe = folder
    while not probe.is_dir():
        if probe.exists() or probe.is_symlink():
            kind = "a file" if probe.exists() else "a broken symbolic link"
            raise UserError(f"{probe} is {kind}, not a folder (needed for {folder})")
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        cause = "read-only file system" if _read_only(probe) else "permission denied"
        raise UserError(f"cannot write into {probe}: {cause}")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def preflight(stage: Stage, cfg: Config, record: bool = True, probe_lock: bool = True) -> None:
    """Everything that can refuse a run before it writes: the stage's own `check`, then (for a
    recorded run) a writable output folder that, with `probe_lock`, no live run holds."""
    stage.check(cfg)
    if record:
        folder = run_layout(cfg.output_dir).stage(stage.folder)
        check_writable(folder)
        if probe_lock:
            StageLock(folder, f"{stage.name} run").check_free()


def execute(stage: Stage, cfg: Config, record: bool = True) -> dict:
    """Run `stage` on `cfg` in this process (one of several under torchrun or Slurm): preflight,
    process group, logging, lock, config.yaml, run, summary.json; clean-up always. (Rank 0 takes
    the lock, which refuses a live holder; the other ranks must not probe it, since rank 0 may
    already hold it.)"""
    preflight(stage, cfg, record, probe_lock=False)
    joined = not dist.is_distributed()
    info = dist.init_distributed()
    layout = run_layout(cfg.output_dir)
    folder = layout.stage(stage.folder)
    lock = StageLock(folder, f"{stage.name} run")
    before = _Snapshot(folder) if record and dist.is_main() else None
    try:
        setup_logging()
        refusal = None
        if before is not None:
            try:
                lock.acquire()
                save_config(cfg, folder / CONFIG)
            except UserError as exc:
                refusal = str(exc)
        refusal = dist.broadcast_object(refusal)  # every rank stops when rank 0 may not run
        if refusal:
            raise UserError(refusal)
        summary = stage.run(cfg, StageContext(layout, folder, info, record))
        if before is not None:
            write_json(summary, folder / SUMMARY)
        dist.barrier()
        return summary
    except UserError:
        if before is not None:
            lock.release()
            before.restore_if_untouched()
        raise
    finally:
        lock.release()
        if joined:
            dist.cleanup()


class _Snapshot:
    """A stage folder's state before a run: whether it existed and its config.yaml, so that a run
    refused before it wrote anything of its own leaves the folder as it found it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.existed = folder.is_dir()
        self.root_existed = folder.parent.is_dir()
        path = folder / CONFIG
        self.config = path.read_bytes() if path.is_file() else None
        self.entries = set(os.listdir(folder)) if self.existed else set()

    def restore_if_untouched(self) -> None:
        """Undo config.yaml (and a folder this run created) unless the run wrote other files."""
        if not self.folder.is_dir():
            return
        ours = {CONFIG, LOCK_NAME}
        if set(os.listdir(self.folder)) - self.entries - ours:
            return  # the stage wrote files of its own (e.g. a checkpoint, logs): keep everything
        path = self.folder / CONFIG
        if self.config is None:
            path.unlink(missing_ok=True)
        else:
            atomic_write(path, lambda f: f.write(self.config))
        if not self.existed:
            (self.folder / LOCK_NAME).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.folder.rmdir()
                if not self.root_existed:  # output_dir itself, created by this run
                    self.folder.parent.rmdir()

