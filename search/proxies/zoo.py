"""Every training-free proxy by name, with its better-direction, computed on one set of re-drawn
initialisations and one proxy batch.

`compute_proxies(names, model, arch, images, cfg, labels)` scores one architecture (a subnet of a
fresh Superformer, or a plain model when `arch` is None) and `proxy_records` many. Init k re-draws
the weights with seed `proxy.seed + k` (`measures.initialised`); every per-init proxy is taken on
that init and averaged over the `proxy.inits` inits (kappa over all of them, or the first only
with `proxy.ntk_average: false`); `params` and `macs` are properties of the architecture. A value
that is None, NaN or infinite at any init makes the proxy None and the record `valid: false`;
it is never averaged in as a number. Definitions, papers and directions: docs/PROXIES.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vitas.core.config import ProxyConfig
from vitas.core.errors import UserError
from vitas.search.proxies import measures
from vitas.search.proxies.activation import nwot
from vitas.search.proxies.gradients import layer_weights, linearised_gradients, loss_gradients
from vitas.search.proxies.saliency import dss, snip, synflow
from vitas.search.proxies.zico import zico
from vitas.supernet.complexity import arch_cost
from vitas.supernet.model import Superformer


@dataclass(frozen=True)
class Proxy:
    """A proxy's name, better-direction (+1: higher predicts better accuracy, -1: lower), whether
    it is taken per initialisation (else a property of the architecture), whether it needs the
    batch's labels, and whether it is positive and spans decades (log scale in an ensemble)."""

    name: str
    better: int
    per_init: bool = True
    labels: bool = False
    log_scale: bool = True
    source: str = ""


PROXIES: dict[str, Proxy] = {p.name: p for p in (
    Proxy("length_distortion", +1, source="As-ViT (Chen et al., ICLR 2022)"),
    Proxy("ntk_condition", -1, source="As-ViT / TE-NAS (Chen et al., ICLR 2021)"),
    Proxy("curvature", +1, source="As-ViT (study only; direction assumed: more curvature, more expressive)"),
    Proxy("dss", +1, source="TF-TAS (Zhou et al., CVPR 2022)"),
    Proxy("zico", +1, labels=True, log_scale=False, source="ZiCo (Li et al., ICLR 2023)"),
    Proxy("snip", +1, labels=True, source="SNIP (Lee et al., ICLR 2019)"),
    Proxy("synflow", +1, source="synflow (Tanaka et al., NeurIPS 2020)"),
    Proxy("nwot", +1, log_scale=False, source="NWOT (Mellor et al., ICML 2021)"),
    Proxy("params", +1, per_init=False, source="baseline: parameter count"),
    Proxy("macs", +1, per_init=False, source="baseline: multiply-accumulates per image"),
)}
NAMES = tuple(PROXIES)
ON_NET = {"length_distortion", "curvature"}  # taken on the activated superformer, not an extracted copy


def check_names(names: Iterable[str]) -> list[str]:
    """`names` as a list, or a UserError naming the unknown one and the known proxies."""
    names = list(names)
    for name in names:
        if name not in PROXIES:
            raise UserError(f"unknown proxy {name!r}; proxies are {list(NAMES)}")
    if len(set(names)) != len(names):
        raise UserError(f"proxy names repeat: {names}")
    return names


def check(names: Sequence[str], images: torch.Tensor, cfg: ProxyConfig, labels: Optional[torch.Tensor]) -> None:
    """UserError for settings the requested proxies cannot run with."""
    measures.check_proxy_config(cfg)
    check_names(names)
    if len(images) < 2:
        raise UserError(f"the proxies need at least 2 images, got {len(images)}")
    needs = [n for n in names if PROXIES[n].labels]
    if needs and labels is None:
        raise UserError(f"proxies {needs} need the labels of the proxy batch")
    if needs and len(images) % cfg.zico_batches:
        raise UserError(f"proxy.ntk_images={len(images)} does not split into proxy.zico_batches="
                        f"{cfg.zico_batches} equal batches")


