"""Generic training plumbing shared by the training stages (superformer training, retraining).

- `GlobalBatchSampler` + `create_train_loader`: step s of an epoch is the same global batch of
  images whatever the number of processes; rank r takes the r-th slice. Every image carries its
  own seed (seed, epoch, index), so its augmentation is also independent of ranks, workers and
  restarts, and an epoch can resume at any step.
- `check_recipe`: a UserError naming the key for recipe values no run can use (both stages call it
  before reading data, so bad input leaves nothing behind).
- `create_optimizer` / `create_scheduler`: timm's factories, warm-up + cosine updated every step.
- `Trainer`: DDP wrapper (`find_unused_parameters=True`), AMP (autocast + GradScaler, CUDA only),
  gradient clipping, timm EMA (`ModelEmaV3`), `zero_grad(set_to_none=True)` so parameters a step
  does not use keep `grad=None` and AdamW leaves them (and their weight decay) alone, and the
  training state `<stage_dir>/last.pth` (atomic, `weights_only`-loadable) written every epoch and
  every `save_every_steps` steps, resumed automatically when the same command runs again.
- Before each step every RNG is seeded from (seed, global step, rank), so dropout, drop path and
  Mixup do not depend on when the run was interrupted.

A section config (`SupernetConfig`, `RetrainConfig`) supplies the hyper-parameters (`TrainSection`).
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional, Protocol

import numpy as np
import torch
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler

from vitas.core import dist
from vitas.core.checkpoint import (load_checkpoint, nonfinite_tensors, rng_state, save_checkpoint,
                                   set_rng_state)
from vitas.core.errors import UserError
from vitas.core.logs import RunLogger, progress

LAST = "last.pth"
log = logging.getLogger("vitas.engine")


class TrainSection(Protocol):
    """The hyper-parameters a training section of the config provides."""

    epochs: int
    batch_size: int
    opt: str
    lr: float
    min_lr: float
    warmup_lr: float
    warmup_epochs: int
    weight_decay: float
    clip_grad: Optional[float]
    drop_path: float
    ema: bool
    ema_decay: float
    amp: bool
    save_every_steps: int
    log_every_steps: int
    seed: int
    deterministic: bool


# ----------------------------------------------------------------------------- recipe checks
def check_recipe(section: TrainSection, name: str) -> None:
    """UserError naming `<name>.<key>` for a recipe timm, torch or the loop cannot use (the value
    ranges are the config schema's, checked at load; here what only the recipe as a whole, or
    timm, can say), so a stage can refuse it before it reads data or writes anything."""
    if section.min_lr > section.lr:
        raise UserError(f"{name}.min_lr {section.min_lr} is larger than {name}.lr {section.lr}: "
                        "the cosine schedule would raise the learning rate")
    names = list_optimizers()
    opt = section.opt.lower().removeprefix("lookahead_")
    if opt not in names:
        near = difflib.get_close_matches(opt, names, n=3)
        hint = f"did you mean {' or '.join(repr(n) for n in near)}? " if near else ""
        raise UserError(f"{name}.opt: {section.opt!r} is not a timm optimizer ({hint}"
                        "timm.optim.list_optimizers() names them; a 'lookahead_' prefix is allowed)")


def check_resume(state: Any, section: TrainSection, path: Path, name: str) -> None:
    """A saved training state this run can continue: a mapping with the entries the loop reads,
    of the right types, and not more epochs than asked. UserError naming the entry otherwise."""
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a training state (it holds a {type(state).__name__})")
    expected = {"model": dict, "optimizer": dict, "scheduler": dict, "epoch": int, "step": int,
                "step_in_epoch": int, "steps_per_epoch": int, "rng": dict}
    for key, kind in expected.items():
        if key not in state:
            raise UserError(f"{path} is not a {name} training state: it has no '{key}' entry")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise UserError(f"{path}: entry '{key}' is a {type(state[key]).__name__}, "
                            f"expected {kind.__name__}")
    if state["epoch"] > section.epochs:
        raise UserError(f"{path} has already trained {state['epoch']} epochs, more than "
                        f"{section.epochs} asked ({name}.epochs); ask for at least "
                        f"{state['epoch']} or use a new output_dir")


class Diverged(UserError):
    """Training produced a non-finite loss, gradient or weight; last.pth keeps the last finite
    state."""


# ----------------------------------------------------------------------------- seeds
def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (e.g. seed, step, rank): stable across processes."""
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def seed_all(seed: int, devices: bool = True) -> None:
    """Seed Python's, NumPy's and torch's global RNGs; `devices=False` leaves the accelerators'
    generators alone (CPU-side data transforms; ~100x faster than `torch.manual_seed`)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if devices:
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def configure_determinism(seed: int, deterministic: bool) -> None:
    """Seed everything; with `deterministic`, also force deterministic kernels (bitwise resume)."""
    seed_all(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


# ----------------------------------------------------------------------------- data
class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of `(index, sample_seed)` for one rank: its slice of the step's global batch.

    Each epoch is a permutation seeded by (seed, epoch); step s is its s-th block of
    `global_batch` indices (a last partial block is dropped) and rank r takes items
    `[r*b, (r+1)*b)` with `b = global_batch / world_size`. `set_epoch(epoch, start_step)` picks
    the epoch and the step to resume at.
    """

    def __init__(self, num_samples: int, global_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0) -> None:
        if global_batch % world_size:
            raise UserError(f"batch_size {global_batch} (the global batch) must be divisible by "
                            f"the number of processes ({world_size})")
        self.steps_per_epoch = num_samples // global_batch
        if self.steps_per_epoch == 0:
            raise UserError(f"batch_size {global_batch} is larger than the training set "
                            f"({num_samples} images)")
        self.global_batch, self.rank, self.world_size, self.seed = global_batch, rank, world_size, seed
        self.local_batch = global_batch // world_size
        self.num_samples = num_samples
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate epoch `epoch` from step `start_step` (0 for a fresh epoch)."""
        self.epoch, self.start_step = epoch, min(start_step, self.steps_per_epoch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = torch.randperm(self.num_samples,
                               generator=torch.Generator().manual_seed(derive_seed(self.seed, self.epoch)))
        lo = self.rank * self.local_batch
        for step in range(self.start_step, self.steps_per_epoch):
            block = order[step * self.global_batch + lo: step * self.global_batch + lo + self.local_batch]
            yield [(int(i), derive_seed(self.seed, self.epoch, int(i))) for i in block]

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step


class SeededDataset(Dataset):
    """Reads `(index, seed)` items: seeds the RNGs, then returns `dataset[index]` (its augmentation
    is then a function of the seed alone, in whichever process or worker loads it)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        seed_all(seed, devices=False)
        return self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


