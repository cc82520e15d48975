"""Superformer training (`vitas train-supernet`, submitit entry "vitas.supernet.train:run").

Sampling modes (`supernet.sampling`), each step's passes on the same batch, gradients summed:
- `uniform` (AutoFormer): one random subnet; its side is random where a policy is bilateral.
- `autoslim`: one random subnet on the left pass only.
- `bcnet` (BCNet): one random subnet on the left and on the right pass, a loss on each.
- `sandwich` (BigNAS): the max, the min and a random subnet; with `supernet.distill` the min and
  random subnets learn from the max subnet's soft predictions (in-place distillation).
Every rank takes the same subnets at every step: they are drawn from a generator seeded by
(seed, global step). The loop (DDP, AMP, clipping, EMA, schedule, last.pth every epoch and every
`save_every_steps`, auto-resume) is `core.engine.Trainer`. Each epoch validates min, max and
`val_random_archs` fixed random subnets on the val split. Outputs in `<output_dir>/supernet/`:
`config.yaml`, `last.pth` (`model`, `ema`, `config`, `space`, `num_classes`, `epoch`, `step`,
optimizer state, ...), `log.jsonl` + TensorBoard events, and `summary.json` at the end.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup

from vitas.core import dist
from vitas.core.checkpoint import write_json
from vitas.core.config import Config, save_config
from vitas.core.data import (build_splits, check_mixup_batch, create_loader, create_loss, create_mixup,
                       num_classes)
from vitas.core.engine import (Trainer, check_recipe, check_same_across_ranks, configure_determinism,
                         create_train_loader, derive_seed)
from vitas.core.errors import UserError
from vitas.core.logs import RunLogger, setup_logging
from vitas.core.metrics import evaluate_accuracy
from vitas.supernet.model import Superformer
from vitas.supernet.space import SearchSpace

STAGE = "supernet"
SAMPLINGS = ("uniform", "autoslim", "bcnet", "sandwich")
_STEP_STREAM, _VAL_STREAM = 1, 2  # separate seed streams: per-step subnets, validation subnets

log = logging.getLogger("vitas.supernet")


@dataclass(frozen=True)
class Pass:
    """One forward/backward of a step: a subnet on one side, named for its logged loss."""

    name: str
    arch: dict
    side: str = "left"


def is_bilateral(space: SearchSpace) -> bool:
    """Whether any dimension uses the bilateral (BCNet) policy, i.e. a right pass exists."""
    return space.cfg.channels.bilateral


def step_passes(space: SearchSpace, sampling: str, seed: int, step: int) -> list[Pass]:
    """The subnets of global step `step`: a function of (seed, step) only, so equal on all ranks."""
    rng = np.random.default_rng(derive_seed(seed, _STEP_STREAM, step))
    arch = space.sample(rng)
    if sampling == "uniform":
        side = "right" if is_bilateral(space) and rng.integers(2) else "left"
        return [Pass("rand", arch, side)]
    if sampling == "autoslim":
        return [Pass("rand", arch, "left")]
    if sampling == "bcnet":
        return [Pass("left", arch, "left"), Pass("right", arch, "right")]
    if sampling == "sandwich":  # min and random on one side per step, as uniform draws it
        side = "right" if is_bilateral(space) and rng.integers(2) else "left"
        return [Pass("max", space.max_arch()), Pass("min", space.min_arch(), side),
                Pass("rand", arch, side)]
    raise UserError(f"supernet.sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")


def validation_archs(space: SearchSpace, count: int, seed: int) -> dict[str, dict]:
    """The fixed subnets validated every epoch: max, min and `count` seeded random ones."""
    rng = np.random.default_rng(derive_seed(seed, _VAL_STREAM))
    archs = {"max": space.max_arch(), "min": space.min_arch()}
    archs.update({f"rand{i}": space.sample(rng) for i in range(count)})
    return archs


def check_section(cfg: Config) -> None:
    """UserErrors for supernet settings no run can honour, naming the key."""
    sec = cfg.supernet
    if sec.sampling not in SAMPLINGS:
        raise UserError(f"supernet.sampling must be one of {', '.join(SAMPLINGS)}, got {sec.sampling!r}")
    check_recipe(sec, "supernet")
    if sec.val_random_archs < 0:
        raise UserError(f"supernet.val_random_archs must be >= 0, got {sec.val_random_archs}")
    if sec.sampling == "bcnet" and not cfg.space.channels.bilateral:
        raise UserError("supernet.sampling=bcnet needs a bilateral channel policy in space.channels "
                        "(embed, attn or mlp): without one the right pass repeats the left")
    if sec.distill and sec.sampling != "sandwich":
        raise UserError("supernet.distill needs supernet.sampling=sandwich (the max subnet teaches)")


def make_train_step(trainer: Trainer, space: SearchSpace, cfg: Config, mixup: Optional[Mixup],
                    criterion: torch.nn.Module) -> Callable[[Any], dict]:
    """The per-step function for `Trainer.fit`: the step's passes on one batch, losses summed."""
    sec = cfg.supernet
    model: Superformer = trainer.model  # type: ignore[assignment]

    def train_step(batch: Any) -> dict:
        images, target = (t.to(trainer.device, non_blocking=True) for t in batch)
        if mixup is not None:
            images, target = mixup(images, target)
        passes = step_passes(space, sec.sampling, sec.seed, trainer.global_step)
        if sec.log_every_steps and (trainer.global_step + 1) % sec.log_every_steps == 0:
            check_same_across_ranks([(space.key(p.arch), p.side) for p in passes], "the step's subnets")
        scalars, total, soft = {}, 0.0, None
        for i, p in enumerate(passes):
            model.set_active(p.arch, p.side)
            with trainer.accumulate(last=i == len(passes) - 1):
                with trainer.autocast():
                    logits = trainer.wrapped(images)
                    if soft is not None:  # in-place distillation from the max subnet
                        loss = torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
                    else:
                        loss = criterion(logits, target)
                trainer.backward(loss)
            if sec.distill and p.name == "max":
                soft = F.softmax(logits.detach().float(), dim=-1)
            scalars[f"loss_{p.name}"] = loss.item()
            total += loss.item()
        scalars["loss"] = total
        return scalars

    return train_step


