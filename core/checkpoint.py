"""Checkpoint files: atomic writes, `weights_only` loads, the recorded search space checked.

A training state holds only tensors and plain Python values, so every load in the project goes
through `torch.load(..., weights_only=True)` and a pickle that would run code is refused.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from vitas.core.errors import UserError


_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def usual_permissions(path: Path) -> None:
    """Give `path` the mode a plain create would (0666/0777 less the umask): mkstemp, mkdtemp and
    safetensors make owner-only entries."""
    path.chmod((0o777 if path.is_dir() else 0o666) & ~_UMASK)


# Signals that interrupt a job: Ctrl-C, Slurm's SIGTERM, submitit's preemption/timeout SIGUSR2.
_HELD = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR2") if hasattr(signal, name))


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """Hold interrupting signals while a file is written, then deliver them in order.

    submitit's preemption handler exits the process; landing inside `torch.save`, that exit is
    masked by the zip writer's own error on the way out, and the job fails instead of requeueing.
    Held, it runs right after the write, with the new file complete. (Main thread only: Python
    runs signal handlers there and nowhere else.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = {s: signal.getsignal(s) for s in _HELD if signal.getsignal(s) is not None}
    for s in held:
        signal.signal(s, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(caught):
            signal.raise_signal(s)


class _RecordingFile:
    """A file that remembers the first OSError its `write` raised: torch's zip writer turns a
    full disk into "unexpected pos ..." and hides the cause."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def atomic_write(path: str | os.PathLike, write: Any, mode: str = "wb") -> Path:
    """Write `path` through `write(fileobj)` into a temporary sibling, fsync, then rename.

    A crash at any point leaves either the old file or the new one, never a torn file; an
    interrupting signal (preemption) is held until the file is in place. A file-system fault (a
    full disk, a read-only or forbidden folder, a file where a folder should be) is a UserError
    naming the path and the cause, and the previous file stays.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {_cause(exc)}") from None
    usual_permissions(Path(tmp))
    with held_signals():
        recording = None
        try:
            with os.fdopen(fd, mode) as f:
                recording = _RecordingFile(f)
                write(recording)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            if os.path.exists(tmp):
                os.unlink(tmp)
            fault = recording.error if recording is not None and recording.error else exc
            if isinstance(fault, OSError):
                kept = " (the previous file is kept)" if path.exists() else ""
                raise UserError(f"cannot write {path}: {_cause(fault)}{kept}") from None
            raise
        _fsync_dir(path.parent)
    return path


def _cause(exc: OSError) -> str:
    return os.strerror(exc.errno).lower() if exc.errno else str(exc)


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Atomically save a training state (tensors and plain values only)."""
    return atomic_write(path, lambda f: torch.save(state, f))


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Atomically write an indented JSON file."""
    return atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"), mode="w")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    mmap: bool = False) -> dict:
    """Load with `weights_only=True`; missing files and refused pickles are UserErrors.

    `mmap=True` maps tensors from the file instead of reading them (cheap when only the plain
    values are wanted)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise UserError(f"refusing to load {path}: {_refusal(str(exc))}; vitas loads checkpoints "
                        "with weights_only=True only") from None
    except EOFError:
        raise UserError(f"cannot read checkpoint {path}: the file is empty or cut short") from None
    except (RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read checkpoint {path}: {first}") from None


def _refusal(message: str) -> str:
    """Why torch's weights-only unpickler refused a file, in a few words (torch's own message
    suggests weights_only=False, which is exactly what must not be done)."""
    for line in message.splitlines():
        if "GLOBAL" in line:
            return f"its pickle asks for code ({line.strip().rstrip('.')})"
    return "it is not a checkpoint of tensors and plain values (another format, or a pickle that may run code)"


def nonfinite_tensors(tensors: dict[str, Any]) -> Optional[str]:
    """The name of the first floating-point tensor holding NaN or Inf (nested dicts searched),
    or None."""
    for key, value in tensors.items():
        if isinstance(value, dict):
            found = nonfinite_tensors(value)
            if found is not None:
                return f"{key}.{found}"
        elif torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return str(key)
    return None


def model_weights(ckpt: dict, source: str | os.PathLike, ema: bool = False) -> dict:
    """The raw weights of a checkpoint, or with `ema` its EMA weights (a UserError without them),
    checked to be a mapping of finite tensors."""
    key = "ema" if ema else "model"
    if ema and ckpt.get("ema") is None:
        raise UserError(f"{source} has no EMA weights (it was trained with EMA off); drop --ema")
    weights = ckpt.get(key)
    if not isinstance(weights, dict):
        raise UserError(f"{source}: entry '{key}' is {'missing' if weights is None else 'a ' + type(weights).__name__}, "
                        "expected a mapping of tensors")
    bad = nonfinite_tensors(weights)
    if bad is not None:
        raise UserError(f"{source}: tensor {bad} is not finite (the training diverged)")
    return weights


def check_space(recorded: dict, current: dict, path: str | os.PathLike = "checkpoint") -> None:
    """Fail, naming the first differing field, when a checkpoint's space is not the current one."""
    for key in sorted(set(recorded) | set(current)):
        if recorded.get(key) != current.get(key):
            raise UserError(
                f"{path} was trained on another search space: '{key}' is "
                f"{recorded.get(key)!r} there but {current.get(key)!r} in this config"
            )


def rng_state() -> dict:
    """The Python, NumPy and torch RNG states as tensors/plain values (weights_only-safe)."""
    np_state = np.random.get_state()
    _, py_state, py_gauss = random.getstate()
    state = {
        "python": list(py_state),
        "python_gauss": py_gauss,
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state()` captured."""
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
