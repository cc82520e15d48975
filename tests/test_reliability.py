"""Runs that cannot silently go wrong: one run per folder, divergence caught, file-system faults,
images read strictly, checkpoints checked as data, extended schedules, split leakage."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitas.cli import main
from vitas.core.checkpoint import load_checkpoint, save_checkpoint
from vitas.core.config import DataConfig
from vitas.core.data import build_dataset, list_images, open_image
from vitas.core.errors import UserError
from vitas.core.lock import StageLock

from train_setup import cli, state_tensors, tiny_config, train_env, write_yaml

EPOCH_SECONDS = 30


def one_error(capsys: pytest.CaptureFixture, needle: str) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vitas: ")]
    assert len(lines) == 1 and lines[0].startswith("vitas: error: ") and needle in lines[0], lines
    return lines[0]


def train(cfg_path: Path, *overrides: str) -> int:
    return main(["train-supernet", "-c", str(cfg_path), *overrides])


# ----------------------------------------------------------------------------- one run per folder
@pytest.mark.long
def test_a_second_run_into_a_live_folder_is_refused_and_the_first_is_untouched(
        tmp_path: Path, tiny_digits: Path, capsys: pytest.CaptureFixture) -> None:
    alone = write_yaml(tiny_config(tmp_path / "alone", tiny_digits, epochs=8, deterministic=True),
                       tmp_path / "alone.yaml")
    shared = write_yaml(tiny_config(tmp_path / "shared", tiny_digits, epochs=8, deterministic=True),
                        tmp_path / "shared.yaml")
    first = subprocess.Popen(cli("train-supernet", "-c", str(shared)), env=train_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "shared" / "supernet" / ".lock"
    deadline = time.monotonic() + 120
    while not (lock.is_file() and lock.read_text().strip()) and first.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    second = train(shared)  # in this process: refused while the first one holds the folder
    still_running = first.poll() is None
    assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    assert still_running, "the first run ended before the second started: make it longer"
    assert second == 2
    line = one_error(capsys, "is in use by another train-supernet run")
    assert f"pid {first.pid}" in line
    assert subprocess.run(cli("train-supernet", "-c", str(alone)), env=train_env(),
                          capture_output=True).returncode == 0
    a = state_tensors(load_checkpoint(tmp_path / "alone" / "supernet" / "last.pth"))
    b = state_tensors(load_checkpoint(tmp_path / "shared" / "supernet" / "last.pth"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not lock.exists()  # a finished run removes its lock


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid,
                                                "slurm_job": None, "since": "yesterday"}))
    with caplog.at_level(logging.INFO, logger="vitas.lock"):
        with StageLock(tmp_path):
            held = json.loads((tmp_path / ".lock").read_text())
    assert held["pid"] == os.getpid()
    assert any("stale lock" in r.message and f"pid {dead.pid}" in r.message for r in caplog.records)


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    (tmp_path / ".lock").write_text(json.dumps({"host": "node7", "pid": 1, "slurm_job": "4242"}))
    with caplog.at_level(logging.INFO, logger="vitas.lock"):
        with StageLock(tmp_path):
            pass
    assert any("takes over its own lock" in r.message for r in caplog.records)
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)


def test_a_held_lock_is_refused_naming_the_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        ["python3", "-c", "import fcntl, json, os, sys, time; f = open(sys.argv[1], 'w'); "
         "fcntl.flock(f, fcntl.LOCK_EX); f.write(json.dumps({'host': 'h1', 'pid': os.getpid(), "
         "'slurm_job': '77'})); f.flush(); print('held', flush=True); time.sleep(60)",
         str(tmp_path / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=r"in use by another run \(host h1, pid \d+, Slurm job 77"):
            StageLock(tmp_path).acquire()
        with pytest.raises(UserError, match="Slurm job 77"):
            StageLock(tmp_path).check_free()
    finally:
        holder.kill()
        holder.wait()
    with StageLock(tmp_path):  # the kernel dropped the dead holder's lock
        pass


# ----------------------------------------------------------------------------- divergence
def test_divergence_stops_with_one_line_and_keeps_the_last_finite_checkpoint(
        tmp_path: Path, tiny_digits: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = write_yaml(tiny_config(tmp_path, tiny_digits, epochs=1, clip_grad=None), tmp_path / "c.yaml")
    assert train(cfg) == 0
    path = tmp_path / "supernet" / "last.pth"
    before = path.read_bytes()
    capsys.readouterr()
    assert train(cfg, "supernet.epochs=3", "supernet.lr=1e30", "supernet.min_lr=0") == 2
    line = one_error(capsys, "training diverged at epoch 2")
    assert "keeps the last finite state" in line
    assert path.read_bytes() == before  # the epoch-1 state, untouched
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values())


def test_a_checkpoint_with_a_nan_weight_is_refused_by_every_consumer(
        tmp_path: Path, tiny_digits: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = write_yaml(tiny_config(tmp_path, tiny_digits, epochs=1), tmp_path / "c.yaml")
    assert train(cfg) == 0
    path = tmp_path / "supernet" / "last.pth"
    state = load_checkpoint(path)
    name = next(k for k in state["model"] if k.endswith("fc1.weight"))
    state["model"][name][0, 0] = float("nan")
    save_checkpoint(state, path)
    capsys.readouterr()
    assert main(["search", "-c", str(cfg), "search.population=4", "search.generations=1"]) == 2
    one_error(capsys, f"tensor {name}")
    assert train(cfg, "supernet.epochs=2") == 2  # resuming from it
    one_error(capsys, f"model.{name} is not finite")
    arch = json.dumps({"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": [1],
                       "attn_dim": [16], "mlp_dim": [16]})
    assert main(["export", "--checkpoint", str(path), "--arch", arch, str(tmp_path / "exp")]) == 2
    one_error(capsys, f"tensor {name} is not finite")
    assert not (tmp_path / "exp").exists()


# ----------------------------------------------------------------------------- file-system faults
@pytest.fixture
def tmpfs(tmp_path: Path):
    """Mount a small tmpfs (root only); yields a function (size_kb, read_only) -> mount point."""
    mounts: list[Path] = []

    def mount(size_kb: int, read_only: bool = False) -> Path:
        point = tmp_path / f"mnt{len(mounts)}"
        point.mkdir()
        opts = f"size={size_kb}k" + (",ro" if read_only else "")
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(
        tmp_path: Path, tiny_digits: Path, tmpfs, capsys: pytest.CaptureFixture) -> None:
    probe = write_yaml(tiny_config(tmp_path / "probe", tiny_digits, epochs=1), tmp_path / "p.yaml")
    assert train(probe) == 0
    size = (tmp_path / "probe" / "supernet" / "last.pth").stat().st_size
    disk = tmpfs(size_kb=int(1.6 * size / 1024) + 64)  # one checkpoint fits, not two at once
    cfg = write_yaml(tiny_config(disk, tiny_digits, epochs=2), tmp_path / "c.yaml")
    capsys.readouterr()
    assert train(cfg) == 2
    one_error(capsys, f"cannot write {disk / 'supernet' / 'last.pth'}: no space left on device")
    state = load_checkpoint(disk / "supernet" / "last.pth")
    assert state["epoch"] == 1
    assert not [p for p in (disk / "supernet").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("stage", ["train-supernet", "rank"])
def test_a_read_only_output_folder_is_one_line(tmp_path: Path, tiny_digits: Path, tmpfs, stage: str,
                                               capsys: pytest.CaptureFixture) -> None:
    disk = tmpfs(size_kb=64, read_only=True)
    cfg = write_yaml(tiny_config(disk / "run", tiny_digits), tmp_path / "c.yaml")
    assert main([stage, "-c", str(cfg), "rank.ground_truth_epochs=1"]) == 2
    one_error(capsys, f"cannot write into {disk}: read-only file system")


@pytest.mark.parametrize("in_the_way", ["", "supernet"])
def test_a_file_where_a_folder_is_needed_is_one_line(tmp_path: Path, tiny_digits: Path, in_the_way: str,
                                                     capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    blocker = out / in_the_way if in_the_way else out
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder")
    cfg = write_yaml(tiny_config(out, tiny_digits), tmp_path / "c.yaml")
    assert train(cfg) == 2
    one_error(capsys, f"{blocker} is a file, not a folder")
    assert blocker.read_text() == "not a folder"


# ----------------------------------------------------------------------------- images
@pytest.fixture
def images(tmp_path: Path, tiny_digits: Path) -> Path:
    """A private copy of the tiny digits, to damage."""
    root = tmp_path / "data"
    shutil.copytree(tiny_digits, root)
    return root


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_corrupt_image_is_named_or_skipped_and_counted(images: Path, split: str) -> None:
    victim = sorted((images / split / "3").iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:40])  # a truncated PNG
    cfg = DataConfig(root=str(images))
    dataset = build_dataset(cfg, split, 32, is_training=False)
    with pytest.raises(UserError, match=f"image {victim} cannot be decoded"):
        for i in range(len(dataset)):
            dataset[i]
    skipping = build_dataset(DataConfig(root=str(images), broken_images="skip"), split, 32, False)
    assert len(skipping) == len(dataset) - 1 and skipping.skipped == [victim]
    assert victim not in {p for p, _ in skipping.samples}


def test_evaluate_reports_the_images_it_scored(images: Path, tmp_path: Path, capsys) -> None:
    from vitas.supernet.export import export
    from vitas.supernet.static import StaticViT

    model = StaticViT({"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": [1],
                       "attn_dim": [16], "mlp_dim": [16]}, num_classes=10, img_size=32)
    export(model, tmp_path / "model")
    victim = sorted((images / "val" / "5").iterdir())[0]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "model"), "--data", str(images)]) == 2
    one_error(capsys, f"image {victim} cannot be decoded")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "model"), "--data", str(images),
                 "data.broken_images=skip"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 39


def test_a_16_bit_image_is_scaled_not_clipped(images: Path) -> None:
    ramp = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64)  # 0 .. 65472
    path = images / "val" / "0" / "ramp16.png"
    Image.fromarray(ramp).save(path)  # uint16: Pillow's mode I;16
    pixels = np.asarray(open_image(path))[..., 0].astype(int)
    assert pixels.min() == 0 and pixels.max() == 255
    assert len(np.unique(pixels)) > 200  # a ramp, not a black-and-white clip
    assert np.all(np.diff(pixels.reshape(-1)) >= 0)
    dataset = build_dataset(DataConfig(root=str(images)), "val", 32, is_training=False)
    assert path in {p for p, _ in dataset.samples}


def test_a_decompression_bomb_is_one_line(images: Path, tmp_path: Path, capsys) -> None:
    bomb = images / "val" / "1" / "bomb.png"
    Image.new("1", (14000, 14000)).save(bomb)  # 196 Mpixel (> 2x Pillow's limit), a few kB on disk
    from vitas.supernet.export import export
    from vitas.supernet.static import StaticViT

    export(StaticViT({"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": [1], "attn_dim": [16],
                      "mlp_dim": [16]}, num_classes=10, img_size=32), tmp_path / "model")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "model"), "--data", str(images)]) == 2
    one_error(capsys, f"image {bomb} is too large to decode safely")


def test_symlink_loops_neither_multiply_nor_hang(images: Path) -> None:
    cls = images / "train" / "4"
    before = list_images(cls)
    (cls / "loop").symlink_to(cls, target_is_directory=True)
    (cls / "sub").mkdir()
    (cls / "sub" / "back").symlink_to(cls, target_is_directory=True)
    (cls / "sub" / "forth").symlink_to(cls / "sub", target_is_directory=True)
    assert list_images(cls) == before
    assert len(build_dataset(DataConfig(root=str(images)), "train", 32, False)) == 120


# ----------------------------------------------------------------------------- checkpoints as data
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_digits: Path) -> Path:
    base = tmp_path_factory.mktemp("trained")
    cfg = write_yaml(tiny_config(base / "run", tiny_digits, epochs=1), base / "c.yaml")
    assert train(cfg) == 0
    return base


def edited(trained: Path, tmp_path: Path, edit) -> Path:
    shutil.copytree(trained / "run", tmp_path / "run")
    path = tmp_path / "run" / "supernet" / "last.pth"
    state = load_checkpoint(path)
    edit(state, path)
    cfg = json.loads(json.dumps(tiny_config(tmp_path / "run", Path(state["config"]["data"]["root"]), epochs=2)))
    return write_yaml(cfg, tmp_path / "c.yaml")


def _shape(state: dict, path: Path) -> None:
    key = next(k for k in state["model"] if k.endswith("fc2.weight"))
    state["model"][key] = torch.zeros(3, 3)
    save_checkpoint(state, path)


def _epoch_string(state: dict, path: Path) -> None:
    save_checkpoint({**state, "epoch": "1"}, path)


def _text(state: dict, path: Path) -> None:
    path.write_text("this is not a checkpoint\n")


@pytest.mark.parametrize("edit, needle", [
    (_shape, "does not fit this model: size mismatch for blocks.0.mlp.fc2.weight"),
    (_epoch_string, "entry 'epoch' is a str, expected int"),
    (_text, "cannot read checkpoint"),
])
def test_an_edited_checkpoint_is_one_line(trained: Path, tmp_path: Path, edit, needle: str,
                                          capsys: pytest.CaptureFixture) -> None:
    cfg = edited(trained, tmp_path, edit)
    assert train(cfg) == 2
    one_error(capsys, needle)


def test_a_search_state_given_as_a_superformer_is_one_line(trained: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    state = tmp_path / "search.pth"
    save_checkpoint({"search": {"generation": 1}, "signature": {}}, state)
    cfg = write_yaml(tiny_config(trained / "run", Path(load_checkpoint(
        trained / "run" / "supernet" / "last.pth")["config"]["data"]["root"])), tmp_path / "c.yaml")
    assert main(["search", "-c", str(cfg), f"supernet.checkpoint={state}", f"output_dir={tmp_path / 'o'}"]) == 2
    one_error(capsys, "is not a superformer checkpoint: entry 'model' is missing")


def test_a_search_whose_holdout_overlaps_the_superformers_training_images_is_refused(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = write_yaml(tiny_config(trained / "run", Path(load_checkpoint(
        trained / "run" / "supernet" / "last.pth")["config"]["data"]["root"])), tmp_path / "c.yaml")
    assert main(["search", "-c", str(cfg), f"output_dir={tmp_path / 'o'}",
                 f"supernet.checkpoint={trained / 'run' / 'supernet' / 'last.pth'}",
                 "data.holdout_per_class=3"]) == 2
    one_error(capsys, "was trained with data.holdout_per_class=2 but this search has 3")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- schedules
def test_extending_a_finished_run_follows_the_new_schedule(tmp_path: Path, tiny_digits: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    """After 1 epoch, asking for 3 continues on the 3-epoch cosine, the same learning rates a
    run planned for 3 epochs takes from there on (and says so)."""
    short = write_yaml(tiny_config(tmp_path / "short", tiny_digits, epochs=1, warmup_epochs=0),
                       tmp_path / "s.yaml")
    planned = write_yaml(tiny_config(tmp_path / "planned", tiny_digits, epochs=3, warmup_epochs=0),
                         tmp_path / "p.yaml")
    assert train(short) == 0
    capsys.readouterr()
    assert train(short, "supernet.epochs=3") == 0
    assert "the learning-rate schedule now follows 3 epochs" in capsys.readouterr().err
    assert train(planned) == 0

    def lrs(folder: Path) -> dict[int, float]:
        rows = [json.loads(line) for line in (folder / "supernet" / "log.jsonl").read_text().splitlines()]
        return {r["step"]: r["train/lr"] for r in rows if "train/lr" in r}

    extended, reference = lrs(tmp_path / "short"), lrs(tmp_path / "planned")
    later = [s for s in reference if s > 5]
    assert later and all(extended[s] == pytest.approx(reference[s]) for s in later)
