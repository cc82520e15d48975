"""Inherited accuracy: top-1 of the superformer with an architecture active, on the hold-out split.

The superformer comes from the one reader `vitas.supernet.checkpoint` (`supernet.checkpoint`,
default `<output_dir>/supernet/last.pth`, with the `supernet.weights` policy), the very weights
`retrain.init=supernet` starts from. Images are the hold-out split taken from `train/`
(`data.holdout_per_class` per class), never `val/`, and must be the hold-out the superformer was
trained without (recorded in its checkpoint). Each rank holds its own unpadded shard of them in
memory as one tensor, decoded once, and the correct counts are summed over ranks, so the result
equals a single process's. The superformer has no BatchNorm, so a subnet needs no
recalibration. With a `bilateral` channel policy the left and right passes are scored and their
accuracies averaged. `search.finetune_steps` > 0 scores a copy of each subnet fine-tuned for that
many steps instead (`vitas.search.scoring.finetune`).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.utils.data import Subset

from vitas.core.config import Config
from vitas.core.data import (build_dataset, check_data_source, create_loader, num_classes,
                             split_settings, split_train_holdout, transform_settings)
from vitas.core.errors import UserError
from vitas.core.metrics import evaluate_accuracy
from vitas.search.scoring.base import Scorer
from vitas.search.scoring.finetune import SubnetFinetuner, finetune_settings
from vitas.supernet.checkpoint import inspect_superformer, read_superformer
from vitas.supernet.model import Superformer
from vitas.supernet.space import space_from_config

Batches = list[tuple[torch.Tensor, torch.Tensor]]


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
                       device: torch.device | str = "cpu", passes: tuple[str, ...] = ("left",),
                       finetuner: Optional[SubnetFinetuner] = None) -> dict:
    """`{"top1", "top5", "images"}` of `arch` with inherited weights, averaged over `passes`,
    summed over all ranks (every rank must call this with the same architectures, in order).
    With a `finetuner`, of a copy of the subnet it fine-tuned (the superformer is left as it was)."""
    totals = {"top1": 0.0, "top5": 0.0}
    images = 0
    for side in passes:
        if finetuner is None:
            model.set_active(arch, side)
            net: torch.nn.Module = model
        else:
            net = model.extract(arch, side)
            finetuner.finetune(net, model.space.key(arch))
        with torch.inference_mode():
            acc = evaluate_accuracy(net, batches, device)
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
        self._finetuner: Optional[SubnetFinetuner] = None

    def check(self) -> None:
        """The superformer file (entries, space, classes, weights policy) and a hold-out split
        that has images and is the one the superformer was trained without."""
        cfg = self.cfg
        if cfg.data.holdout_per_class < 1:
            raise UserError("data.holdout_per_class is 0: the accuracy scorer needs a hold-out split "
                            "(images per class taken from train/) to score architectures on")
        check_data_source(cfg.data, holdout=True)
        info = inspect_superformer(cfg, self.space, num_classes(cfg.data))
        mine = split_settings(cfg.data)
        if info.split is not None and info.split != mine:
            key = next(k for k in mine if info.split.get(k) != mine[k])
            raise UserError(f"{info.path} was trained with {key}={info.split.get(key)!r} but this "
                            f"search has {mine[key]!r}: part of its hold-out would be images the "
                            f"superformer trained on; set {key}={info.split.get(key)!r}")

    def settings(self) -> dict[str, Any]:
        """The superformer's identity and weights, the hold-out split, its transform, the passes,
        and the fine-tuning (when on)."""
        info = inspect_superformer(self.cfg, self.space)
        return {**info.identity(), **split_settings(self.cfg.data),
                "transform": transform_settings(self.cfg.data, self.cfg.space.img_size, False),
                "data.broken_images": self.cfg.data.broken_images, "passes": list(self.passes),
                **finetune_settings(self.cfg)}

    def setup(self) -> None:
        """Load the superformer and this rank's hold-out shard (idempotent)."""
        if self._model is None:
            self._model, _ = read_superformer(self.cfg, self.space, num_classes(self.cfg.data), self.device)
            self._batches = holdout_batches(self.cfg, self.cfg.search.batch_size, self.device)
            if self.cfg.search.finetune_steps:
                self._finetuner = SubnetFinetuner(self.cfg, self.device)

    def compute(self, archs: list[dict]) -> list[dict]:
        """Inherited (or fine-tuned) accuracy of each architecture (collective: all ranks, same list)."""
        self.setup()
        return [inherited_accuracy(self._model, a, self._batches, self.device, self.passes, self._finetuner)
                for a in archs]


def _default_device() -> torch.device:
    """This process's GPU when there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
