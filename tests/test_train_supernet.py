"""Superformer training in one process: sampling plans, the global-batch sampler, optimizer hygiene
(parameters a step does not use stay bit-identical), outputs, a space mismatch on resume, and a run
killed with SIGKILL at three random steps that ends bitwise equal to an uninterrupted run.

Shared set-up lives in train_setup.py (tiny space, configs) and conftest.py (tiny digits).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from vitas.core.checkpoint import load_checkpoint
from vitas.core.config import config_from_dict
from vitas.core.engine import GlobalBatchSampler, Trainer
from vitas.core.errors import UserError
from vitas.supernet.model import Superformer
from vitas.supernet.sampling import step_passes, validation_archs
from vitas.cli import main

from train_setup import ROOT, cli, state_tensors, tiny_config, tiny_space, train_env, write_yaml


# ----------------------------------------------------------------------------- unit tests
def test_step_passes_per_mode_and_deterministic() -> None:
    space = tiny_space(channels={"embed": "left", "attn": "bilateral", "mlp": "left"})
    names = {mode: [(p.name, p.side) for p in step_passes(space, mode, 0, 5)]
             for mode in ("autoslim", "bcnet", "sandwich")}
    assert names == {"autoslim": [("rand", "left")], "bcnet": [("left", "left"), ("right", "right")],
                     "sandwich": [("max", "left"), ("min", "left"), ("rand", "left")]}
    # A bilateral space's min and random subnets train both sides over the steps, one per step.
    sides = {tuple(p.side for p in step_passes(space, "sandwich", 0, s)) for s in range(20)}
    assert sides == {("left", "left", "left"), ("left", "right", "right")}
    sandwich = step_passes(space, "sandwich", 0, 5)
    assert sandwich[0].arch == space.max_arch() and sandwich[1].arch == space.min_arch()
    bc = step_passes(space, "bcnet", 0, 5)
    assert bc[0].arch == bc[1].arch
    # Same (seed, step) -> same subnets; steps differ; uniform takes both sides of a bilateral space.
    assert step_passes(space, "uniform", 0, 7) == step_passes(space, "uniform", 0, 7)
    uniform = [step_passes(space, "uniform", 0, s)[0] for s in range(40)]
    assert len({space.key(p.arch) for p in uniform}) > 10
    assert {p.side for p in uniform} == {"left", "right"}
    assert validation_archs(space, 2, 0) == validation_archs(space, 2, 0)
    # More random subnets a step: bcnet trains each on both sides; sandwich's take the step's side.
    bc2 = step_passes(space, "bcnet", 0, 5, random_subnets=2)
    assert [(p.name, p.side) for p in bc2] == [("left", "left"), ("right", "right"),
                                               ("left2", "left"), ("right2", "right")]
    assert bc2[:2] == bc and bc2[2].arch == bc2[3].arch
    sides2 = {tuple(p.side for p in step_passes(space, "sandwich", 0, s, random_subnets=2)) for s in range(20)}
    assert sides2 == {("left",) * 4, ("left", "right", "right", "right")}
    extras = [p for s in range(40) for p in step_passes(space, "uniform", 0, s, random_subnets=2)[1:]]
    assert {p.side for p in extras} == {"left", "right"}


def test_global_batch_sampler_slices_and_resume() -> None:
    one = GlobalBatchSampler(50, 8, rank=0, world_size=1, seed=1)
    halves = [GlobalBatchSampler(50, 8, rank=r, world_size=2, seed=1) for r in range(2)]
    for s in (one, *halves):
        s.set_epoch(3)
    batches = list(one)
    assert len(batches) == one.steps_per_epoch == 6 and len({i for b in batches for i, _ in b}) == 48
    assert [a + b for a, b in zip(*(list(h) for h in halves))] == batches  # same global batch
    one.set_epoch(3, start_step=4)
    assert list(one) == batches[4:] and len(one) == 2
    one.set_epoch(4)
    assert list(one) != batches  # a new order each epoch
    with pytest.raises(Exception, match="divisible"):
        GlobalBatchSampler(50, 9, rank=0, world_size=2)


def test_unused_parameters_stay_bit_identical(tmp_path: Path) -> None:
    """A step on a small subnet: parameters it never touches (other stem, other head count's q/k,
    the second block) keep grad None and exact values under AdamW with weight decay."""
    space = tiny_space()
    model = Superformer(space, 10)
    cfg = config_from_dict(tiny_config(tmp_path, tmp_path, weight_decay=0.5, lr=0.1, warmup_epochs=0,
                                       clip_grad=1.0))
    trainer = Trainer(model, cfg.supernet, 5, tmp_path, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    arch = {"patch_size": 16, "embed_dim": 16, "depth": 1, "num_heads": [1], "attn_dim": [16],
            "mlp_dim": [16]}
    model.set_active(arch)
    used = {id(p) for p in model.active_parameters()}
    for _ in range(2):  # the second step also has AdamW state for the used parameters
        loss = torch.nn.functional.cross_entropy(trainer.wrapped(torch.randn(4, 3, 32, 32)),
                                                 torch.tensor([0, 1, 2, 3]))
        trainer.backward(loss)
        trainer.step()
    unused = [n for n, p in model.named_parameters() if id(p) not in used]
    assert any(n.startswith("stems.8.") for n in unused) and any(n.startswith("blocks.1.") for n in unused)
    assert any(".attn." in n and n.startswith("blocks.0.") for n in unused)  # other head count's q/k
    params = dict(model.named_parameters())
    for name in unused:
        assert params[name].grad is None and torch.equal(params[name], before[name]), name
    assert all(not torch.equal(params[n], before[n]) for n in params if n not in unused
               and n.endswith("weight") and "norm" not in n)


# ----------------------------------------------------------------------------- whole runs
def run_cli(yaml_path: Path, *overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cli("train-supernet", "-c", str(yaml_path), *overrides), cwd=ROOT,
                          env=train_env(), capture_output=True, text=True, timeout=timeout)


def logged_steps(log: Path) -> int:
    if not log.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def kill_at(yaml_path: Path, log: Path, step: int, timeout: float = 180) -> None:
    """Start the training command and SIGKILL it once it has logged `step` (or later)."""
    proc = subprocess.Popen(cli("train-supernet", "-c", str(yaml_path)), cwd=ROOT, env=train_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while logged_steps(log) < step:
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, f"step {step} not reached in {timeout}s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()


# name -> (supernet options, space changes, a state key that only the changed space has)
OPTION_SETS = {
    "sandwich-distill-per-patch-norms-progressive": ({"distill": True, "patch_cycle": True, "random_subnets": 2,
                                                     "progressive": ["embed_dim", "depth"], "progressive_epochs": 2},
                                                    {"norms": "per_patch"}, "blocks.0.norm1.8.weight"),
    "uniform-options-per-patch-blocks": ({"sampling": "uniform", "distill": True, "distill_loss": "alpha",
                                          "cost_sampling": "macs_bins", "cost_bins": 3, "grad_projection": True,
                                          "identity_shift": False}, {"blocks": "per_patch"},
                                         "patch_blocks.16.1.mlp.fc1.weight"),
}


@pytest.mark.long
@pytest.mark.parametrize("options", list(OPTION_SETS))
def test_sigkill_at_three_random_steps_resumes_bitwise(tmp_path: Path, tiny_digits: Path, options: str) -> None:
    """With augmentation, Mixup, drop path, EMA and the training options on, killed three times
    and started again with the same command, the run ends with exactly the weights of an
    uninterrupted one."""
    tree = tiny_config(tmp_path / "straight", tiny_digits, augment=True, save_every_steps=1,
                       deterministic=True, ema=True, ema_decay=0.9, drop_path=0.1, **OPTION_SETS[options][0])
    tree["space"] = {**tree["space"], **OPTION_SETS[options][1]}
    tree["data"]["mixup"] = 0.8  # RandAugment, random erasing, Mixup and CutMix all on
    # Magnitude capped at 9: at 10 timm's increasing posterize keeps 0 bits, which Pillow >= 11 refuses.
    tree["data"]["auto_augment"] = "rand-m9-mstd0.5-inc1-mmax9"
    straight = write_yaml(tree, tmp_path / "straight.yaml")
    killed = write_yaml({**tree, "output_dir": str(tmp_path / "killed")}, tmp_path / "killed.yaml")

    done = run_cli(straight)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = sorted(random.Random(os.getpid()).sample(range(1, 10), 3))
    log = tmp_path / "killed" / "supernet" / "log.jsonl"
    for step in steps:
        kill_at(killed, log, step)
    resumed = run_cli(killed)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr

    a = load_checkpoint(tmp_path / "straight" / "supernet" / "last.pth")
    b = load_checkpoint(tmp_path / "killed" / "supernet" / "last.pth")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 10)
    assert OPTION_SETS[options][2] in a["model"]  # the space took
    ta, tb = state_tensors(a), state_tensors(b)
    assert ta.keys() == tb.keys()
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"killed at steps {steps}: {differ[:5]}"
    assert not list((tmp_path / "killed" / "supernet").glob(".last.pth.*"))  # no torn temporaries

    # Started once more, a finished run trains nothing and reports the same numbers.
    again = run_cli(killed)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["steps"] == 10
    summary = json.loads((tmp_path / "killed" / "supernet" / "summary.json").read_text())
    assert summary["train_seconds"] >= round(b["train_seconds"], 1) > 0  # the run's time, all sessions
    assert torch.equal(load_checkpoint(tmp_path / "killed" / "supernet" / "last.pth")["model"]["head.weight"],
                       b["model"]["head.weight"])


def test_outputs_and_space_mismatch(tmp_path: Path, tiny_digits: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    """One epoch of uniform sampling in-process: the files other stages read; then the same
    output_dir with another space fails with one line naming the field (exit 2)."""
    cfg_path = write_yaml(tiny_config(tmp_path, tiny_digits, epochs=1, sampling="uniform", ema=True),
                          tmp_path / "c.yaml")
    assert main(["train-supernet", "-c", str(cfg_path)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = tmp_path / "supernet"
    summary = json.loads((out / "summary.json").read_text())
    assert report["max_top1"] == summary["max_top1"] and 0.0 <= summary["min_top1"] <= 100.0
    assert summary["val"]["max"]["images"] == 40 and summary["epochs"] == 1 and summary["steps"] == 5
    state = load_checkpoint(out / "last.pth")
    assert {"model", "ema", "config", "space", "epoch", "step", "optimizer", "scheduler", "rng",
            "num_classes"} <= state.keys()
    space = tiny_space()
    assert state["space"] == space.spec() and state["config"]["supernet"]["sampling"] == "uniform"
    Superformer(space, state["num_classes"]).load_state_dict(state["model"])  # strict
    assert yaml.safe_load((out / "config.yaml").read_text())["supernet"]["epochs"] == 1
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"train/loss", "train/lr"} <= logged[0].keys() and "val/max_top1" in logged[-1]
    assert "val_ema/max_top1" in logged[-1] and list(out.glob("events.out.tfevents.*"))

    assert main(["train-supernet", "-c", str(cfg_path), "space.embed_dim=[16,32]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "embed_dim" in err[0] and err[0].startswith("vitas: error:")
    assert main(["train-supernet", "-c", str(cfg_path), "supernet.sampling=random"]) == 2
    assert "supernet.sampling" in capsys.readouterr().err
    assert summary["progressive"] == []
    # More epochs continue the run; another sampling option would continue another training.
    for change in (["supernet.distill=true"], ["supernet.progressive=[depth]"], ["supernet.seed=1"],
                   ["supernet.random_subnets=2"]):
        assert main(["train-supernet", "-c", str(cfg_path), "supernet.epochs=3", *change]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        name = change[0].split("=")[0]
        assert len(err) == 1 and f"was trained with {name}=" in err[0], err
    assert load_checkpoint(out / "last.pth")["epoch"] == 1


def test_a_checkpoint_without_an_option_had_its_default() -> None:
    from vitas.core.config import SupernetConfig
    from vitas.supernet.train import _check_sampling

    old = {"config": {"supernet": {"sampling": "sandwich", "seed": 0}}}  # written before the options existed
    _check_sampling(old, SupernetConfig(sampling="sandwich"), "last.pth")
    with pytest.raises(UserError, match="supernet.patch_cycle=False"):
        _check_sampling(old, SupernetConfig(sampling="sandwich", patch_cycle=True), "last.pth")
    # More epochs would move the default progressive schedule; an explicit span keeps it.
    shrinking = {"config": {"supernet": {"epochs": 10, "progressive": ["depth"]}}}
    with pytest.raises(UserError, match="over 5 epochs; this config over 10: set supernet.progressive_epochs=5"):
        _check_sampling(shrinking, SupernetConfig(epochs=20, progressive=["depth"]), "last.pth")
    _check_sampling(shrinking, SupernetConfig(epochs=10, progressive=["depth"]), "last.pth")
    _check_sampling(shrinking, SupernetConfig(epochs=20, progressive=["depth"], progressive_epochs=5), "last.pth")
    with pytest.raises(UserError, match="over 5 epochs; this config over 4"):
        _check_sampling(shrinking, SupernetConfig(epochs=20, progressive=["depth"], progressive_epochs=4), "last.pth")


BAD_SUPERNET = [  # (override, text the one error line must contain)
    ("supernet.opt=bogus", "supernet.opt: 'bogus' is not a timm optimizer"),
    ("supernet.batch_size=0", "supernet.batch_size must be >= 1, got 0"),
    ("supernet.lr=-1", "supernet.lr must be a number > 0"),
    ("supernet.min_lr=.nan", "supernet.min_lr"),
    ("supernet.warmup_epochs=-1", "supernet.warmup_epochs must be >= 0"),
    ("supernet.ema_decay=1.5", "supernet.ema_decay must be in [0, 1)"),
    ("supernet.drop_path=-0.1", "supernet.drop_path"),
    ("supernet.clip_grad=-5", "supernet.clip_grad"),
    ("supernet.seed=-1", "supernet.seed"),
    ("supernet.val_random_archs=-1", "supernet.val_random_archs must be >= 0"),
    ("supernet.progressive=[width]", "supernet.progressive: unknown arch field 'width'"),
    ("supernet.progressive=[depth,embed_dim,mlp_dim]", "an epoch per item"),
    ("data.workers=-1", "data.workers must be >= 0"),
    ("data.auto_augment=bogus", "data.auto_augment"),
    ("data.holdout_per_class=-1", "data.holdout_per_class"),
]


@pytest.mark.parametrize("override, needle", BAD_SUPERNET, ids=[o for o, _ in BAD_SUPERNET])
def test_bad_settings_are_one_line_and_write_nothing(tmp_path: Path, tiny_digits: Path,
                                                    capsys: pytest.CaptureFixture,
                                                    override: str, needle: str) -> None:
    out = tmp_path / "run"
    cfg_path = write_yaml(tiny_config(out, tiny_digits), tmp_path / "c.yaml")
    assert main(["train-supernet", "-c", str(cfg_path), override]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("20")]
    assert len(lines) == 1 and lines[0].startswith("vitas: error: ") and needle in lines[0], lines
    assert not out.exists()
