"""Shared set-up of the superformer-training tests: a tiny space, configs, subprocess helpers."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from vitas.core.config import config_from_dict
from vitas.supernet.space import SearchSpace

ROOT = Path(__file__).resolve().parents[1]

TINY_SPACE: dict[str, Any] = {
    "name": "tiny", "img_size": 32, "patch_size": [8, 16], "embed_dim": [16, 24],
    "depth": [1, 2], "identity": True, "num_heads": [1, 2], "attn_dim": [16, 24],
    "mlp_dim": [16, 32], "qk": "private", "channels": {"embed": "cyclic", "attn": "left", "mlp": "left"},
}
NO_AUGMENT: dict[str, Any] = {
    "auto_augment": None, "reprob": 0.0, "mixup": 0.0, "cutmix": 0.0, "hflip": 0.0,
    "color_jitter": 0.0, "scale": [1.0, 1.0], "smoothing": 0.0,
}


def tiny_config(out: Path, data_root: Path, augment: bool = False, **supernet: Any) -> dict:
    """A config tree training the tiny space on `data_root`: 100 train images (2 per class held
    out), global batch 20, so 5 steps per epoch."""
    data = {"root": str(data_root), "holdout_per_class": 2, "workers": 0, "interpolation": "bilinear",
            "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0}
    if not augment:
        data.update(NO_AUGMENT)
    sec = {"epochs": 2, "batch_size": 20, "sampling": "sandwich", "lr": 2e-3, "warmup_epochs": 1,
           "drop_path": 0.0, "amp": False, "val_random_archs": 1, "log_every_steps": 1,
           "save_every_steps": 0, "seed": 3}
    sec.update(supernet)
    return {"output_dir": str(out), "space": TINY_SPACE, "data": data, "supernet": sec,
            "launch": {"executor": "local"}}


def tiny_space(**changes: Any) -> SearchSpace:
    return SearchSpace(config_from_dict({"space": {**TINY_SPACE, **changes}}).space)


def write_yaml(tree: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def train_env() -> dict[str, str]:
    """Environment of a training subprocess: one thread per process (fixed, deterministic)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vitas", *args]


def state_tensors(state: dict) -> dict[str, torch.Tensor]:
    """Model, EMA and optimizer tensors of a last.pth, flattened, for bitwise comparison."""
    out = {f"model.{k}": v for k, v in state["model"].items()}
    if state.get("ema"):
        out.update({f"ema.{k}": v for k, v in state["ema"].items()})
    for pid, slots in state["optimizer"]["state"].items():
        out.update({f"opt.{pid}.{k}": v for k, v in slots.items() if torch.is_tensor(v)})
    return out
