"""One run per stage folder: an advisory lock with its owner written in it.

`StageLock(folder)` takes `folder/.lock` with `fcntl.flock` (exclusive, non-blocking) and writes
the owner into it: host, pid, Slurm job id and start time. A second run into a folder that a live
run holds is a UserError naming the holder. A run that ends removes the file. The kernel drops a
flock when its process dies, so a lock file left by a killed run (a dead pid, a finished or
requeued Slurm job) is simply taken over; its old owner is then named in a warning, or, for a
Slurm job requeued under the same id, in an info line.

What it guarantees: mutual exclusion between processes on one machine, and across machines on
NFSv4 (and NFSv3 with lockd), where Linux turns flock into a POSIX byte-range lock the server
arbitrates; a client that dies holding it keeps it until the server's lease runs out (about
90 s). On file systems without lock support (some FUSE and Lustre mounts without `-o flock`) it
falls back to reading the owner: a live pid on this host or a Slurm job still in the queue holds
the folder; otherwise the run goes on, without a hard guarantee against a race in between.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

from vitas.core.errors import UserError

log = logging.getLogger("vitas.lock")
LOCK_NAME = ".lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def job_id() -> Optional[str]:
    """This process's Slurm job id (array jobs as `<array>_<task>`), or None outside Slurm."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def owner() -> dict[str, Any]:
    """Who this process is, as written into a lock it holds."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": job_id(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def describe(holder: dict) -> str:
    """`host H, pid P, Slurm job J, since T` for messages."""
    parts = [f"host {holder.get('host', '?')}", f"pid {holder.get('pid', '?')}"]
    if holder.get("slurm_job"):
        parts.append(f"Slurm job {holder['slurm_job']}")
    if holder.get("since"):
        parts.append(f"since {holder['since']}")
    return ", ".join(parts)


def _alive(holder: dict) -> bool:
    """Whether the run named in a lock file still runs (only used where flock is unavailable)."""
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    if holder.get("slurm_job"):
        proc = subprocess.run(["squeue", "-h", "-j", str(holder["slurm_job"])], capture_output=True,
                              text=True, check=False)
        return proc.returncode == 0 and bool(proc.stdout.strip())
    return False


def read_owner(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        found = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return found if isinstance(found, dict) else {}


class StageLock:
    """Exclusive use of a stage folder by one run (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, what: str = "run") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock or raise UserError naming the live holder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                previous = self._take(fd)
            except BaseException:
                os.close(fd)
                raise
            if self._still_linked(fd):
                break
            os.close(fd)  # the holder released (and removed) the file in between: take the new one
        me = owner()
        if previous and previous.get("pid") is not None and (previous.get("host"), previous.get("pid")) != (me["host"], me["pid"]):
            if me["slurm_job"] and previous.get("slurm_job") == me["slurm_job"]:
                log.info("%s: Slurm job %s takes over its own lock (requeued)", self.folder, me["slurm_job"])
            else:
                log.warning("%s: taking over a stale lock of a run that no longer runs (%s)",
                            self.folder, describe(previous))
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(me) + "\n").encode())
        os.fsync(fd)
        self._fd = fd

    def _still_linked(self, fd: int) -> bool:
        """Whether `fd` is still the file at `self.path` (not one a releasing run unlinked)."""
        try:
            here = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)

    def _take(self, fd: int) -> dict:
        """flock `fd` (or, where unsupported, check the recorded owner); returns the old owner."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{self.folder} is in use by another {self.what} ({describe(read_owner(fd))}); "
                            "wait for it to end, or use another output_dir") from None
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            holder = read_owner(fd)
            if holder and (holder.get("host"), holder.get("pid")) != (socket.gethostname(), os.getpid()) and _alive(holder):
                raise UserError(f"{self.folder} is in use by another {self.what} ({describe(holder)}); "
                                "wait for it to end, or use another output_dir") from None
            return holder
        return read_owner(fd)

    def check_free(self) -> None:
        """UserError naming the holder when a live run holds the lock; takes nothing (a shared,
        non-blocking probe), so `vitas submit` can refuse before it queues a job."""
        if not self.path.is_file():
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            raise UserError(f"{self.folder} is in use by another {self.what} "
                            f"({describe(read_owner(fd))}); wait for it to end, or use another "
                            "output_dir") from None
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
        finally:
            os.close(fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            self.path.unlink()  # while still holding it: a waiter then retries on a fresh file
        except OSError:
            pass  # a read-only folder: the kernel still drops the flock below
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "StageLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
