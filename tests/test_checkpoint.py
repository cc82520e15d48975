"""Checkpoint I/O: atomic saves survive an interrupted write; weights_only refuses code."""
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from vitas.core.checkpoint import atomic_write, check_space, load_checkpoint, save_checkpoint
from vitas.core.errors import UserError


def test_save_load_round_trip(tmp_path):
    state = {"model": {"w": torch.arange(6.0)}, "epoch": 3, "config": {"a": [1, 2]}}
    save_checkpoint(state, tmp_path / "last.pth")
    back = load_checkpoint(tmp_path / "last.pth")
    assert back["epoch"] == 3 and torch.equal(back["model"]["w"], state["model"]["w"])


def test_interrupted_save_keeps_previous(tmp_path):
    """A process killed in the middle of torch.save leaves the old checkpoint intact."""
    path = tmp_path / "last.pth"
    save_checkpoint({"epoch": 1, "w": torch.zeros(4)}, path)
    script = textwrap.dedent(f"""
        import os, signal, torch
        import vitas.core.checkpoint as ck
        real_save = torch.save
        def dying_save(obj, f):
            f.write(b"partial bytes of a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        ck.save_checkpoint({{"epoch": 2, "w": torch.ones(4)}}, {str(path)!r})
    """)
    res = subprocess.run([sys.executable, "-c", script])
    assert res.returncode == -9
    back = load_checkpoint(path)
    assert back["epoch"] == 1 and torch.equal(back["w"], torch.zeros(4))


def test_preemption_during_save_is_held_until_the_file_is_in_place(tmp_path):
    """A preemption signal (submitit's USR2 handler exits) that lands inside torch.save runs once
    the new checkpoint is complete: the job then requeues from it instead of failing."""
    path = tmp_path / "last.pth"
    calls: list[int] = []

    def preempted(signum, frame):
        calls.append(signum)
        raise SystemExit(-1)  # what submitit's checkpoint_and_try_requeue ends with

    def write(f):
        torch.save({"epoch": 1, "w": torch.zeros(1000)}, f)
        os.kill(os.getpid(), signal.SIGUSR2)  # arrives mid-write
        assert not calls  # held: the handler has not run yet
        f.write(b"")

    previous = signal.signal(signal.SIGUSR2, preempted)
    try:
        with pytest.raises(SystemExit):
            atomic_write(path, write)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert calls == [signal.SIGUSR2] and signal.getsignal(signal.SIGUSR2) is previous
    assert load_checkpoint(path)["epoch"] == 1 and sorted(os.listdir(tmp_path)) == ["last.pth"]


def test_exception_during_save_leaves_no_temp(tmp_path):
    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")
    save_checkpoint({"epoch": 1}, tmp_path / "last.pth")
    with pytest.raises(Exception):
        save_checkpoint({"epoch": 2, "x": Boom()}, tmp_path / "last.pth")
    assert sorted(os.listdir(tmp_path)) == ["last.pth"]
    assert load_checkpoint(tmp_path / "last.pth")["epoch"] == 1


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_weights_only_refuses_code(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": RunsCode()}, f)
    with pytest.raises(UserError, match="refusing to load.*may run code") as err:
        load_checkpoint(path)
    assert "weights_only=False" not in str(err.value)  # never advise the unsafe load
    torch.save({"model": RunsCode()}, path)  # torch's own format: the unpickler names the call
    with pytest.raises(UserError, match="refusing to load.*asks for code.*GLOBAL .*system"):
        load_checkpoint(path)


@pytest.mark.parametrize("content, message", [
    (b"", "empty or cut short"),
    (b'{"model": 1}', "not a checkpoint of tensors"),
    (b"\x80\x04garbage", "not a checkpoint of tensors"),
    ("truncated", "cannot read checkpoint"),
])
def test_unreadable_checkpoints_are_user_errors(tmp_path, content, message):
    path = tmp_path / "bad.pth"
    if content == "truncated":
        save_checkpoint({"w": torch.ones(100)}, path)
        content = path.read_bytes()[:200]
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_checkpoint(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pth")


def test_space_mismatch_names_field():
    with pytest.raises(UserError, match="'embed_dim'"):
        check_space({"embed_dim": [1, 2], "depth": [3]}, {"embed_dim": [1, 3], "depth": [3]})
