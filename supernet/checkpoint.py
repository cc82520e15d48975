"""The one reader of superformer checkpoints: search, rank and `retrain.init=supernet` all load
the superformer through it, so they use the same file and the same weights.

Which file: `supernet.checkpoint`, else the run's `<output_dir>/supernet/last.pth`. Which weights
(`supernet.weights`): `ema` (the checkpoint's EMA weights; an error without them), `raw` (the
trained weights), or `auto` (EMA when the checkpoint has them, else raw). The file is checked as
data before use: its entries and their types, its space against the config's, its class count
against the data set's, and every tensor of the chosen weights finite.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from vitas.core.checkpoint import load_checkpoint, nonfinite_tensors
from vitas.core.config import Config
from vitas.core.errors import UserError
from vitas.core.layout import run_layout
from vitas.supernet.model import Superformer
from vitas.supernet.space import SearchSpace


@dataclass(frozen=True)
class SuperformerFile:
    """What a superformer checkpoint is, without its weights: enough to check a config against
    it and to tell whether scores computed with it are comparable."""

    path: Path
    weights: str            # "ema" or "raw", resolved from supernet.weights
    epoch: Optional[int]
    step: Optional[int]
    num_classes: int
    split: Optional[dict]   # the hold-out it was trained without (None: not recorded)

    def identity(self) -> dict[str, Any]:
        """Plain values that change whenever the weights scored with change."""
        return {"supernet.checkpoint": str(self.path.absolute()), "supernet.weights": self.weights,
                "checkpoint.progress": [self.epoch, self.step]}


def superformer_path(cfg: Config) -> Path:
    """`supernet.checkpoint`, else `<output_dir>/supernet/last.pth`; UserError when missing."""
    given = cfg.supernet.checkpoint
    path = Path(given).expanduser() if given else run_layout(cfg.output_dir).supernet_checkpoint
    if not path.is_file():
        key = "supernet.checkpoint" if given else "output_dir"
        raise UserError(f"{key}: superformer checkpoint not found: {path} (train one with "
                        "`vitas train-supernet`, or convert one with `vitas convert`)")
    return path


def _entries(state: Any, path: Path) -> None:
    """The entries a superformer checkpoint must have, with their types."""
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a superformer checkpoint (it holds a {type(state).__name__})")
    for key, kind in (("model", dict), ("space", dict)):
        if not isinstance(state.get(key), kind):
            what = "missing" if key not in state else f"a {type(state[key]).__name__}"
            raise UserError(f"{path} is not a superformer checkpoint: entry '{key}' is {what}")
    if state.get("ema") is not None and not isinstance(state["ema"], dict):
        raise UserError(f"{path}: entry 'ema' is a {type(state['ema']).__name__}, expected weights")
    head = state["model"].get("head.weight")
    if not torch.is_tensor(head) or head.dim() != 2:
        raise UserError(f"{path}: entry 'model' has no 2-D 'head.weight' tensor")
    for key in ("epoch", "step"):
        if state.get(key) is not None and (not isinstance(state[key], int) or isinstance(state[key], bool)):
            raise UserError(f"{path}: entry '{key}' is a {type(state[key]).__name__}, expected int")


def _weights_kind(state: dict, cfg: Config, path: Path) -> str:
    policy = cfg.supernet.weights
    if policy == "ema" and state.get("ema") is None:
        raise UserError(f"supernet.weights=ema but {path} has no EMA weights (trained with "
                        "supernet.ema off); use supernet.weights=raw or auto")
    if policy == "auto":
        return "ema" if state.get("ema") is not None else "raw"
    return policy


def inspect_superformer(cfg: Config, space: SearchSpace, num_classes: Optional[int] = None) -> SuperformerFile:
    """Check the configured superformer checkpoint against `cfg` (entries, space, classes, the
    weights policy) without reading its tensors; returns what it is."""
    path = superformer_path(cfg)
    state = load_checkpoint(path, mmap=True)
    _entries(state, path)
    space.check_spec(state["space"], str(path))
    classes = int(state["model"]["head.weight"].shape[0])
    if num_classes is not None and classes != num_classes:
        raise UserError(f"{path} has a {classes}-class head, the data set has {num_classes} classes")
    return SuperformerFile(path=path, weights=_weights_kind(state, cfg, path), epoch=state.get("epoch"),
                           step=state.get("step"), num_classes=classes, split=state.get("split"))


def read_superformer(cfg: Config, space: SearchSpace, num_classes: Optional[int] = None,
                     device: torch.device | str = "cpu") -> tuple[Superformer, SuperformerFile]:
    """The configured superformer with the policy's weights, in eval mode on `device`."""
    info = inspect_superformer(cfg, space, num_classes)
    state = load_checkpoint(info.path)
    weights = state["ema"] if info.weights == "ema" else state["model"]
    bad = nonfinite_tensors(weights)
    if bad is not None:
        raise UserError(f"{info.path}: tensor {bad} of its {info.weights} weights is not finite "
                        "(the training diverged)")
    model = Superformer(space, info.num_classes)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        line = next((x.strip() for x in str(exc).splitlines()[1:] if x.strip()), str(exc).splitlines()[0])
        raise UserError(f"{info.path} does not fit the superformer of this space: {line}") from None
    return model.to(device).eval(), info
