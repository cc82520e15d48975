"""Top-1/top-5 of a trained model on a folder data set's val split, across all ranks.

The model comes from a retrain checkpoint (`<output_dir>/retrain/last.pth`: keys "model",
"model_args", "config", "class_names"), a URL to one (downloaded and sha256-verified by
`inference.hub`), or an exported folder (`config.json` + `model.safetensors`, read through
`timm.create_model('local-dir:DIR', pretrained=True)`). Images get the eval transform the model was
trained with (resize, center crop, normalisation).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple, Optional

import timm
import torch
from safetensors import SafetensorError
from timm.data import resolve_data_config
from torch import nn

from vitas.core import dist
from vitas.core.checkpoint import model_weights, write_json
from vitas.core.config import Config, DataConfig, config_from_dict
from vitas.core.data import build_dataset, class_names, create_loader
from vitas.core.errors import UserError
from vitas.core.metrics import evaluate_accuracy
from vitas.inference.hub import is_url, load_remote
from vitas.supernet.static import StaticViT


class LoadedModel(NamedTuple):
    """A model in eval mode with what is needed to feed it and to name its outputs."""

    model: nn.Module
    data: DataConfig
    img_size: int
    class_names: Optional[list[str]]


def _load_exported(folder: Path) -> LoadedModel:
    """An exported folder through timm; transform settings and labels from its pretrained_cfg."""
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} is not an exported model folder (no config.json)")
    try:
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise UserError(f"cannot load exported model {folder}: {str(exc).splitlines()[0]}") from None
    cfg = resolve_data_config({}, model=model)
    data = DataConfig(interpolation=cfg["interpolation"], mean=list(cfg["mean"]), std=list(cfg["std"]),
                      crop_pct=cfg["crop_pct"])
    labels = model.pretrained_cfg.get("label_names")
    return LoadedModel(model.eval(), data, cfg["input_size"][-1], list(labels) if labels else None)


def load_model(path_or_url: str, sha256: Optional[str] = None, cache: Optional[str] = None,
               device: torch.device | str = "cpu", ema: bool = False) -> LoadedModel:
    """A retrain checkpoint (file or URL; its EMA weights with `ema`) or an exported folder,
    ready for inference on `device`."""
    local = Path(path_or_url).expanduser()
    if not is_url(path_or_url) and local.is_dir():
        if ema:
            raise UserError(f"{local} is an exported folder, which holds one set of weights: "
                            "--ema applies to checkpoints")
        loaded = _load_exported(local)
    else:
        ckpt = load_remote(path_or_url, sha256, cache)
        if not isinstance(ckpt, dict) or "model_args" not in ckpt or "model" not in ckpt:
            raise UserError(f"{path_or_url} is not a retrain checkpoint (no 'model'/'model_args'); "
                            "export a superformer subnet first with `vitas export --arch`")
        if not isinstance(ckpt["model_args"], dict) or not isinstance(ckpt.get("config"), dict):
            raise UserError(f"{path_or_url} is not a retrain checkpoint: 'model_args' and 'config' "
                            "must be mappings")
        try:
            model = StaticViT(**ckpt["model_args"])
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise UserError(f"{path_or_url}: its model_args do not describe a model ({exc})") from None
        try:
            model.load_state_dict(model_weights(ckpt, path_or_url, ema))
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise UserError(f"{path_or_url}: weights do not fit its model_args "
                            f"({str(exc).splitlines()[0]})") from None
        data = config_from_dict(ckpt["config"]).data
        loaded = LoadedModel(model.eval(), data, model.model_args["img_size"], ckpt.get("class_names"))
    return loaded._replace(model=loaded.model.to(device))


def check_classes(loaded: LoadedModel, names: list[str], root: str) -> None:
    """The data set's classes must be those the model was trained on, in the same order."""
    outputs = loaded.model.num_classes
    if loaded.class_names is not None and list(loaded.class_names) != list(names):
        raise UserError(f"the classes of {root} differ from the model's "
                        f"({len(names)} vs {len(loaded.class_names)}; first {names[:3]} vs "
                        f"{list(loaded.class_names)[:3]})")
    if len(names) > outputs:
        raise UserError(f"{root} has {len(names)} classes but the model has {outputs} outputs")


def evaluate_checkpoint(path_or_url: str, data_root: str, sha256: Optional[str] = None,
                        cache: Optional[str] = None, batch_size: int = 256, workers: int = 2,
                        split: str = "val", ema: bool = False) -> dict:
    """`{"top1", "top5", "images"}` (percent) on `data_root/<split>`, summed over all ranks.

    `batch_size` is the global batch: each of W processes takes `ceil(batch_size / W)` images.
    """
    info = dist.init_distributed()
    loaded = load_model(path_or_url, sha256, cache, info.device, ema)
    data = dataclasses.replace(loaded.data, root=str(data_root), workers=workers)
    check_classes(loaded, class_names(data), str(data_root))
    dataset = build_dataset(data, split, loaded.img_size, is_training=False)
    per_rank = max(1, -(-batch_size // info.world_size))
    loader = create_loader(dataset, per_rank, shuffle=False, workers=workers)
    return evaluate_accuracy(loaded.model, loader, info.device)


def run(cfg: Config) -> dict:
    """Stage entry (`vitas submit evaluate`): `inference.checkpoint` (default: this run's retrain
    checkpoint) on `data.root`; writes `<output_dir>/evaluate/result.json` and prints the JSON."""
    checkpoint = cfg.inference.checkpoint or str(cfg.stage_dir("retrain") / "last.pth")
    result = evaluate_checkpoint(checkpoint, cfg.data.root, cfg.inference.sha256,
                                 cfg.inference.cache_dir, cfg.inference.batch_size, cfg.data.workers,
                                 ema=cfg.inference.ema)
    if dist.is_main():
        write_json({"checkpoint": checkpoint, "data": cfg.data.root, **result},
                   cfg.stage_dir("evaluate") / "result.json")
        print(json.dumps(result), flush=True)
    return result
