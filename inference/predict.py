"""Top-k classes with probabilities for single images, from any model `load_model` accepts.

Class names come from a data folder (`train/<class>/`, the order training used), else from the
checkpoint (retrain records them; an export records `label_names`), else class indices.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image

from vitas.core.config import DataConfig
from vitas.core.data import build_transform, class_names, open_image
from vitas.core.errors import UserError
from vitas.inference.evaluate import check_classes, load_model


def _read(path: str) -> Image.Image:
    """An image as RGB, read as training reads images (16-bit scaled, bombs refused); missing or
    unreadable files are UserErrors."""
    if not Path(path).is_file():
        raise UserError(f"image not found: {path}")
    return open_image(Path(path))


@torch.no_grad()
def predict(path_or_url: str, images: Sequence[str], data_root: Optional[str] = None, topk: int = 5,
            sha256: Optional[str] = None, cache: Optional[str] = None, ema: bool = False,
            arch: Optional[str] = None, heads: Optional[int] = None) -> list[dict]:
    """For each image `{"image", "topk": [{"class", "index", "prob"}, ...]}`, most likely first
    (`arch`/`heads`: a foreign checkpoint's architecture where the file does not say)."""
    if not images:
        raise UserError("no images given")
    loaded = load_model(path_or_url, sha256, cache, ema=ema, arch=arch, heads=heads)
    outputs = loaded.model.num_classes
    names = loaded.class_names
    if data_root:
        names = class_names(DataConfig(root=str(data_root)))
        check_classes(loaded, names, str(data_root))
    names = list(names) if names else [str(i) for i in range(outputs)]
    transform = build_transform(loaded.data, loaded.img_size, is_training=False)
    batch = torch.stack([transform(_read(p)) for p in images])
    probs = loaded.model(batch).softmax(dim=-1)
    top = probs.topk(min(topk, outputs), dim=-1)
    return [
        {"image": str(path), "topk": [
            {"class": names[i] if i < len(names) else str(i), "index": int(i), "prob": float(p)}
            for p, i in zip(top.values[row].tolist(), top.indices[row].tolist())]}
        for row, path in enumerate(images)
    ]
