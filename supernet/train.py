"""Superformer training (`vitas train-supernet`, submitit entry "vitas.supernet.train:run").

Sampling modes (`supernet.sampling`), each step's passes on the same batch, gradients summed:
- `uniform` (AutoFormer): one random subnet; its side is random where a policy is bilateral.
- `autoslim`: one random subnet on the left pass only.
- `bcnet` (BCNet): one random subnet on the left and on the right pass, a loss on each.
- `sandwich` (BigNAS): the max, the min and a random subnet; with `supernet.distill` the min and
  random subnets learn from the max subnet's soft predictions (in-place distillation).
`supernet.random_subnets` draws that many random subnets per step instead of one.
Every rank takes the same subnets at every step: they are drawn from a generator seeded by
(seed, global step). The loop (DDP, AMP, clipping, EMA, schedule, last.pth every epoch and every
`save_every_steps`, auto-resume) is `core.engine.Trainer`. Each epoch validates min, max and
`val_random_archs` fixed random subnets on the val split. Outputs in `<output_dir>/supernet/`:
`config.yaml`, `last.pth` (`model`, `ema`, `config`, `space`, `num_classes`, `epoch`, `step`,
optimizer state, ...), `log.jsonl` + TensorBoard events, and `summary.json` at the end.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup

from vitas.core.checkpoint import load_checkpoint
from vitas.core.config import Config, SupernetConfig, require_file
from vitas.core.data import (build_splits, check_data_source, check_mixup_batch, create_loader,
                             create_loss, create_mixup, num_classes, split_settings)
from vitas.core.engine import (Trainer, check_recipe, check_resume, check_same_across_ranks,
                               configure_determinism, create_train_loader)
from vitas.core.errors import UserError
from vitas.core.layout import SUPERNET, run_layout
from vitas.core.logs import RunLogger
from vitas.core.metrics import evaluate_accuracy
from vitas.core.stage import Stage, StageContext
from vitas.supernet.model import Superformer
from vitas.supernet.pretrained import check_timm_init, init_from_timm
from vitas.supernet.sampling import (SubnetSampler, is_bilateral, progressive_schedule, progressive_span,
                                     validation_archs)
from vitas.supernet.space import SearchSpace

log = logging.getLogger("vitas.supernet")


def check(cfg: Config) -> None:
    """Every user error findable before training: settings, space, data, and a last.pth this run
    could not continue (another space or data split, more epochs than asked)."""
    if cfg.space.kind == "asvit":
        raise UserError("an As-ViT space (space.kind: asvit) has no superformer to train: As-ViT "
                        "searches training-free (vitas search search.scorer=proxy) and retrains from scratch")
    sec = cfg.supernet
    check_recipe(sec, "supernet")
    if sec.sampling == "bcnet" and not cfg.space.channels.bilateral:
        raise UserError("supernet.sampling=bcnet needs a bilateral channel policy in space.channels "
                        "(embed, attn or mlp): without one the right pass repeats the left")
    if sec.grad_projection and not (sec.sampling == "sandwich" or sec.distill):
        raise UserError(f"supernet.grad_projection projects onto the max subnet's gradient, which "
                        f"supernet.sampling={sec.sampling} without supernet.distill never computes: "
                        f"use sampling=sandwich or distill=true")
    if sec.patch_cycle and not (sec.sampling == "sandwich" or sec.distill):
        raise UserError(f"supernet.patch_cycle cycles the patch size of the max and min passes, which "
                        f"supernet.sampling={sec.sampling} without supernet.distill does not take: "
                        f"use sampling=sandwich or distill=true")
    if not sec.identity_shift and not cfg.space.identity:
        raise UserError("supernet.identity_shift=false places identity layers anywhere in the stack; "
                        "this space has none (space.identity: false)")
    if sec.max_warmup_epochs >= sec.epochs:
        raise UserError(f"supernet.max_warmup_epochs={sec.max_warmup_epochs} leaves no epoch for the "
                        f"other subnets (supernet.epochs={sec.epochs})")
    space = SearchSpace(cfg.space)
    progressive_schedule(space, sec)
    check_data_source(cfg.data, holdout=True)
    if sec.init:
        check_timm_init(require_file(sec.init, "supernet.init"), space)
    path = run_layout(cfg.output_dir).supernet_checkpoint
    if path.is_file():
        state = load_checkpoint(path, mmap=True)
        check_resume(state, sec, path, "supernet")
        space.check_spec(state.get("space", {}), str(path))
        _check_split(state, cfg, path)
        _check_sampling(state, sec, path)


def _check_split(state: dict, cfg: Config, path: Any) -> None:
    """A superformer continues only on the training images it started with."""
    saved = state.get("split")
    if saved is not None and saved != split_settings(cfg.data):
        changed = next(k for k in saved if saved[k] != split_settings(cfg.data).get(k))
        raise UserError(f"{path} was trained without the hold-out of {changed}={saved[changed]!r}; "
                        f"this config has {split_settings(cfg.data).get(changed)!r} (use another output_dir)")


# The settings that decide which subnets each step trains and with which losses: a run resumed
# with another value would continue a different training than the one it started.
SAMPLING_OPTIONS = ("seed", "sampling", "random_subnets", "distill", "distill_loss", "cost_sampling", "cost_bins",
                    "grad_projection", "max_warmup_epochs", "patch_cycle", "identity_shift", "progressive")


def _check_sampling(state: dict, sec: SupernetConfig, path: Any) -> None:
    """A superformer continues only with the sampling options it was trained with (a checkpoint
    written before an option existed had its default)."""
    config = state.get("config")
    saved = config.get("supernet") if isinstance(config, dict) else None
    if not isinstance(saved, dict):
        return
    default = SupernetConfig()
    for name in SAMPLING_OPTIONS:
        was, now = saved.get(name, getattr(default, name)), getattr(sec, name)
        if was != now:
            raise UserError(f"{path} was trained with supernet.{name}={was!r}; this config has {now!r}, "
                            f"which would continue another training (restore it or use another output_dir)")
    # The schedule's span must stay, not the setting: by default it is half the epochs after the
    # warm-up, which asking for more epochs would move.
    was = progressive_span(int(saved.get("epochs", sec.epochs)), sec.max_warmup_epochs, saved.get("progressive_epochs"))
    now = progressive_span(sec.epochs, sec.max_warmup_epochs, sec.progressive_epochs)
    if sec.progressive and was != now:
        raise UserError(f"{path} released progressive shrinking's items over {was} epochs; this config "
                        f"over {now}: set supernet.progressive_epochs={was} to keep its schedule")


ALPHA_RANGE, ALPHA_CLIP = (-1.0, 1.0), 5.0  # AlphaNet's alpha_min, alpha_max and ratio clip


def distill_loss(logits: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """The student's loss against the teacher's probabilities (no gradient into the teacher).

    `kl`: soft cross-entropy, -sum p log q. `alpha` (AlphaNet): the larger of the two
    alpha-divergences D_a(p || q) = sum q ((p/q)^a - 1) / (a (a - 1)) at a = -1 and a = +1 (its
    limit there, KL(p || q) = sum q r log r with r = p/q), with r clipped to [1/5, 5] so that
    neither an over- nor an under-estimate of the teacher's uncertainty gives an unbounded
    gradient."""
    teacher = teacher.detach()
    if kind == "kl":
        return torch.sum(-teacher * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    q = F.softmax(logits.float(), dim=-1)
    ratio = (teacher / q.clamp_min(1e-12)).clamp(1.0 / ALPHA_CLIP, ALPHA_CLIP)
    losses = []
    for a in ALPHA_RANGE:
        if a == 1.0:
            losses.append((q * ratio * ratio.log()).sum(dim=-1))
        else:
            losses.append((q * (ratio ** a - 1)).sum(dim=-1) / (a * (a - 1)))
    return torch.maximum(*losses).mean()


def make_train_step(trainer: Trainer, sampler: SubnetSampler, space: SearchSpace, cfg: Config,
                    mixup: Optional[Mixup], criterion: torch.nn.Module) -> Callable[[Any], dict]:
    """The per-step function for `Trainer.fit`: the step's passes on one batch, losses summed."""
    sec = cfg.supernet
    model: Superformer = trainer.model  # type: ignore[assignment]

    def train_step(batch: Any) -> dict:
        images, target = (t.to(trainer.device, non_blocking=True) for t in batch)
        if mixup is not None:
            images, target = mixup(images, target)
        passes = sampler.passes(trainer.global_step, trainer.epoch)
        if sec.log_every_steps and (trainer.global_step + 1) % sec.log_every_steps == 0:
            check_same_across_ranks([(space.key(p.arch), p.side, p.layers) for p in passes], "the step's subnets")
        project = sec.grad_projection and passes[0].name == "max" and len(passes) > 1
        scalars, total, soft, first = {}, 0.0, None, None
        for i, p in enumerate(passes):
            model.set_active(p.arch, p.side, p.layers)
            with trainer.accumulate(last=i == len(passes) - 1 and not project):
                with trainer.autocast():
                    logits = trainer.wrapped(images)
                    if soft is not None:  # in-place distillation from the max subnet
                        loss = distill_loss(logits, soft, sec.distill_loss)
                    else:
                        loss = criterion(logits, target)
                trainer.backward(loss)
            if sec.distill and p.name == "max":
                soft = F.softmax(logits.detach().float(), dim=-1)
            if project and i == 0:
                first = trainer.take_gradients()
            scalars[f"loss_{p.name}"] = loss.item()
            total += loss.item()
        if project:
            scalars["grad_cosine"] = trainer.merge_projected(first)
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


