"""Foreign checkpoint files read safely: torch pickles through `torch.load(weights_only=True)` with
one allowed class, `argparse.Namespace` (AutoFormer's files keep their command line under `args`),
and `.safetensors` files through safetensors. A pickle asking for anything else is refused.
"""
from __future__ import annotations

import argparse
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from vitas.core.errors import UserError
from vitas.supernet.pretrained import read_weights_file, weights_of

# The only classes a foreign pickle may construct beyond torch's weights-only set.
SAFE_GLOBALS = (argparse.Namespace,)


@dataclass(frozen=True)
class Foreign:
    """A foreign checkpoint: its top-level entries and the weights found among them."""

    path: Path
    entries: dict
    where: str  # the entry holding the weights; "" for a bare state dict
    weights: dict[str, torch.Tensor]

    @property
    def args(self) -> Optional[dict]:
        """The command line the file was trained with (`args`), as a dict, or None."""
        args = self.entries.get("args") if self.where else None
        if isinstance(args, argparse.Namespace):
            return vars(args)
        return args if isinstance(args, dict) else None

    @property
    def source(self) -> str:
        """The file name, for messages."""
        return str(self.path)


def _refusal(message: str) -> str:
    """Why the weights-only unpickler refused a file, in a few words."""
    for line in message.splitlines():
        if "GLOBAL" in line or "global" in line:
            return f"its pickle asks for code ({line.strip().rstrip('.')})"
    return "it is not a checkpoint of tensors and plain values"


def read_entries(path: str | os.PathLike) -> Any:
    """The loaded contents of a checkpoint file (see the module docstring)."""
    path = Path(path).expanduser()
    if path.suffix == ".safetensors":
        return read_weights_file(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"refusing to load {path}: {_refusal(str(exc))}; vitas reads checkpoints with "
                        "weights_only=True (argparse.Namespace is the one class it allows)") from None
    except EOFError:
        raise UserError(f"cannot read checkpoint {path}: the file is empty or cut short") from None
    except (RuntimeError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read checkpoint {path}: {first}") from None


def foreign(path: str | os.PathLike, entries: Any) -> Foreign:
    """The read file `path` as a Foreign checkpoint: its weights found among `entries` (under
    `model`, `state_dict`, `module`, or a bare state dict)."""
    where, weights = weights_of(entries, str(path))
    return Foreign(path=Path(path).expanduser(), entries=entries, where=where, weights=weights)


def read_foreign(path: str | os.PathLike) -> Foreign:
    """Read a checkpoint file as a Foreign checkpoint."""
    return foreign(path, read_entries(path))
