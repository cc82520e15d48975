"""Run logging: TensorBoard scalars and `log.jsonl` from rank 0, progress bars or plain lines.

On a terminal `progress` shows a tqdm bar; in a log file (Slurm, CI) it prints a plain line every
few items instead, so logs stay readable.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from tqdm import tqdm

from vitas.core import dist


def _scalar(value: Any) -> float:
    return float(value.item() if hasattr(value, "item") else value)


class RunLogger:
    """Scalars of one run to `<out_dir>/log.jsonl` (one JSON object per `log` call) and TensorBoard.

    Only the enabled process (rank 0 by default) creates or writes anything.
    """

    def __init__(self, out_dir: str | Path, enabled: Optional[bool] = None) -> None:
        self.enabled = dist.is_main() if enabled is None else enabled
        self.out_dir = Path(out_dir)
        self._writer = None
        self._file = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(self.out_dir))
            self._file = open(self.out_dir / "log.jsonl", "a", buffering=1)

    def log(self, step: int, **scalars: Any) -> None:
        """Record `scalars` (numbers or one-element tensors) at `step`."""
        if not self.enabled:
            return
        values = {k: _scalar(v) for k, v in scalars.items()}
        for key, value in values.items():
            self._writer.add_scalar(key, value, step)
        self._file.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")

    def close(self) -> None:
        """Flush and close the files (idempotent)."""
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            self._writer = self._file = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class PlainProgress:
    """Iterates like tqdm; prints `desc: i/total (pct%) rate it/s [postfix]` every `every` items
    (or, with `every` None, when `interval` seconds have passed since the last line), and at the end."""

    def __init__(self, iterable: Iterable, total: Optional[int], desc: str, every: Optional[int],
                 interval: float = 30.0, stream: Any = None) -> None:
        self.iterable, self.total, self.desc = iterable, total, desc
        self.every, self.interval = every, interval
        self.stream = stream or sys.stdout
        self.postfix = ""

    def set_postfix(self, **values: Any) -> None:
        """Values shown at the end of the next printed line (as tqdm's `set_postfix`)."""
        self.postfix = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in values.items())

    def __len__(self) -> int:
        return self.total if self.total is not None else len(self.iterable)

    def __iter__(self) -> Iterator:
        start = last = time.perf_counter()
        count = 0
        for count, item in enumerate(self.iterable, 1):
            yield item
            if self.every is not None:
                due = count % self.every == 0
            else:
                due = time.perf_counter() - last >= self.interval
            if due and count != self.total:  # the last line comes after the loop
                self._line(count, start)
                last = time.perf_counter()
        self._line(count, start)

    def _line(self, count: int, start: float) -> None:
        rate = count / max(time.perf_counter() - start, 1e-9)
        done = str(count)
        if self.total:
            done = f"{count}/{self.total} ({100 * count / self.total:.0f}%)"
        print(f"{self.desc}: {done} {rate:.1f} it/s {self.postfix}".rstrip(), file=self.stream,
              flush=True)


def progress(iterable: Iterable, total: Optional[int] = None, desc: str = "",
             every: Optional[int] = None, enabled: Optional[bool] = None,
             interval: float = 30.0) -> Iterable:
    """On stdout: a tqdm bar on a terminal; else plain lines every `every` items, or (by default)
    at most one every `interval` seconds plus a last one, so job logs stay readable; silent off
    rank 0."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not (dist.is_main() if enabled is None else enabled):
        return tqdm(iterable, total=total, disable=True)  # passes items through, set_postfix no-op
    if sys.stdout.isatty():
        return tqdm(iterable, total=total, desc=desc, file=sys.stdout, dynamic_ncols=True)
    return PlainProgress(iterable, total, desc, every, interval)


def setup_logging(level: int = logging.INFO) -> None:
    """Plain `time level [rank] name: message` lines on stderr; other ranks only show warnings."""
    rank = dist.get_rank()
    logging.basicConfig(
        level=level if rank == 0 else max(level, logging.WARNING), force=True,
        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
    )
