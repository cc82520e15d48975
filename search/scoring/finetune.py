"""A few steps of fine-tuning of a subnet's inherited weights before it is scored.

Inherited accuracy is biased against subnets far from the ones the sampler favours (on the
fidelity data set: patch 8, whose shared blocks mostly see patch-4 tokens; docs/FIDELITY.md).
Fine-tuning narrows that gap but, measured there at 50 and 200 steps, did not improve the ranking
as a whole, so it is off by default. `search.finetune_steps` > 0 trains a COPY of each subnet
(`Superformer.extract`) for that many steps on the superformer's own training images (train/
minus the hold-out, training transform, constant learning rate, AdamW without weight decay)
before the hold-out is scored; the superformer itself never changes. The images and their order
are drawn from a seed of `search.seed` and the architecture alone, so a subnet's score does not
depend on which other subnets were scored before it (resumed searches stay bitwise). Every rank
fine-tunes the same copy on the same images and scores its own shard of the hold-out.
"""
from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from vitas.core.checkpoint import rng_state, set_rng_state
from vitas.core.config import Config
from vitas.core.data import build_dataset, create_loss, split_train_holdout, transform_settings
from vitas.core.engine import derive_seed, seed_all


def finetune_settings(cfg: Config) -> dict[str, Any]:
    """What a fine-tuned score depends on (part of the scorer's resume signature); {} when off."""
    sec = cfg.search
    if sec.finetune_steps == 0:
        return {}
    return {"finetune_steps": sec.finetune_steps, "finetune_lr": sec.finetune_lr,
            "finetune_batch_size": sec.finetune_batch_size, "search.seed": sec.seed,
            "finetune_transform": transform_settings(cfg.data, cfg.space.img_size, True),
            "data.smoothing": cfg.data.smoothing}


class SubnetFinetuner:
    """Fine-tunes copies of subnets on the superformer's training split (see the module doc)."""

    def __init__(self, cfg: Config, device: torch.device | str = "cpu") -> None:
        self.cfg, self.device = cfg, torch.device(device)
        train = build_dataset(cfg.data, "train", cfg.space.img_size, is_training=True)
        indices, _ = split_train_holdout(train, cfg.data.holdout_per_class, cfg.data.split_seed)
        self.train: Dataset = train
        self.indices = np.asarray(indices)
        self.criterion = create_loss(cfg.data, mixup_active=False)

    def seed(self, arch_key: str) -> int:
        """The seed of one architecture's fine-tuning: search.seed and the arch alone."""
        return derive_seed(self.cfg.search.seed, zlib.crc32(arch_key.encode()))

    def images(self, arch_key: str) -> DataLoader:
        """The fine-tuning batches of one architecture (which images, in which order)."""
        sec = self.cfg.search
        seed = self.seed(arch_key)
        count = sec.finetune_steps * sec.finetune_batch_size
        chosen = np.random.default_rng(seed).choice(self.indices, size=count, replace=len(self.indices) < count)
        return DataLoader(Subset(self.train, chosen.tolist()), batch_size=sec.finetune_batch_size,
                          shuffle=False, num_workers=self.cfg.data.workers,
                          generator=torch.Generator().manual_seed(seed))

    def finetune(self, model: nn.Module, arch_key: str) -> list[float]:
        """Train `model` (a copy) in place for search.finetune_steps steps; the losses. The
        augmentations draw from the global RNGs (timm's from Python's), seeded here from the arch
        and restored afterwards, so neither the caller's draws nor earlier subnets change them."""
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.cfg.search.finetune_lr, weight_decay=0.0)
        model.train()
        saved = rng_state()
        seed_all(self.seed(arch_key), devices=False)
        try:
            with torch.inference_mode(False), torch.enable_grad():  # whatever the caller's mode
                losses = self._steps(model, optimizer, arch_key)
        finally:
            set_rng_state(saved)
        model.eval()
        return losses

    def _steps(self, model: nn.Module, optimizer: torch.optim.Optimizer, arch_key: str) -> list[float]:
        losses = []
        for images, target in self.images(arch_key):
            images, target = images.to(self.device), target.to(self.device)
            loss = self.criterion(model(images), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        return losses
