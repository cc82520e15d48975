"""Superformer training under DDP on CPU (gloo, 2 processes through torchrun), no mocks:
- `vitas train-supernet` under torchrun over a global batch ends with the weights of one process
  over the same batches (sandwich with in-place distillation: three passes, two under no_sync);
- every rank activates the same subnets in the same order (a spy on `Superformer.set_active`,
  all-gathered), and after a step the parameters no pass used keep grad None and exact values on
  every rank while all the others agree bitwise across ranks.

Run as a script, this file is the worker: `python tests/test_train_ddp.py CONFIG.yaml OUT_DIR`.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

from vitas.core.checkpoint import load_checkpoint
from train_setup import cli, tiny_config, train_env, write_yaml

ROOT = Path(__file__).resolve().parents[1]


def worker(cfg_path: Path, out: Path) -> None:
    """One rank: train with a spy on set_active, then one hand-made two-pass DDP step."""
    from vitas.core import dist
    from vitas.core.config import load_config
    from vitas.core.engine import Trainer
    from vitas.supernet.model import Superformer
    from vitas.supernet.space import SearchSpace
    from vitas.core.stage import execute
    from vitas.supernet.train import STAGE

    cfg = load_config(cfg_path)
    space = SearchSpace(cfg.space)
    calls: list[tuple[str, str]] = []
    set_active = Superformer.set_active

    def recording(self: Superformer, arch: dict, side: str = "left", layers: Optional[tuple[int, ...]] = None) -> None:
        calls.append((space.key(arch), side, layers))
        set_active(self, arch, side, layers)

    Superformer.set_active = recording  # type: ignore[method-assign]
    info = dist.init_distributed()  # joined here, so execute leaves the group to this worker
    execute(STAGE, cfg)
    Superformer.set_active = set_active  # type: ignore[method-assign]
    gathered: list = [None] * info.world_size
    torch.distributed.all_gather_object(gathered, calls)

    # A step of two passes (the first under no_sync) on different data per rank.
    torch.manual_seed(0)
    model = Superformer(space, 10)
    trainer = Trainer(model, cfg.supernet, 5, out / "manual", info.device)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    small = {"patch_size": 16, "embed_dim": 16, "depth": 1, "num_heads": [1], "attn_dim": [16],
             "mlp_dim": [16]}
    deeper = {**small, "depth": 2, "num_heads": [1, 1], "attn_dim": [16, 16], "mlp_dim": [16, 16]}
    used: set[int] = set()
    torch.manual_seed(100 + info.rank)
    for i, arch in enumerate((deeper, small)):  # blocks.1 is used only by the first pass
        model.set_active(arch)
        used |= {id(p) for p in model.active_parameters()}
        with trainer.accumulate(last=i == 1):
            loss = torch.nn.functional.cross_entropy(trainer.wrapped(torch.randn(4, 3, 32, 32)),
                                                     torch.randint(0, 10, (4,)))
            trainer.backward(loss)
    trainer.step()
    params = dict(model.named_parameters())
    unused = [n for n, p in params.items() if id(p) not in used]
    untouched = all(params[n].grad is None and torch.equal(params[n], before[n]) for n in unused)
    flat = {n: p.detach().clone() for n, p in params.items()}
    every: list = [None] * info.world_size
    torch.distributed.all_gather_object(every, flat)
    agree = all(torch.equal(every[0][n], other[n]) for other in every[1:] for n in flat)
    changed_block1 = not torch.equal(params["blocks.1.mlp.fc1.weight"], before["blocks.1.mlp.fc1.weight"])
    (out / f"rank{info.rank}.json").write_text(json.dumps({
        "same_calls": all(c == gathered[0] for c in gathered), "calls": len(calls),
        "unused": unused, "untouched": untouched, "ranks_agree": agree,
        "block1_updated": changed_block1}))
    dist.cleanup()


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            *args]


@pytest.mark.long
def test_two_processes_equal_one(tmp_path: Path, tiny_digits: Path) -> None:
    """The same command, under torchrun with 2 processes and alone, over the same global batches
    (per-image augmentation on, Mixup and drop path off): weights within 1e-5 (float summation
    order differs: two half-batch means averaged vs one full-batch mean; observed ~2e-8)."""
    tree = tiny_config(tmp_path / "one", tiny_digits, augment=True, epochs=1, distill=True, ema=True,
                       ema_decay=0.5)
    tree["data"].update(mixup=0.0, cutmix=0.0, auto_augment="rand-m9-mstd0.5-inc1-mmax9")
    one = write_yaml(tree, tmp_path / "one.yaml")
    two = write_yaml({**tree, "output_dir": str(tmp_path / "two")}, tmp_path / "two.yaml")
    single = subprocess.run(cli("train-supernet", "-c", str(one)), cwd=ROOT, env=train_env(),
                            capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr[-2000:]
    pair = subprocess.run(torchrun("-m", "vitas", "train-supernet", "-c", str(two)), cwd=ROOT,
                          env=train_env(), capture_output=True, text=True, timeout=240)
    assert pair.returncode == 0, pair.stderr[-3000:]
    assert "2 process(es)" in pair.stderr
    a = load_checkpoint(tmp_path / "one" / "supernet" / "last.pth")
    b = load_checkpoint(tmp_path / "two" / "supernet" / "last.pth")
    assert a["step"] == b["step"] == 5
    # The k biases get a mathematically zero gradient (softmax ignores a shift shared by all
    # keys): Adam turns their rounding noise into steps of size ~lr, so they only agree to 5 x lr.
    noise = [k for k in a["model"] if ".attn.k." in k and k.endswith(".bias")]
    for name in ("model", "ema"):
        diff = {k: (a[name][k] - b[name][k]).abs().max().item() for k in a[name]}
        worst = max(v for k, v in diff.items() if k not in noise)
        assert worst < 1e-5, (name, worst)
        assert max(diff[k] for k in noise) < 5 * tree["supernet"]["lr"]
    moved = max((a["model"][k] - a["ema"][k]).abs().max().item() for k in a["model"])
    assert moved > 1e-4  # the weights did move (the EMA lags behind them)
    summary = [json.loads(p.read_text()) for p in (tmp_path / "one" / "supernet" / "summary.json",
                                                   tmp_path / "two" / "supernet" / "summary.json")]
    assert summary[0]["val"]["max"]["images"] == summary[1]["val"]["max"]["images"] == 40


def test_ranks_share_subnets_and_leave_unused_parameters(tmp_path: Path, tiny_digits: Path) -> None:
    """bcnet on a bilateral space: both ranks make the same set_active calls (train and val); a
    two-pass step keeps unused parameters exact, syncs a parameter only the no_sync pass used."""
    tree = tiny_config(tmp_path, tiny_digits, epochs=1, sampling="bcnet", weight_decay=0.5)
    tree["space"] = {**tree["space"], "channels": {"embed": "cyclic", "attn": "bilateral",
                                                   "mlp": "bilateral"}}
    cfg_path = write_yaml(tree, tmp_path / "ddp.yaml")
    proc = subprocess.run(torchrun(__file__, str(cfg_path), str(tmp_path)), cwd=ROOT,
                          env=train_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for seen in ranks:
        assert seen["same_calls"] and seen["calls"] >= 5 * 2  # 5 steps x (left, right) + val
        assert seen["untouched"] and seen["ranks_agree"] and seen["block1_updated"]
        assert any(n.startswith("stems.8.") for n in seen["unused"])
        assert any(n.startswith("blocks.0.attn.") for n in seen["unused"])  # q/k of 2 heads


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