def run(cfg: Config, ctx: StageContext) -> dict:
    """Train the superformer of `cfg` in the current process group; returns the summary."""
    sec, info, out_dir = cfg.supernet, ctx.dist, ctx.dir
    configure_determinism(sec.seed, sec.deterministic)
    space = SearchSpace(cfg.space)
    n_classes = num_classes(cfg.data)
    splits = build_splits(cfg.data, cfg.space.img_size)
    loader = create_train_loader(splits.train, sec.batch_size, sec.seed, workers=cfg.data.workers)
    local_batch = sec.batch_size // info.world_size
    val_loader = create_loader(splits.val, local_batch, shuffle=False, workers=cfg.data.workers)
    mixup = create_mixup(cfg.data, n_classes)
    check_mixup_batch(mixup, "supernet.batch_size", sec.batch_size, info.world_size)
    criterion = create_loss(cfg.data, mixup is not None)

    model = Superformer(space, n_classes, drop_path=sec.drop_path)
    if sec.init:  # before the Trainer, so an EMA starts from the pretrained weights too
        for note in init_from_timm(model, sec.init):
            log.info("supernet.init: %s", note)
    trainer = Trainer(model, sec, loader.batch_sampler.steps_per_epoch, out_dir, info.device,
                      extra_state={"config": cfg.to_dict(), "space": space.spec(),
                                   "num_classes": n_classes, "split": split_settings(cfg.data)})
    if trainer.resume():
        log.info("resuming from %s: epoch %d, step %d", trainer.path, trainer.epoch, trainer.global_step)
    else:
        log.info("starting %s: %d epochs of %d steps, %d process(es), sampling %s", out_dir, sec.epochs,
                 trainer.steps_per_epoch, info.world_size, sec.sampling)
    archs = validation_archs(space, sec.val_random_archs, sec.seed)
    sides = ("left", "right") if is_bilateral(space) else ("left",)
    sampler = SubnetSampler(space, sec, lambda arch: space.cost(arch, n_classes))
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

    with RunLogger(out_dir) as logger:
        trainer.fit(loader, make_train_step(trainer, sampler, space, cfg, mixup, criterion), logger,
                    on_epoch_end=on_epoch_end, desc="supernet")
    if "val" not in last:  # resumed a finished run: nothing trained, validate for the summary
        on_epoch_end(sec.epochs - 1)
    summary = {
        "max_top1": last["val"]["max"]["top1"], "min_top1": last["val"]["min"]["top1"],
        "val": {name: {**r, "arch": archs[name]} for name, r in last["val"].items()},
        "epochs": trainer.epoch, "steps": trainer.global_step, "world_size": info.world_size,
        "sampling": sec.sampling, "progressive": [{"epoch": e, "released": item} for e, item in sampler.schedule],
        "train_seconds": round(trainer.train_seconds, 1),
        "resumed_from": list(trainer.resumed_from) if trainer.resumed_from else None,
        "output": str(out_dir),
    }
    if "ema" in last:
        summary["ema"] = last["ema"]
    return summary


STAGE = Stage(
    name="train-supernet", folder=SUPERNET, check=check, run=run,
    help="train the superformer (one process, torchrun or srun)",
    description="Train the superformer of the config's search space on data.root with "
    "supernet.sampling (uniform, autoslim, bcnet, sandwich). Writes OUTPUT_DIR/supernet/"
    "{config.yaml,last.pth,log.jsonl,summary.json} and TensorBoard events; a second run with the "
    "same OUTPUT_DIR resumes from last.pth. Under torchrun or srun every process runs this same "
    "command; supernet.batch_size is the global batch. The last line of stdout is a JSON object "
    "{max_top1, min_top1, epochs, steps, output}.",
    last_line=("max_top1", "min_top1", "epochs", "steps", "output"))