def create_train_loader(dataset: Dataset, global_batch: int, seed: int, workers: int = 2) -> DataLoader:
    """Training DataLoader over this rank's slices of the global batches (`GlobalBatchSampler`,
    reachable as `loader.batch_sampler`)."""
    sampler = GlobalBatchSampler(len(dataset), global_batch, dist.get_rank(),  # type: ignore[arg-type]
                                 dist.get_world_size(), seed)
    return DataLoader(SeededDataset(dataset), batch_sampler=sampler, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)


# ----------------------------------------------------------------------------- optimisation
def create_optimizer(model: nn.Module, section: TrainSection) -> torch.optim.Optimizer:
    """timm optimizer (`section.opt`, e.g. adamw); no weight decay on biases, norms, tokens."""
    return create_optimizer_v2(model, opt=section.opt, lr=section.lr,
                               weight_decay=section.weight_decay)


def create_scheduler(optimizer: torch.optim.Optimizer, section: TrainSection,
                     steps_per_epoch: int) -> Scheduler:
    """timm cosine schedule with linear warm-up, in optimizer steps (`step_update(global_step)`)."""
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=section.epochs, min_lr=section.min_lr,
        warmup_lr=section.warmup_lr, warmup_epochs=section.warmup_epochs,
        step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    return scheduler


