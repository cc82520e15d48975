"""Published checkpoints into vitas, converted exactly (`vitas convert SRC OUT`).

The layout is detected from the file's keys and shapes (`detect`), never guessed: AutoFormer's
supernet files (into a superformer of an AutoFormer space, or with `arch` into one static
subnet), NNI's AutoFormer searched models, ViTAS's released models and timm/DeiT checkpoints
(into static models). Files are read with `weights_only=True` (`load`). The results are ordinary
vitas checkpoints: a static one is what `vitas evaluate`, `predict` and `export` read, a
superformer one what `vitas search` reads (`supernet.checkpoint`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from vitas.core.checkpoint import save_checkpoint
from vitas.core.config import Config
from vitas.core.errors import UserError
from vitas.inference.convert import autoformer, nni, timm_vit, vitas_release
from vitas.inference.convert.detect import LAYOUTS, Layout, detect
from vitas.inference.convert.load import Foreign, foreign, read_entries, read_foreign
from vitas.inference.hub import resolve_checkpoint

__all__ = ["LAYOUTS", "Converted", "convert", "convert_file", "convert_foreign", "load_any_checkpoint"]

STATIC_CONVERTERS = {nni.NAME: nni.to_static, vitas_release.NAME: vitas_release.to_static,
                     timm_vit.NAME: timm_vit.to_static}
# AutoFormer's published spaces by super sizes (embed, depth): the YAML that matches them.
AUTOFORMER_SPACES = {(256, 14): "yamls/autoformer-T.yaml", (448, 14): "yamls/autoformer-S.yaml",
                     (640, 16): "yamls/autoformer-B.yaml"}


@dataclass(frozen=True)
class Converted:
    """A converted checkpoint (`kind` "static" or "superformer") and notes on its fidelity."""

    layout: Layout
    kind: str
    checkpoint: dict
    notes: list[str]

    @property
    def params(self) -> int:
        """Number of weights in the converted model."""
        return sum(t.numel() for t in self.checkpoint["model"].values())


def _autoformer(src: Foreign, arch: Optional[dict], heads: Optional[int], cfg: Optional[Config]) -> Converted:
    layout = detect(src, autoformer.NAME)
    if heads is not None:
        raise UserError("--heads does not apply to an AutoFormer file: --arch names the subnet")
    if arch is not None:
        checkpoint, notes = autoformer.to_static(src, arch, cfg)
        return Converted(layout, "static", checkpoint, notes)
    if cfg is None:
        sup, _ = autoformer.read_supernet(src)
        match = AUTOFORMER_SPACES.get((sup.embed, sup.depth))
        hint = f" ({match} has its super sizes)" if match else ""
        raise UserError(f"{src.source} is an AutoFormer supernet (super embed_dim {sup.embed}, depth "
                        f"{sup.depth}): give its space with -c{hint} to convert it into a superformer, or "
                        "--arch to convert one subnet")
    checkpoint, notes = autoformer.to_superformer(src, cfg)
    return Converted(layout, "superformer", checkpoint, notes)


def convert_foreign(src: Foreign, layout: Optional[str] = None, arch: Any = None, heads: Optional[int] = None,
                    cfg: Optional[Config] = None) -> Converted:
    """Convert a read foreign checkpoint (layout detected unless given). `arch` picks an AutoFormer
    subnet or gives head counts; `heads` gives one head count for every layer; `cfg` is the
    space (required for an AutoFormer superformer) and data settings to record."""
    if arch is not None and not isinstance(arch, dict):
        raise UserError(f"--arch must be a JSON object, got {type(arch).__name__}")
    if heads is not None and heads < 1:
        raise UserError(f"--heads must be >= 1, got {heads}")
    found = detect(src, layout)
    if found.name == autoformer.NAME:
        return _autoformer(src, arch, heads, cfg)
    checkpoint, notes = STATIC_CONVERTERS[found.name](src, arch=arch, heads=heads, cfg=cfg)
    return Converted(found, "static", checkpoint, notes)


def convert(path: str | os.PathLike, layout: Optional[str] = None, arch: Any = None,
            heads: Optional[int] = None, cfg: Optional[Config] = None) -> Converted:
    """Read and convert the checkpoint file at `path` (see `convert_foreign`)."""
    return convert_foreign(read_foreign(path), layout, arch, heads, cfg)


def convert_file(src: str | os.PathLike, out: str | os.PathLike, layout: Optional[str] = None, arch: Any = None,
                 heads: Optional[int] = None, cfg: Optional[Config] = None) -> tuple[Converted, Path]:
    """Convert `src` and write the vitas checkpoint to `out` atomically (nothing is written when
    the conversion fails)."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if out.is_dir():
        raise UserError(f"{out} is a folder; give the checkpoint file to write")
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise UserError(f"{out} is the file being converted; give another output path")
    converted = convert(src, layout, arch, heads, cfg)
    return converted, save_checkpoint(converted.checkpoint, out)


def load_any_checkpoint(path_or_url: str, sha256: Optional[str] = None, cache: Optional[str] = None,
                        arch: Any = None, heads: Optional[int] = None) -> dict:
    """A checkpoint file or URL (sha256-checked as `inference.hub` does) as vitas reads it: a vitas
    checkpoint as it is, a foreign one converted in memory into a static checkpoint (what
    `vitas evaluate` and `predict` load)."""
    path = resolve_checkpoint(path_or_url, sha256, cache)
    entries = read_entries(path)
    if isinstance(entries, dict) and ("model_args" in entries or "space" in entries):
        return entries
    return convert_foreign(foreign(path, entries), arch=arch, heads=heads).checkpoint
