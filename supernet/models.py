"""The static model of an architecture, whichever kind of space it comes from: `StaticViT` for a
flat ViT, `AsViT` for a hierarchical (As-ViT) one. Retraining, evaluation, export, the proxies and
scaling build models here, from a space (`create_model`) or from the constructor arguments a
checkpoint records (`model_from_args`), so none of them branches on the kind.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from vitas.supernet.asvit import AsViT, is_asvit_arch
from vitas.supernet.static import StaticViT, full_model_args


def model_class(model_args: dict) -> type[nn.Module]:
    """`AsViT` when the recorded architecture is hierarchical, else `StaticViT`."""
    return AsViT if is_asvit_arch(model_args.get("arch")) else StaticViT


def complete_model_args(model_args: dict) -> dict:
    """`model_args` with every constructor option present (a flat ViT's options recorded before
    they existed take their defaults; As-ViT's are recorded whole): compare recorded and current
    arguments through this."""
    return dict(model_args) if model_class(model_args) is AsViT else full_model_args(model_args)


def model_from_args(model_args: dict, **kwargs: Any) -> nn.Module:
    """The model that recorded constructor arguments describe (`kwargs`: e.g. `drop_path`)."""
    return model_class(model_args)(**complete_model_args(model_args), **kwargs)


def create_model(space: Any, arch: dict, num_classes: int, **kwargs: Any) -> nn.Module:
    """The static model of a valid `arch` of `space` (a `SearchSpace` or an `AsVitSpace`) with a
    `num_classes`-way head, freshly initialised."""
    return model_from_args(space.model_args(arch, num_classes), **kwargs)