def validate(model: Superformer, archs: dict[str, dict], loader: Any, device: torch.device,
             sides: tuple[str, ...]) -> dict[str, dict]:
    """Top-1/top-5 of each named subnet on `loader`, averaged over `sides` (bilateral spaces)."""
    out = {}
    for name, arch in archs.items():
        per_side = []
        for side in sides:
            model.set_active(arch, side)
            per_side.append(evaluate_accuracy(model, loader, device))
        out[name] = {"top1": float(np.mean([r["top1"] for r in per_side])),
                     "top5": float(np.mean([r["top5"] for r in per_side])),
                     "images": per_side[0]["images"]}
        if len(sides) > 1:
            out[name].update({f"top1_{s}": r["top1"] for s, r in zip(sides, per_side)})
    return out


def _scalars(results: dict[str, dict], prefix: str) -> dict[str, float]:
    """`{prefix/<name>_top1: ...}` plus the mean top-1 over the subnets."""
    flat = {f"{prefix}/{n}_{k}": v for n, r in results.items() for k, v in r.items() if k != "images"}
    flat[f"{prefix}/mean_top1"] = float(np.mean([r["top1"] for r in results.values()]))
    return flat


def train(cfg: Config, info: dist.DistInfo) -> dict:
    """Train the superformer of `cfg` in the current process group; returns the summary."""
    check_section(cfg)
    sec = cfg.supernet
    configure_determinism(sec.seed, sec.deterministic)
    space = SearchSpace(cfg.space)
    n_classes = num_classes(cfg.data)
    out_dir = cfg.stage_dir(STAGE)
    splits = build_splits(cfg.data, cfg.space.img_size)
    loader = create_train_loader(splits.train, sec.batch_size, sec.seed, workers=cfg.data.workers)
    local_batch = sec.batch_size // info.world_size
    val_loader = create_loader(splits.val, local_batch, shuffle=False, workers=cfg.data.workers)
    mixup = create_mixup(cfg.data, n_classes)
    check_mixup_batch(mixup, "supernet.batch_size", sec.batch_size, info.world_size)
    criterion = create_loss(cfg.data, mixup is not None)

    model = Superformer(space, n_classes, drop_path=sec.drop_path)
    trainer = Trainer(model, sec, loader.batch_sampler.steps_per_epoch, out_dir, info.device,
                      extra_state={"config": cfg.to_dict(), "space": space.spec(),
                                   "num_classes": n_classes})
    if trainer.resume(check=lambda state: space.check_spec(state["space"], where=str(trainer.path))):
        log.info("resuming from %s: epoch %d, step %d", trainer.path, trainer.epoch, trainer.global_step)
    else:
        log.info("starting %s: %d epochs of %d steps, %d process(es), sampling %s", out_dir, sec.epochs,
                 trainer.steps_per_epoch, info.world_size, sec.sampling)

    if dist.is_main():
        save_config(cfg, out_dir / "config.yaml")
    archs = validation_archs(space, sec.val_random_archs, sec.seed)
    sides = ("left", "right") if is_bilateral(space) else ("left",)
    last: dict[str, Any] = {}

    def on_epoch_end(epoch: int) -> dict:
        last["val"] = validate(model, archs, val_loader, info.device, sides)
        scalars = _scalars(last["val"], "val")
        if trainer.ema is not None:
            last["ema"] = validate(trainer.ema.module, {k: archs[k] for k in ("max", "min")},
                                   val_loader, info.device, sides)
            scalars.update(_scalars(last["ema"], "val_ema"))
        log.info("epoch %d/%d: val top-1 max %.2f min %.2f mean %.2f", epoch + 1, sec.epochs,
                 last["val"]["max"]["top1"], last["val"]["min"]["top1"], scalars["val/mean_top1"])
        return scalars

    tic = time.perf_counter()
    with RunLogger(out_dir) as logger:
        trainer.fit(loader, make_train_step(trainer, space, cfg, mixup, criterion), logger,
                    on_epoch_end=on_epoch_end, desc="supernet")
    if "val" not in last:  # resumed a finished run: nothing trained, validate for the summary
        on_epoch_end(sec.epochs - 1)
    summary = {
        "max_top1": last["val"]["max"]["top1"], "min_top1": last["val"]["min"]["top1"],
        "val": {name: {**r, "arch": archs[name]} for name, r in last["val"].items()},
        "epochs": trainer.epoch, "steps": trainer.global_step, "world_size": info.world_size,
        "sampling": sec.sampling, "train_seconds": round(time.perf_counter() - tic, 1),
        "resumed_from": list(trainer.resumed_from) if trainer.resumed_from else None,
    }
    if "ema" in last:
        summary["ema"] = last["ema"]
    if dist.is_main():
        write_json(summary, out_dir / "summary.json")
    dist.barrier()
    return summary


def run(cfg: Config) -> dict:
    """Entry point for the CLI, torchrun and submitit: join the process group, train, leave."""
    info = dist.init_distributed()
    setup_logging()
    try:
        return train(cfg, info)
    finally:
        dist.cleanup()
