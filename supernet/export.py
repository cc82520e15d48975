"""Export a subnet as a timm folder (`config.json` + `model.safetensors`).

A uniform architecture (one patch size, the same heads and MLP width in every layer,
attn_dim == embed_dim, no relative positions) becomes a stock timm `VisionTransformer`; any
other flat one becomes `vitas_vit` (`supernet.static.StaticViT`), and an As-ViT one
`vitas_asvit` (`supernet.asvit.AsViT`), both registered with timm when `vitas.supernet` is
imported.
Both are written by `timm.models._hub.save_for_hf`, so `timm.create_model('local-dir:DIR',
pretrained=True)` rebuilds the model exactly; config.json also records the architecture under
`vitas_arch`. The folder is written to a temporary sibling and renamed into place.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models._hub import save_for_hf

from vitas.core.checkpoint import usual_permissions
from vitas.core.errors import UserError
from vitas.supernet.asvit import AsViT, is_asvit_arch
from vitas.supernet.model import Superformer
from vitas.supernet.static import TIMM_OPTIONS, StaticViT, full_model_args

# What an export folder holds: only such a folder (or an empty one) may be replaced.
EXPORT_FILES = frozenset({"config.json", "model.safetensors"})

# Any timm ViT entry point will do: every architecture argument is overridden by model_args.
TIMM_VIT = "vit_base_patch16_224"


def is_uniform(model_args: dict) -> bool:
    """Whether a StaticViT's architecture is a stock timm VisionTransformer."""
    arch = model_args["arch"]
    E, m = arch["embed_dim"], arch["mlp_dim"][0]
    options = full_model_args(model_args)
    return (
        not model_args["rel_pos"]
        and all(options[k] == v for k, v in TIMM_OPTIONS.items())  # eps, scale, no distillation
        and len(set(arch["num_heads"])) == 1
        and set(arch["mlp_dim"]) == {m}
        and set(arch["attn_dim"]) == {E}
        and int(E * (m / E)) == m  # timm rebuilds the hidden width as int(embed_dim * mlp_ratio)
    )


def timm_vit_args(model_args: dict) -> dict:
    """timm VisionTransformer arguments equivalent to a uniform StaticViT's arguments."""
    arch = model_args["arch"]
    E = arch["embed_dim"]
    return dict(
        img_size=model_args["img_size"], patch_size=arch["patch_size"], in_chans=model_args["in_chans"],
        num_classes=model_args["num_classes"], embed_dim=E, depth=arch["depth"],
        num_heads=arch["num_heads"][0], mlp_ratio=arch["mlp_dim"][0] / E, qkv_bias=model_args["qkv_bias"],
        global_pool="token" if model_args["pool"] == "cls" else "avg", fc_norm=False,
    )


def timm_target(model_args: dict) -> tuple[str, dict]:
    """(timm model name, its constructor arguments) that rebuild a static model: `vitas_asvit`
    for As-ViT, a stock timm ViT for a uniform flat one, else `vitas_vit`."""
    if is_asvit_arch(model_args["arch"]):
        return "vitas_asvit", dict(model_args)
    if is_uniform(model_args):
        return TIMM_VIT, timm_vit_args(model_args)
    return "vitas_vit", dict(model_args)


def _pretrained_cfg(name: str, model_args: dict) -> dict:
    """timm's record of the weights: our own preprocessing defaults, not those of the entry
    point's published checkpoints (As-ViT takes any image size: no fixed input size)."""
    size = model_args["img_size"]
    asvit = name == "vitas_asvit"
    return dict(
        architecture=name, num_classes=model_args["num_classes"],
        input_size=(model_args["in_chans"], size, size), fixed_input_size=not asvit,
        interpolation="bicubic", crop_pct=0.875, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv="stem.proj" if asvit else "patch_embed.proj", classifier="head.fc" if asvit else "head",
    )


def export(
    model: Union[StaticViT, AsViT, tuple[Superformer, dict]],
    out_dir: Union[str, os.PathLike],
    data_config: Optional[dict] = None,
) -> Path:
    """Write `model` (a StaticViT or AsViT, or a (superformer, arch) pair, extracted first) to
    `out_dir`.

    `data_config` (e.g. mean, std, interpolation, crop_pct) is recorded as the model's
    preprocessing (default: ImageNet mean/std, bicubic, crop 0.875). Returns the folder. An
    earlier export at `out_dir` is replaced only once the new one is complete; anything else
    there (a file, a folder with other contents) is refused, never deleted.
    """
    out = Path(out_dir)
    check_export_target(out)
    if isinstance(model, tuple):
        supernet, arch = model
        static = supernet.extract(arch)
    else:
        static = model
    args = dict(static.model_args)
    name, build_args = timm_target(args)
    target = timm.create_model(name, pretrained=False, pretrained_cfg=_pretrained_cfg(name, args), **build_args)
    target.load_state_dict({k: v.detach().cpu() for k, v in static.state_dict().items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_for_hf(target, tmp, model_config={"vitas_arch": args["arch"]}, model_args=build_args,
                    safe_serialization=True, data_config=data_config)
        for path in (tmp, *tmp.iterdir()):
            usual_permissions(path)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "dir")
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_export_target(out: Path) -> None:
    """UserError unless `out` is free, an empty folder or an earlier export (safe to replace)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"export: {out} exists and is not a folder; give a new folder path")
    if out.is_dir():
        other = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES)
        if other:
            raise UserError(f"export: {out} holds other files ({', '.join(other[:3])}"
                            f"{', ...' if len(other) > 3 else ''}), not an earlier export; "
                            "give a new or empty folder")


def load_exported(path: Union[str, os.PathLike]) -> torch.nn.Module:
    """The model of an exported folder, through timm (`local-dir:`) in eval mode."""
    return timm.create_model(f"local-dir:{Path(path).resolve()}", pretrained=True).eval()