def check_same_across_ranks(value: Any, what: str) -> None:
    """Raise RuntimeError when the ranks hold different `value`s (e.g. the step's subnet)."""
    if not dist.is_distributed():
        return
    values: list[Any] = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(values, value)
    if any(v != values[0] for v in values[1:]):
        raise RuntimeError(f"ranks disagree on {what}: {values}")


def project_off(g: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """`g` without its component against `direction` when the two conflict (negative dot
    product); `g` unchanged otherwise."""
    dot = torch.dot(g, direction)
    norm2 = torch.dot(direction, direction)
    if dot >= 0 or norm2 == 0:
        return g
    return g - (dot / norm2) * direction


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return next((line for line in lines if "size mismatch" in line or "Missing" in line or
                 "Unexpected" in line), lines[0] if lines else type(exc).__name__)


# ----------------------------------------------------------------------------- trainer
class Trainer:
    """One model's optimisation state and loop: DDP, AMP, clipping, EMA, schedule, last.pth.

    Per step: for each forward/backward pass call `with trainer.accumulate(last): ...` around the
    forward and `trainer.backward(loss)`, then `trainer.step()`. `fit` runs that loop over epochs
    with logging, periodic saving and resumption; a stage only writes the step itself.
    """

    def __init__(self, model: nn.Module, section: TrainSection, steps_per_epoch: int,
                 stage_dir: str | Path, device: torch.device,
                 extra_state: Optional[dict] = None, find_unused_parameters: bool = True) -> None:
        self.section = section
        self.device = device
        self.model = model.to(device)
        self.stage_dir = Path(stage_dir)
        self.path = self.stage_dir / LAST
        self.steps_per_epoch = steps_per_epoch
        self.extra_state = dict(extra_state or {})
        self.wrapped: nn.Module = model
        if dist.is_distributed():
            ids = [device.index] if device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(model, device_ids=ids,
                                                   find_unused_parameters=find_unused_parameters)
        self.optimizer = create_optimizer(model, section)
        self.scheduler = create_scheduler(self.optimizer, section, steps_per_epoch)
        self.use_amp = section.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.ema = ModelEmaV3(model, decay=section.ema_decay) if section.ema else None
        self.epoch = 0            # epochs completed
        self.step_in_epoch = 0    # steps completed in the current epoch
        self.global_step = 0      # optimizer steps completed
        self.resumed_from: Optional[tuple[int, int]] = None  # (epoch, global step) of last.pth
        self.amp_skips = 0  # steps the AMP scaler skipped for overflow (normal, not divergence)
        self._seconds_saved = 0.0  # training wall time of earlier sessions (from last.pth)
        self._fit_started: Optional[float] = None  # perf_counter() when this session's fit began

    @property
    def train_seconds(self) -> float:
        """Wall seconds spent in `fit` over every session of this run (a resumed run counts its
        earlier sessions up to their last save), so a summary reports the run's time, not the last
        session's."""
        now = time.perf_counter() - self._fit_started if self._fit_started is not None else 0.0
        return self._seconds_saved + now

    def _divergence(self, what: str) -> str:
        kept = (f"{self.path} keeps the state after epoch {self.resumed_from[0] if self.resumed_from else 0}"
                if not self.path.is_file() else f"{self.path} keeps the last finite state")
        return (f"training diverged at epoch {self.epoch + 1}, step {self.global_step + 1}: {what} "
                f"(lr {self.optimizer.param_groups[0]['lr']:.3g}); {kept}. Lower the learning rate "
                "or enable clipping, then rerun to resume")

    # ------------------------------------------------------------------ one step
    def autocast(self) -> ContextManager:
        """fp16 autocast on CUDA when `amp` is on; nothing otherwise."""
        if self.use_amp:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def accumulate(self, last: bool = True) -> ContextManager:
        """Wrap the forward and backward of one pass; every pass but a step's last skips DDP's
        all-reduce (gradients accumulate locally and are averaged once, with the last pass)."""
        if last or not isinstance(self.wrapped, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.wrapped.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one pass (loss-scaled under AMP); gradients add up until `step()`."""
        self.scaler.scale(loss).backward()

    def step(self) -> dict:
        """Clip, optimizer step, clear grads (to None), EMA, schedule; returns lr and grad norm.

        A non-finite gradient norm (the same on every rank: gradients are all-reduced) stops
        training with `Diverged`, before the step touches the weights. Under AMP it is the
        scaler's normal overflow skip instead, unless the scale has collapsed below 1e-4.
        """
        lr = self.optimizer.param_groups[0]["lr"]
        out = {"lr": lr}
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.section.clip_grad or math.inf)
        out["grad_norm"] = float(norm)
        if not math.isfinite(out["grad_norm"]):
            if not self.use_amp or self.scaler.get_scale() < 1e-4:
                self.optimizer.zero_grad(set_to_none=True)
                raise Diverged(self._divergence(f"the gradient norm is {out['grad_norm']}"))
            self.amp_skips += 1
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self.step_in_epoch += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)
        self.scheduler.step_update(num_updates=self.global_step)
        return out

    def take_gradients(self) -> dict[nn.Parameter, torch.Tensor]:
        """The gradients accumulated so far (rank-local), cleared from the parameters."""
        grads = {p: p.grad for p in self.model.parameters() if p.grad is not None}
        for p in grads:
            p.grad = None
        return grads

    def merge_projected(self, first: dict[nn.Parameter, torch.Tensor]) -> float:
        """Set the gradients to `first` plus the gradients accumulated since, the latter projected
        off `first` where they conflict (PCGrad / NASViT: g2 - (g1.g2 / |g1|^2) g1 when g1.g2 < 0),
        both averaged over ranks first (the passes ran without DDP's all-reduce). Returns the
        cosine between the two before projection."""
        params = [p for p in self.model.parameters() if p.grad is not None or p in first]
        g1 = torch.cat([first[p].reshape(-1) if p in first else torch.zeros(p.numel(), device=p.device)
                        for p in params]).float()
        g2 = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device)
                        for p in params]).float()
        if dist.is_distributed():
            both = torch.stack([g1, g2])
            torch.distributed.all_reduce(both)
            g1, g2 = both / dist.get_world_size()
        dot, norm1, norm2 = torch.dot(g1, g2), g1.norm(), g2.norm()
        cosine = float(dot / (norm1 * norm2)) if norm1 > 0 and norm2 > 0 else 0.0
        merged = g1 + project_off(g2, g1)
        offset = 0
        for p in params:
            p.grad = merged[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        return cosine

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The whole training state: tensors and plain values only."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "epoch": self.epoch,
            "step": self.global_step,
            "step_in_epoch": self.step_in_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "planned_epochs": self.section.epochs,
            "rng": rng_state(),
            "train_seconds": self.train_seconds,
            **self.extra_state,
        }

    def save(self) -> None:
        """Write `<stage_dir>/last.pth` atomically (rank 0), never with a non-finite weight: then
        `Diverged` is raised and the previous file stays."""
        bad = nonfinite_tensors({"model": self.model.state_dict()})
        if bad is not None:
            raise Diverged(self._divergence(f"weight {bad.removeprefix('model.')} is not finite"))
        if dist.is_main():
            save_checkpoint(self.state_dict(), self.path)

    def resume(self, check: Optional[Callable[[dict], None]] = None) -> bool:
        """Load `last.pth` if present (after `check(state)`, which raises UserError on a mismatch,
        e.g. another search space); True when training continues from it."""
        if dist.is_main():
            for stale in self.stage_dir.glob(f".{LAST}.*.tmp"):  # left by a killed save
                stale.unlink(missing_ok=True)
        if not self.path.is_file():
            return False
        state = load_checkpoint(self.path, map_location="cpu")
        check_resume(state, self.section, self.path, self.stage_dir.name)
        if check is not None:
            check(state)
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise UserError(f"{self.path} was written with {state['steps_per_epoch']} steps per "
                            f"epoch, this run has {self.steps_per_epoch} (batch_size or data "
                            f"changed); use a new output_dir")
        bad = nonfinite_tensors({"model": state["model"]})
        if bad is not None:
            raise UserError(f"{self.path}: tensor {bad} is not finite (the run diverged); "
                            "delete the file to start over")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{self.path} does not fit this model: {_first_line(exc)}") from None
        planned = state.get("planned_epochs", self.section.epochs)
        if planned == self.section.epochs:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scheduler.step_update(num_updates=state["step"])  # a pure function of the step
        if planned != self.section.epochs:  # the new length takes over from here
            log.warning("%s was planned for %d epochs and stopped after %d; the learning-rate "
                        "schedule now follows %d epochs (lr from here %.3g)", self.path, planned,
                        state["epoch"], self.section.epochs, self.optimizer.param_groups[0]["lr"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.epoch, self.global_step = state["epoch"], state["step"]
        self.step_in_epoch = state["step_in_epoch"]
        self._seconds_saved = float(state.get("train_seconds", 0.0))  # absent in older checkpoints
        set_rng_state(state["rng"])
        self.resumed_from = (self.epoch, self.global_step)
        return True

    # ------------------------------------------------------------------ loop
    def fit(self, loader: DataLoader, train_step: Callable[[Any], dict],
            logger: RunLogger, on_epoch_end: Optional[Callable[[int], dict]] = None,
            on_epoch_start: Optional[Callable[[int], None]] = None, desc: str = "train") -> None:
        """Train from the current (possibly resumed) state to `section.epochs`.

        `train_step(batch)` runs the step's passes (forward + `backward`) and returns scalars;
        the loop seeds the step's RNGs, calls `step()`, logs means over ranks every
        `log_every_steps`, saves every `save_every_steps` and at every epoch's end, after
        `on_epoch_end(epoch)` (validation; its scalars are logged).
        """
        self._fit_started = time.perf_counter()
        try:
            self._fit_epochs(loader, train_step, logger, on_epoch_end, on_epoch_start, desc)
        finally:
            self._seconds_saved, self._fit_started = self.train_seconds, None

    def _fit_epochs(self, loader: DataLoader, train_step: Callable[[Any], dict], logger: RunLogger,
                    on_epoch_end: Optional[Callable[[int], dict]],
                    on_epoch_start: Optional[Callable[[int], None]], desc: str) -> None:
        sec = self.section
        sampler: GlobalBatchSampler = loader.batch_sampler  # type: ignore[assignment]
        for epoch in range(self.epoch, sec.epochs):
            if on_epoch_start is not None:
                on_epoch_start(epoch)
            sampler.set_epoch(epoch, self.step_in_epoch)
            self.wrapped.train()
            bar = progress(loader, total=len(sampler), desc=f"{desc} epoch {epoch + 1}/{sec.epochs}")
            tic = time.perf_counter()
            for batch in bar:
                seed_all(derive_seed(sec.seed, self.global_step, dist.get_rank()))
                scalars = train_step(batch)
                scalars.update(self.step())
                if sec.log_every_steps and self.global_step % sec.log_every_steps == 0:
                    lr = scalars.pop("lr")
                    names = sorted(scalars)
                    means = dist.all_reduce_sum(torch.tensor(
                        [float(scalars[k]) for k in names], dtype=torch.float64)) / dist.get_world_size()
                    values = dict(zip(names, means.tolist()), lr=lr)
                    values["sec_per_step"] = (time.perf_counter() - tic) / sec.log_every_steps
                    tic = time.perf_counter()
                    logger.log(self.global_step, **{f"train/{k}": v for k, v in values.items()},
                               epoch=epoch)
                    bar.set_postfix(loss=values.get("loss", float("nan")), lr=values["lr"])
                if sec.save_every_steps and self.global_step % sec.save_every_steps == 0:
                    self.save()
            self.epoch, self.step_in_epoch = epoch + 1, 0
            if on_epoch_end is not None:
                logger.log(self.global_step, epoch=epoch + 1, **on_epoch_end(epoch))
            self.save()
            dist.barrier()
