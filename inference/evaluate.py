"""Top-1/top-5 of a trained model on a folder data set's val split, across all ranks.

The model comes from a retrain checkpoint (`<output_dir>/retrain/last.pth`: keys "model",
"model_args", "config", "class_names"), a URL to one (downloaded and sha256-verified by
`inference.hub`), or an exported folder (`config.json` + `model.safetensors`, read through
`timm.create_model('local-dir:DIR', pretrained=True)`). Images get the eval transform the model was
trained with (resize, center crop, normalisation).
"""
from __future__ import annotations

import dataclasses
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
from vitas.core.data import build_dataset, class_names, create_loader, split_dir
from vitas.core.errors import UserError
from vitas.core.layout import EVALUATE, run_layout
from vitas.core.stage import Option, Stage, StageContext
from vitas.core.metrics import evaluate_accuracy
from vitas.inference.convert import load_any_checkpoint
from vitas.inference.hub import is_url
from vitas.supernet.space import load_arch
from vitas.supernet.models import model_from_args


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
               device: torch.device | str = "cpu", ema: bool = False, arch: Optional[str] = None,
               heads: Optional[int] = None) -> LoadedModel:
    """A retrain checkpoint (file or URL; its EMA weights with `ema`), a foreign one (AutoFormer,
    ViTAS, NNI, timm/DeiT: converted in memory by `vitas.inference.convert`, `arch`/`heads` where
    the file does not say) or an exported folder, ready for inference on `device`."""
    local = Path(path_or_url).expanduser()
    if not is_url(path_or_url) and local.is_dir():
        if ema:
            raise UserError(f"{local} is an exported folder, which holds one set of weights: "
                            "--ema applies to checkpoints")
        loaded = _load_exported(local)
    else:
        ckpt = load_any_checkpoint(path_or_url, sha256, cache,
                                   arch=load_arch(arch, "inference.arch") if arch else None, heads=heads)
        if not isinstance(ckpt, dict) or "model_args" not in ckpt or "model" not in ckpt:
            raise UserError(f"{path_or_url} is not a retrain checkpoint (no 'model'/'model_args'); "
                            "export a superformer subnet first with `vitas export --arch`")
        if not isinstance(ckpt["model_args"], dict) or not isinstance(ckpt.get("config"), dict):
            raise UserError(f"{path_or_url} is not a retrain checkpoint: 'model_args' and 'config' "
                            "must be mappings")
        try:
            model = model_from_args(ckpt["model_args"])  # StaticViT, or AsViT for a hierarchical arch
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
                        split: str = "val", ema: bool = False, arch: Optional[str] = None,
                        heads: Optional[int] = None, broken_images: str = "error") -> dict:
    """`{"top1", "top5", "images"}` (percent) on `data_root/<split>`, summed over all ranks.

    `batch_size` is the global batch: each of W processes takes `ceil(batch_size / W)` images.
    """
    loaded = load_model(path_or_url, sha256, cache, dist.default_device(), ema, arch, heads)
    data = dataclasses.replace(loaded.data, root=str(data_root), workers=workers,
                               broken_images=broken_images)
    check_classes(loaded, class_names(data), str(data_root))
    dataset = build_dataset(data, split, loaded.img_size, is_training=False)
    per_rank = max(1, -(-batch_size // dist.get_world_size()))
    loader = create_loader(dataset, per_rank, shuffle=False, workers=workers)
    return evaluate_accuracy(loaded.model, loader, dist.default_device())


def checkpoint_source(cfg: Config) -> str:
    """`inference.checkpoint`, else this run's retrain checkpoint."""
    return cfg.inference.checkpoint or str(run_layout(cfg.output_dir).retrain_checkpoint)


def check(cfg: Config) -> None:
    """A checkpoint that exists (or a URL), and a data folder with the split to evaluate."""
    source = checkpoint_source(cfg)
    if not is_url(source) and not Path(source).expanduser().exists():
        key = "inference.checkpoint (--checkpoint)" if cfg.inference.checkpoint else "output_dir"
        raise UserError(f"{key}: checkpoint not found: {source}")
    if not cfg.data.root:
        raise UserError("give --data DIR (or data.root)")
    split_dir(cfg.data, cfg.inference.split)


def run(cfg: Config, ctx: StageContext) -> dict:
    """Stage entry (`vitas evaluate`, `vitas submit evaluate`): the checkpoint on `data.root`'s
    split; a recorded run also writes `<output_dir>/evaluate/result.json`."""
    checkpoint = checkpoint_source(cfg)
    inf = cfg.inference
    result = evaluate_checkpoint(checkpoint, cfg.data.root, inf.sha256, inf.cache_dir, inf.batch_size,
                                 cfg.data.workers, inf.split, ema=inf.ema, arch=inf.arch,
                                 heads=inf.heads, broken_images=cfg.data.broken_images)
    if ctx.record and dist.is_main():
        write_json({"checkpoint": checkpoint, "data": cfg.data.root, **result},
                   ctx.layout.evaluate_result)
    return {**result, "checkpoint": checkpoint, "data": cfg.data.root, "split": cfg.inference.split}


def _report(summary: dict) -> list[str]:
    return [f"{summary['checkpoint']} on {summary['data']}/{summary['split']}: top1 "
            f"{summary['top1']:.2f}% top5 {summary['top5']:.2f}% ({summary['images']} images)"]


STAGE = Stage(
    name="evaluate", folder=EVALUATE, check=check, run=run, report=_report, config_required=False,
    options=(
        Option("--checkpoint", "inference.checkpoint", "retrain checkpoint, URL, or exported folder "
               "(default: inference.checkpoint, else OUTPUT_DIR/retrain/last.pth)"),
        Option("--data", "data.root", "data folder with train/ and val/ (default: data.root)",
               metavar="DIR"),
        Option("--sha256", "inference.sha256", "expected sha256 of a downloaded checkpoint"),
        Option("--cache-dir", "inference.cache_dir", "download cache (default: inference.cache_dir, "
               "$VITAS_CACHE_DIR or ~/.cache/vitas)"),
        Option("--split", "inference.split", "folder to evaluate on (default: val)"),
        Option("--ema", "inference.ema", "evaluate the checkpoint's EMA weights", is_flag=True),
        Option("--arch", "inference.arch", "a foreign checkpoint's architecture where the file does "
               "not say (arch.json or inline JSON)", metavar="FILE_OR_JSON"),
        Option("--heads", "inference.heads", "a foreign checkpoint's head count where the file does "
               "not say", metavar="N"),
    ),
    help="top-1/top-5 of a trained model on a val split",
    description="Evaluate a retrain checkpoint (a file, or an http(s)/file URL downloaded into "
    "the cache and checked against --sha256 or a torch.hub-style hash in its name) or an "
    "exported folder on DIR/val, across all ranks under torchrun. Without -c nothing is written; "
    "with a config (or `vitas submit evaluate`) the result also goes to "
    'OUTPUT_DIR/evaluate/. The last line of stdout is {"top1", "top5", "images"}.',
    last_line=("top1", "top5", "images"))
