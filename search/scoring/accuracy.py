"""Inherited accuracy: top-1 of the superformer with an architecture active, on the hold-out split.

Weights come from the trained superformer (`search.checkpoint`, default
`<output_dir>/supernet/last.pth`; its EMA weights when it has them). Images are the hold-out split
taken from `train/` (`data.holdout_per_class` per class), never `val/`. Each rank holds its own
unpadded shard of them in memory as one tensor, decoded once, and the correct counts are summed
over ranks, so the result equals a single process's. The superformer has no BatchNorm, so a
subnet needs no recalibration. With a `bilateral` channel policy
the left and right passes are scored and their accuracies averaged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import Subset

from vitas.core.checkpoint import load_checkpoint
from vitas.core.config import Config
from vitas.core.data import build_dataset, create_loader, num_classes, split_train_holdout
from vitas.core.errors import UserError
from vitas.core.metrics import evaluate_accuracy
from vitas.search.scoring.base import Scorer, split_settings
from vitas.supernet.model import Superformer
from vitas.supernet.space import SearchSpace, space_from_config

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def checkpoint_path(cfg: Config) -> Path:
    """`search.checkpoint`, or the supernet stage's `<output_dir>/supernet/last.pth`."""
    path = Path(cfg.search.checkpoint).expanduser() if cfg.search.checkpoint else cfg.stage_dir("supernet") / "last.pth"
    if not path.is_file():
        key = "search.checkpoint" if cfg.search.checkpoint else "output_dir"
        raise UserError(f"{key}: superformer checkpoint not found: {path} (train one with `vitas train-supernet`)")
    return path


def load_superformer(cfg: Config, space: SearchSpace, device: torch.device | str = "cpu") -> Superformer:
    """The trained superformer in eval mode (EMA weights if the checkpoint has them)."""
    path = checkpoint_path(cfg)
    ckpt = load_checkpoint(path)
    if "space" not in ckpt or "model" not in ckpt:
        raise UserError(f"{path} is not a superformer checkpoint (no 'space'/'model' entries)")
    space.check_spec(ckpt["space"], str(path))
    model = Superformer(space, num_classes(cfg.data))
    state = ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{path} does not fit this superformer: {str(exc).splitlines()[1].strip()}") from None
    return model.to(device).eval()


def sides(cfg: Config) -> tuple[str, ...]:
    """Passes an architecture is scored on: ("left", "right") for BCNet-style bilateral widths
    (the right pass of any other space repeats the left)."""
    return ("left", "right") if cfg.space.channels.bilateral else ("left",)


def holdout_batches(cfg: Config, batch_size: int, device: torch.device | str = "cpu") -> Batches:
    """This rank's shard of the hold-out split, decoded once and kept as one tensor on `device`,
    cut into batches of `batch_size`."""
    dataset = build_dataset(cfg.data, "train", cfg.space.img_size, is_training=False)
    _, holdout = split_train_holdout(dataset, cfg.data.holdout_per_class, cfg.data.split_seed)
    loader = create_loader(Subset(dataset, holdout), batch_size=max(batch_size, 1), shuffle=False,
                           workers=cfg.data.workers)
    parts = list(loader)
    if not parts:  # more ranks than hold-out images: this rank holds none
        return []
    images = torch.cat([p[0] for p in parts]).to(device)
    target = torch.cat([p[1] for p in parts]).to(device)
    return list(zip(images.split(batch_size), target.split(batch_size)))


def inherited_accuracy(model: Superformer, arch: dict, batches: Batches,
                       device: torch.device | str = "cpu", passes: tuple[str, ...] = ("left",)) -> dict:
    """`{"top1", "top5", "images"}` of `arch` with inherited weights, averaged over `passes`,
    summed over all ranks (every rank must call this with the same architectures, in order)."""
    totals = {"top1": 0.0, "top5": 0.0}
    images = 0
    with torch.inference_mode():
        for side in passes:
            model.set_active(arch, side)
            acc = evaluate_accuracy(model, batches, device)
            totals = {k: totals[k] + acc[k] / len(passes) for k in totals}
            images = acc["images"]
    return {**totals, "images": images}


class AccuracyScorer(Scorer):
    """`search.scorer: accuracy`: inherited hold-out top-1 (higher is better) of each architecture.

    The superformer and the hold-out tensors are loaded on first use, so a driver that hands all
    scoring to array jobs never loads them.
    """

    name = "accuracy"
    fields = ("top1", "top5")
    reward_terms = [("top1", 1.0)]

    def __init__(self, cfg: Config, device: Optional[torch.device | str] = None):
        super().__init__(space_from_config(cfg))
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else _default_device()
        self.passes = sides(cfg)
        self._model: Optional[Superformer] = None
        self._batches: Batches = []

    def settings(self) -> dict[str, Any]:
        """Which superformer (path and training progress), hold-out split and passes."""
        path = checkpoint_path(self.cfg)
        ckpt = load_checkpoint(path, mmap=True)
        return {"search.checkpoint": str(path.absolute()),
                "checkpoint.progress": [ckpt.get("epoch"), ckpt.get("step")],
                **split_settings(self.cfg.data), "passes": list(self.passes)}

    def setup(self) -> None:
        """Load the superformer and this rank's hold-out shard (idempotent)."""
        if self._model is None:
            if self.cfg.search.batch_size < 1:
                raise UserError(f"search.batch_size must be >= 1, got {self.cfg.search.batch_size}")
            self._model = load_superformer(self.cfg, self.space, self.device)
            self._batches = holdout_batches(self.cfg, self.cfg.search.batch_size, self.device)

    def compute(self, archs: list[dict]) -> list[dict]:
        """Inherited accuracy of each architecture (collective: all ranks, same list)."""
        self.setup()
        return [inherited_accuracy(self._model, a, self._batches, self.device, self.passes) for a in archs]


def _default_device() -> torch.device:
    """This process's GPU when there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
