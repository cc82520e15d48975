"""Run logs: log.jsonl + TensorBoard scalars from the main rank only; tqdm on a terminal, plain
lines in a log; the logging set-up."""
import fcntl
import json
import logging
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vitas.core.logs import RunLogger, progress, setup_logging

ROOT = Path(__file__).resolve().parents[1]


def test_run_logger_writes_jsonl_and_tensorboard(tmp_path):
    with RunLogger(tmp_path / "run") as logger:
        logger.log(1, loss=2.5, lr=torch.tensor(0.1))
        logger.log(2, loss=1.5)
    lines = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [(l["step"], l["loss"]) for l in lines] == [(1, 2.5), (2, 1.5)]
    assert abs(lines[0]["lr"] - 0.1) < 1e-7 and "lr" not in lines[1]
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.5), (2, 1.5)]
    with RunLogger(tmp_path / "run") as logger:  # a resumed run appends
        logger.log(3, loss=1.0)
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 3


def test_disabled_logger_writes_nothing(tmp_path):
    logger = RunLogger(tmp_path / "run", enabled=False)
    logger.log(1, loss=1.0)
    logger.close()
    assert not (tmp_path / "run").exists()


def test_progress_plain_lines_when_not_a_terminal(capsys):
    bar = progress(range(10), desc="epoch 1", every=3)
    items = []
    for i in bar:
        items.append(i)
        bar.set_postfix(loss=0.25)
    assert items == list(range(10))
    lines = capsys.readouterr().out.splitlines()
    assert [l.split(" ")[2] for l in lines] == ["3/10", "6/10", "9/10", "10/10"]
    assert lines[-1].startswith("epoch 1: 10/10 (100%)") and lines[-1].endswith("loss=0.25")


def test_progress_disabled_is_silent(capsys):
    bar = progress(iter(range(4)), total=4, desc="x", enabled=False)
    assert [i for i in bar] == [0, 1, 2, 3]
    bar.set_postfix(loss=1.0)
    assert capsys.readouterr() == ("", "")


def test_progress_tqdm_on_a_terminal():
    """With stdout on a pseudo-terminal the bar is tqdm's (carriage returns, `it/s]`)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    code = "from vitas.core.logs import progress\nfor _ in progress(range(50), desc='tty'): pass\n"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(leader)
    text = b"".join(chunks).decode()
    assert proc.returncode == 0, text
    assert "\r" in text and "tty: 100%" in text and "50/50" in text


def test_setup_logging(capsys):
    setup_logging()
    logging.getLogger("vitas.test").info("hello %d", 3)
    err = capsys.readouterr().err
    assert "INFO [rank 0] vitas.test: hello 3" in err


def test_progress_plain_lines_are_time_throttled_by_default(capsys):
    """Without `every`, a fast loop prints one line at the end; a slow one a line per interval."""
    assert list(progress(range(1000), desc="fast")) == list(range(1000))
    assert [l.split(" ")[1] for l in capsys.readouterr().out.splitlines()] == ["1000/1000"]
    for _ in progress(range(3), desc="slow", interval=0.0):
        pass
    assert [l.split(" ")[1] for l in capsys.readouterr().out.splitlines()] == ["1/3", "2/3", "3/3"]