def architecture_cost(model: nn.Module, arch: Optional[dict], input_shape: Sequence[int]) -> tuple[int, int]:
    """(params, MACs) of `arch` in a Superformer (analytic, `supernet.complexity`), or of a plain
    model (its parameter count; MACs = FLOPs / 2 of one image under the math attention kernel)."""
    if arch is not None and isinstance(model, Superformer):
        cost = arch_cost(model.space.canonical(arch), model.space, model.num_classes)
        return cost.params, cost.macs
    params = sum(p.numel() for p in model.parameters())
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        model(torch.zeros((1, *input_shape), device=device))
    return params, counter.get_total_flops() // 2


def _one_init(names: set[str], net: nn.Module, static: nn.Module, images: torch.Tensor,
              labels: Optional[torch.Tensor], seed: int, cfg: ProxyConfig, ntk: bool) -> dict[str, Optional[float]]:
    """Every per-init proxy in `names` at one initialisation: L^E/curvature on `net` (the activated
    superformer or the model), the others on `static` (the extracted arch or the model)."""
    out: dict[str, Optional[float]] = {}
    if names & ON_NET:
        length, curv = measures.length_distortion(net, images.shape[1:], seed, cfg, "curvature" in names)
        out.update(length_distortion=length, curvature=curv)
    if "ntk_condition" in names and ntk:
        out["ntk_condition"] = measures.ntk_condition(static, images, cfg)
    if names & {"snip", "zico"}:
        grads = loss_gradients(static, images, labels, cfg.zico_batches)
        if "snip" in names:
            out["snip"] = snip(layer_weights(static), grads)
        if "zico" in names:
            out["zico"] = zico(grads)
    if names & {"synflow", "dss"}:
        linear = linearised_gradients(static, images.shape[1:])
        if "synflow" in names:
            out["synflow"] = synflow(linear)
        if "dss" in names:
            out["dss"] = dss(linear)
    if "nwot" in names:
        out["nwot"] = nwot(static, images)
    return {k: v for k, v in out.items() if k in names}


def _finite(value: Optional[float]) -> Optional[float]:
    return value if value is not None and math.isfinite(value) else None


def compute_proxies(names: Sequence[str], model: nn.Module, arch: Optional[dict], images: torch.Tensor,
                    cfg: ProxyConfig, labels: Optional[torch.Tensor] = None) -> dict:
    """{name: value or None for each of `names`, "valid": all of them finite} for one arch."""
    return proxy_records(names, model, [arch], images, cfg, labels)[0]


def proxy_records(names: Sequence[str], model: nn.Module, archs: Sequence[Optional[dict]], images: torch.Tensor,
                  cfg: ProxyConfig, labels: Optional[torch.Tensor] = None) -> list[dict]:
    """`compute_proxies` of each arch, in order."""
    check(names, images, cfg, labels)
    per_init = {n for n in names if PROXIES[n].per_init}
    records = []
    for arch in archs:
        values: dict[str, list[Optional[float]]] = {n: [] for n in per_init}
        for k in range(cfg.inits if per_init else 0):
            net = measures.initialised(model, arch, cfg.seed + k)
            static = measures.extracted(net, arch) if per_init - ON_NET else net
            for name, v in _one_init(per_init, net, static, images, labels, cfg.seed + k, cfg,
                                     ntk=k == 0 or cfg.ntk_average).items():
                values[name].append(v)
        rec: dict = {n: measures.finite_mean(values[n]) for n in names if n in per_init}
        if {"params", "macs"} & set(names):
            params, macs = architecture_cost(model, arch, images.shape[1:])
            rec.update({k: v for k, v in (("params", params), ("macs", macs)) if k in names})
        rec = {n: _finite(rec[n]) for n in names}
        rec["valid"] = all(v is not None for v in rec.values())
        records.append(rec)
    return records
