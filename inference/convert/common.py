"""What every converter shares: the architecture a foreign file leaves open (head counts), and the
vitas checkpoints it writes, checked against the models that will load them.

A static checkpoint has the retrain format (`model`, `arch`, `model_args`, `config`, `space`,
`class_names`) that `vitas evaluate`, `predict` and `export` read; a superformer checkpoint has
supernet/train.py's (`model`, `ema`, `space`, `config`, `num_classes`, `epoch`, `step`). Both
record where they came from under `converted_from` (layout, file, sha256). Tensors keep the
dtype they had in the foreign file.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from vitas.core.config import Config, DataConfig, SpaceConfig
from vitas.core.errors import UserError
from vitas.inference.convert.load import Foreign
from vitas.inference.hub import sha256_file
from vitas.supernet.model import Superformer, per_patch_state
from vitas.supernet.space import SearchSpace
from vitas.supernet.static import StaticViT, check_arch

WIDTHS = ("patch_size", "embed_dim", "depth", "attn_dim", "mlp_dim")


def provenance(src: Foreign, layout: str) -> dict:
    """Where a converted checkpoint came from."""
    return {"layout": layout, "file": str(src.path.resolve()), "sha256": sha256_file(src.path)}


def resolve_arch(found: dict, source: str, arch: Optional[dict] = None, heads: Optional[int] = None,
                 default_heads: Optional[Sequence[int]] = None, hint: str = "") -> dict:
    """The architecture of a foreign model whose tensors gave `found` (every field but num_heads):
    head counts from `arch` (whose other fields must agree with the tensors), else `heads` in
    every layer, else `default_heads`; a UserError (ending in `hint`) when none says."""
    if arch is not None:
        if not isinstance(arch, dict):
            raise UserError("--arch must be a JSON object")
        for field in WIDTHS:
            if field in arch and arch[field] != found[field]:
                raise UserError(f"--arch field '{field}' is {arch[field]!r}, the tensors of {source} give "
                                f"{found[field]!r}")
        num_heads = arch.get("num_heads")
    elif heads is not None:
        num_heads = [heads] * found["depth"]
    else:
        num_heads = default_heads
    if num_heads is None:
        raise UserError(f"{source} does not record its head counts: give them with --heads N (every "
                        f"layer) or --arch ARCH.json{hint}")
    try:
        return check_arch({**found, "num_heads": list(num_heads)})
    except (ValueError, TypeError) as exc:
        raise UserError(f"{source}: {exc}") from None


def _check_shapes(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], what: str) -> None:
    """Converter self-check: `state` must have exactly the keys and shapes `expected` has."""
    got = {k: tuple(v.shape) for k, v in state.items()}
    want = {k: tuple(v.shape) for k, v in expected.items()}
    if got != want:
        diff = sorted(set(got) ^ set(want)) or sorted(k for k in got if got[k] != want[k])
        raise RuntimeError(f"converted weights do not fit the {what}: {diff[:4]}")


def single_arch_space(model_args: dict, name: str, norm_eps: Optional[float]) -> SpaceConfig:
    """A space holding exactly this model's architecture (recorded with a static checkpoint)."""
    arch = model_args["arch"]
    head_dims = {a // h for a, h in zip(arch["attn_dim"], arch["num_heads"])}
    fixed = head_dims.pop() if len(head_dims) == 1 else None
    return SpaceConfig(
        name=name, img_size=model_args["img_size"], in_chans=model_args["in_chans"],
        patch_size=[arch["patch_size"]], embed_dim=[arch["embed_dim"]], depth=[arch["depth"]],
        num_heads=sorted(set(arch["num_heads"])), head_dim=fixed,
        attn_dim=None if fixed else sorted(set(arch["attn_dim"])), mlp_dim=sorted(set(arch["mlp_dim"])),
        rel_pos=model_args["rel_pos"], rel_pos_max=model_args["rel_pos_max"], pool=model_args["pool"],
        qkv_bias=model_args["qkv_bias"], norm_eps=norm_eps)


def _check_config_space(model_args: dict, space_cfg: SpaceConfig) -> None:
    """A given config's space must describe the converted model."""
    for key in ("img_size", "in_chans", "rel_pos", "pool", "qkv_bias"):
        if getattr(space_cfg, key) != model_args[key]:
            raise UserError(f"space.{key} is {getattr(space_cfg, key)!r} but the converted model has "
                            f"{model_args[key]!r}")
    if model_args["rel_pos"] and space_cfg.rel_pos_max != model_args["rel_pos_max"]:
        raise UserError(f"space.rel_pos_max is {space_cfg.rel_pos_max} but the checkpoint's tables reach "
                        f"{model_args['rel_pos_max']}")
    arch = SearchSpace(space_cfg).validate(model_args["arch"])
    if arch != model_args["arch"]:
        raise UserError("the architecture is not in its canonical form in space "
                        f"{space_cfg.name!r}: {arch}")


def static_checkpoint(src: Foreign, layout: str, model_args: dict, state: dict[str, torch.Tensor],
                      cfg: Optional[Config], interpolation: str = "bicubic") -> dict:
    """A retrain-format checkpoint of a StaticViT with `model_args` and weights `state`.

    With `cfg`, its space must hold the architecture and its config is recorded; without, the
    space is the architecture alone and the data settings are the ImageNet evaluation transform
    the layout's own code uses (mean/std, crop 0.875, `interpolation`)."""
    with torch.device("meta"):
        model = StaticViT(**model_args)
    _check_shapes(model.state_dict(), state, "static model")
    args = model.model_args
    if cfg is not None:
        _check_config_space(args, cfg.space)
        config = cfg
    else:
        config = Config(space=single_arch_space(args, f"{layout}-converted", args["norm_eps"]),
                        data=DataConfig(num_classes=args["num_classes"], interpolation=interpolation))
    return {"model": state, "arch": args["arch"], "model_args": args, "config": config.to_dict(),
            "space": SearchSpace(config.space).spec(), "class_names": None,
            "converted_from": provenance(src, layout)}


def superformer_checkpoint(src: Foreign, layout: str, state: dict[str, torch.Tensor], cfg: Config,
                           num_classes: int, epoch: int) -> dict:
    """A superformer checkpoint (supernet/train.py's entries) of `cfg`'s space."""
    space = SearchSpace(cfg.space)
    with torch.device("meta"):
        model = Superformer(space, num_classes)
    state = per_patch_state(state, space)
    _check_shapes(model.state_dict(), state, f"superformer of space {cfg.space.name!r}")
    return {"model": state, "ema": None, "space": space.spec(), "config": cfg.to_dict(),
            "num_classes": num_classes, "epoch": epoch, "step": 0, "converted_from": provenance(src, layout)}
