"""Training-free proxies of As-ViT: length distortion L^E, NTK condition number, curvature.

L^E and curvature follow an input circle x(theta) = r (u0 cos theta + u1 sin theta) through the
network (u0, u1 orthonormal in R^N, N = C x H x W) at `proxy.thetas` angles in [0, 2 pi), with
velocity v = dN/dtheta and acceleration a = dv/dtheta: L^E = sum_theta ||v||, curvature =
mean_theta sqrt(|v|^2 |a|^2 - (v.a)^2) / |v|^3, both averaged over `proxy.inits` initialisations.
The NTK condition number is lambda_max / lambda_min of Theta = G G^T, G the per-sample gradients of
the summed output (`proxy.ntk_output`: As-ViT's pooled features before the final norm, or the
logits) w.r.t. the weights (parameters named `*weight`, as As-ViT's code), eigenvalues in float64,
averaged over the initialisations as As-ViT (`proxy.ntk_average`). See docs/PROXIES.md for the
options and their defaults; the other proxy families are in the sibling modules (`zoo`).
"""
from __future__ import annotations

import contextlib
import math
import zlib
from typing import Callable, Collection, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from vitas.core.config import Config, ProxyConfig
from vitas.core.data import build_dataset, num_classes, split_train_holdout
from vitas.core.errors import UserError
from vitas.supernet.layers import RelativePosition2D
from vitas.supernet.model import Superformer
from vitas.supernet.space import space_from_config

FIELDS = ("length_distortion", "ntk_condition", "curvature")
CHOICES = {"radius": ("unit", "sqrt_n"), "output": ("features", "logits"), "norm": ("identity", "keep"),
           "velocity": ("fd", "jvp", "reverse"), "ntk_method": ("vmap", "loop"),
           "ntk_output": ("features", "logits")}
# Central-difference step in theta (radians) per precision: in float32 the step balances the
# truncation error (~h^2/6) against rounding (outputs are ~100x their change at r = 1).
FD_STEPS = {torch.float32: 3e-2, torch.float64: 1e-3}


def check_proxy_config(cfg: ProxyConfig) -> None:
    """UserError naming the `proxy.*` key whose value is not allowed."""
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise UserError(f"proxy.{key} must be one of {list(allowed)}, got {getattr(cfg, key)!r}")
    for key in ("thetas", "inits", "ntk_images"):
        if getattr(cfg, key) < (2 if key == "ntk_images" else 1):
            raise UserError(f"proxy.{key} must be >= {2 if key == 'ntk_images' else 1}, got {getattr(cfg, key)}")


def _param_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _trunc_normal_(p: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """timm's trunc_normal_(std) cuts at the absolute bounds +-2, i.e. 100 std for std 0.02: the
    same law as a normal draw clamped there, which is several times faster to sample."""
    p.normal_(0.0, std, generator=generator).clamp_(-2.0, 2.0)


def _init_param(module: nn.Module, name: str, p: torch.Tensor, generator: torch.Generator) -> None:
    """One parameter drawn as the ViT models draw it (timm's scheme; PyTorch's for the conv)."""
    if name == "pos_embed" or isinstance(module, RelativePosition2D):
        _trunc_normal_(p, 0.02, generator)
    elif name == "cls_token":
        nn.init.normal_(p, std=1e-6, generator=generator)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(p) if name == "weight" else nn.init.zeros_(p)
    elif isinstance(module, nn.Linear):
        _trunc_normal_(p, 0.02, generator) if name == "weight" else nn.init.zeros_(p)
    elif isinstance(module, nn.Conv2d):
        if name == "weight":
            nn.init.kaiming_uniform_(p, a=math.sqrt(5), generator=generator)
        else:
            bound = 1 / math.sqrt(math.prod(module.weight.shape[1:]))
            nn.init.uniform_(p, -bound, bound, generator=generator)
    else:
        raise ValueError(f"no initialisation rule for parameter '{name}' of {type(module).__name__}")


def reinit(model: nn.Module, seed: int, names: Optional[Collection[str]] = None) -> None:
    """Re-draw the parameters of `model` (all, or those in `names`) with the ViT init scheme, each
    tensor from its own generator seeded by (seed, its name): a tensor's values depend only on the
    seed, never on which other tensors are re-drawn, and the global RNG is not touched (a
    generator per tensor draws what `torch.manual_seed` would, without its cost: it queues a CUDA
    re-seed and records a stack trace on every call)."""
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for name, p in module.named_parameters(recurse=False):
                full = f"{module_name}.{name}" if module_name else name
                if names is None or full in names:
                    generator = torch.Generator(device=p.device).manual_seed(_param_seed(seed, full))
                    _init_param(module, name, p, generator)


# ------------------------------------------------------------------------------- the circle
def circle_basis(shape: Sequence[int], seed: int, dtype: torch.dtype = torch.float32
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """An orthonormal pair (u0, u1) of input-shaped tensors, fixed by `seed`."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(math.prod(shape), 2, generator=g, dtype=torch.float64))
    return q[:, 0].to(dtype).reshape(*shape), q[:, 1].to(dtype).reshape(*shape)


def circle_radius(shape: Sequence[int], radius: str) -> float:
    """r = 1 (`unit`, As-ViT's code) or sqrt(N) (`sqrt_n`, As-ViT's paper)."""
    return 1.0 if radius == "unit" else math.sqrt(math.prod(shape))


def circle_thetas(n: int) -> torch.Tensor:
    """`n` angles evenly spaced in [0, 2 pi)."""
    return torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)


def _circle(u0: torch.Tensor, u1: torch.Tensor, r: float, theta: torch.Tensor) -> torch.Tensor:
    """Inputs r (u0 cos theta + u1 sin theta) for a batch of angles: (T, *input shape)."""
    shape = (-1,) + (1,) * u0.dim()
    c, s = torch.cos(theta).reshape(shape), torch.sin(theta).reshape(shape)
    return (r * (c * u0 + s * u1)).to(u0.dtype)


def circle_derivatives(fn: Callable[[torch.Tensor], torch.Tensor], u0: torch.Tensor, u1: torch.Tensor,
                       r: float, thetas: torch.Tensor, method: str = "fd",
                       acceleration: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(v, a) of the output curve fn(x(theta)), each (T, D); a is None unless `acceleration`.

    `fd`: central differences (step FD_STEPS[dtype]), all angles and offsets in one batch (2T
    rows, 3T with a);
    `jvp`: forward-mode AD (nested for a) in one batched pass; `reverse`: reverse-mode AD, one
    backward pass per output coordinate (a slow reference for tests).
    """
    flat = lambda y: y.reshape(y.shape[0], -1)  # noqa: E731
    g = lambda t: flat(fn(_circle(u0, u1, r, t)))  # noqa: E731
    thetas = thetas.to(u0.device)
    if method == "fd":
        h = FD_STEPS[u0.dtype]
        offsets = [-h, h, 0.0] if acceleration else [-h, h]
        with torch.no_grad():
            y = g(torch.cat([thetas + o for o in offsets])).double().unflatten(0, (len(offsets), -1))
        v = (y[1] - y[0]) / (2 * h)
        return v, ((y[1] - 2 * y[2] + y[0]) / h**2 if acceleration else None)
    t = thetas.to(u0.dtype)
    ones = torch.ones_like(t)
    if method == "jvp":
        with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
            if not acceleration:
                return jvp(g, (t,), (ones,))[1].double(), None
            v, a = jvp(lambda s: jvp(g, (s,), (ones,))[1], (t,), (ones,))
        return v.double(), a.double()
    if method != "reverse":
        raise ValueError(f"unknown velocity method {method!r}")
    t = t.clone().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):
        y = g(t)
        cols = [torch.autograd.grad(y[:, i].sum(), t, create_graph=acceleration, retain_graph=True)[0]
                for i in range(y.shape[1])]
        v = torch.stack(cols, dim=1)
        if not acceleration:
            return v.detach().double(), None
        a = torch.stack([torch.autograd.grad(c.sum(), t, retain_graph=True)[0] for c in cols], dim=1)
    return v.detach().double(), a.detach().double()


def curve_complexity(v: torch.Tensor, a: Optional[torch.Tensor]) -> tuple[float, Optional[float]]:
    """(L^E = sum_theta ||v||, mean_theta extrinsic curvature or None) from (T, D) tensors."""
    vv = (v * v).sum(dim=1)
    length = float(vv.sqrt().sum())
    if a is None:
        return length, None
    cross = (vv * (a * a).sum(dim=1) - (v * a).sum(dim=1) ** 2).clamp_min(0.0)
    return length, float((cross.sqrt() / vv.pow(1.5)).mean())


class ExplicitLayerNorm(nn.Module):
    """A LayerNorm written out from its parameters: PyTorch's fused layer_norm gives wrong second
    derivatives under nested forward-mode AD (jvp of jvp), this form gives the right ones."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = getattr(self.norm, "active_weight", lambda: (self.norm.weight, self.norm.bias))()
        x = x - x.mean(dim=-1, keepdim=True)
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.norm.eps)
        return x * weight[0] + weight[1]


@contextlib.contextmanager
def proxy_output(model: nn.Module, output: str, norm: str, explicit_norm: bool = False) -> Iterator[nn.Module]:
    """`model` with, for the duration, every LayerNorm replaced by the identity (`norm=identity`)
    and, for `output=features`, its final `norm` and `head` too (pooled feature before the norm);
    kept LayerNorms are written out when `explicit_norm` (for nested jvp). Models without
    `norm`/`head` (plain test networks) give their own output."""
    swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if (norm == "identity" and isinstance(child, nn.LayerNorm)) or (
                    output == "features" and parent is model and name in ("norm", "head")):
                swaps.append((parent, name, child, nn.Identity()))
            elif explicit_norm and isinstance(child, nn.LayerNorm):
                swaps.append((parent, name, child, ExplicitLayerNorm(child)))
    for parent, name, _, new in swaps:
        setattr(parent, name, new)
    try:
        yield model
    finally:
        for parent, name, child, _ in swaps:
            setattr(parent, name, child)


@contextlib.contextmanager
def _precision(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """`model` cast to `dtype` for the duration (float32 -> float64 -> float32 is exact)."""
    old = next(model.parameters()).dtype
    model.to(dtype)
    try:
        yield
    finally:
        model.to(old)


def length_distortion(model: nn.Module, input_shape: Sequence[int], seed: int, cfg: ProxyConfig,
                      curvature: bool = True, dtype: Optional[torch.dtype] = None
                      ) -> tuple[float, Optional[float]]:
    """(L^E, mean curvature or None) of `model` as it is, on the circle of `seed`. Runs in `dtype`:
    by default float32 for L^E alone, float64 with curvature (float32 second differences lose it)."""
    dtype = dtype or (torch.float64 if curvature else torch.float32)
    device = next(model.parameters()).device
    u0, u1 = (u.to(device) for u in circle_basis(input_shape, seed, dtype))
    r = circle_radius(input_shape, cfg.radius)
    with _precision(model, dtype), proxy_output(model, cfg.output, cfg.norm, cfg.velocity == "jvp") as net:
        v, a = circle_derivatives(net, u0, u1, r, circle_thetas(cfg.thetas), cfg.velocity, curvature)
    return curve_complexity(v, a)


# ------------------------------------------------------------------------------- the NTK
def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.endswith("weight")}


def ntk_gradients(model: nn.Module, images: torch.Tensor, method: str = "vmap") -> list[torch.Tensor]:
    """Per-sample gradients of the summed outputs w.r.t. the weights: one (B, numel) per weight.

    `vmap`: torch.func's vmap(grad) over one batched functional call; `loop`: one forward and
    backward pass per image.
    """
    weights = _weights(model)
    if method == "loop":
        rows = [torch.autograd.grad(model(x[None]).sum(), list(weights.values())) for x in images]
        return [torch.stack([r[i].reshape(-1) for r in rows]) for i in range(len(weights))]
    if method != "vmap":
        raise ValueError(f"unknown NTK method {method!r}")
    rest = {n: p.detach() for n, p in model.named_parameters() if n not in weights}
    rest.update(dict(model.named_buffers()))
    detached = {n: p.detach() for n, p in weights.items()}

    def summed(w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, (w, rest), (x[None],)).sum()

    with sdpa_kernel(SDPBackend.MATH):
        grads = vmap(grad(summed), in_dims=(None, 0))(detached, images)
    return [g.reshape(g.shape[0], -1) for g in grads.values()]


def ntk_spectrum(model: nn.Module, images: torch.Tensor, method: str = "vmap") -> torch.Tensor:
    """Ascending float64 eigenvalues of the empirical NTK Theta = G G^T on `images`."""
    theta = torch.zeros(len(images), len(images), dtype=torch.float64, device=images.device)
    for g in ntk_gradients(model, images, method):
        g = g.double()
        theta += g @ g.T
    return torch.linalg.eigvalsh(theta.cpu())


def ntk_condition(model: nn.Module, images: torch.Tensor, cfg: ProxyConfig) -> Optional[float]:
    """kappa of `model` as it is, differentiating its `proxy.ntk_output`: `features` (As-ViT's
    `forward_features`: the pooled features before the final norm; other norms kept) or `logits`."""
    with proxy_output(model, cfg.ntk_output, "keep") as net:
        return condition_number(ntk_spectrum(net, images, cfg.ntk_method))


def finite_mean(values: Sequence[Optional[float]]) -> Optional[float]:
    """Mean of `values`, or None when any is None or not finite (an invalid init is never averaged in)."""
    if not values or any(v is None or not math.isfinite(v) for v in values):
        return None
    mean = sum(values) / len(values)
    return mean if math.isfinite(mean) else None


def condition_number(eigenvalues: torch.Tensor) -> Optional[float]:
    """lambda_max / lambda_min, or None when it is not finite or lambda_min <= 0 (invalid)."""
    lo, hi = float(eigenvalues[0]), float(eigenvalues[-1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0.0:
        return None
    kappa = hi / lo
    return kappa if math.isfinite(kappa) else None


# ------------------------------------------------------------------------------- scores
def proxy_batch(cfg: Config, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels): `proxy.ntk_images` real training images of `data.root` (eval transform,
    no augmentation) and their classes, drawn with `proxy.seed` from train/ outside the hold-out
    split. Every proxy of every architecture uses this one batch (the loss-based ones the labels)."""
    dataset = build_dataset(cfg.data, "train", cfg.space.img_size, is_training=False)
    train, _ = split_train_holdout(dataset, cfg.data.holdout_per_class, cfg.data.split_seed)
    if len(train) < cfg.proxy.ntk_images:
        raise UserError(f"proxy.ntk_images={cfg.proxy.ntk_images} but data.root has {len(train)} training images")
    picks = np.random.default_rng(cfg.proxy.seed).choice(train, cfg.proxy.ntk_images, replace=False)
    items = [dataset[int(i)] for i in sorted(picks)]
    images = torch.stack([x for x, _ in items]).to(device)
    return images, torch.tensor([int(y) for _, y in items], device=device)


def ntk_batch(cfg: Config, device: torch.device | str = "cpu") -> torch.Tensor:
    """The images of `proxy_batch` (the NTK and L^E need no labels)."""
    return proxy_batch(cfg, device)[0]


def proxy_superformer(cfg: Config, device: torch.device | str = "cpu") -> Superformer:
    """A fresh (untrained) superformer of `cfg.space` whose subnets the proxies score."""
    return Superformer(space_from_config(cfg), num_classes(cfg.data)).to(device).eval()


def initialised(model: nn.Module, arch: Optional[dict], seed: int) -> nn.Module:
    """`model` at init `seed`: a Superformer with `arch` active and the tensors it uses re-drawn
    (its slices, taken inside forward, are the arch's weights), or, with `arch` None, any model
    re-drawn whole. Returned in eval mode."""
    if arch is None:
        reinit(model, seed)
        return model.eval()
    model.set_active(arch)
    used = {id(p) for p in model.active_parameters()}
    reinit(model, seed, {n for n, p in model.named_parameters() if id(p) in used})
    return model.eval()


def extracted(model: nn.Module, arch: Optional[dict]) -> nn.Module:
    """The arch's own weights as a StaticViT (for the NTK: gradients of just the weights used),
    or `model` itself when `arch` is None."""
    if arch is None:
        return model
    with torch.random.fork_rng(devices=[]):  # StaticViT's constructor draws an init it discards
        return model.extract(arch).eval()


def proxy_scores_many(model: nn.Module, archs: Sequence[Optional[dict]], images: torch.Tensor,
                      cfg: ProxyConfig, curvature: bool = True) -> list[dict]:
    """Proxies of each arch of a Superformer (see `initialised`), or of `model` itself for `None`.

    Init k uses seed `proxy.seed + k` for the weights and the circle; L^E runs on the activated
    superformer, the NTK on the arch extracted as a StaticViT, at every init (`proxy.ntk_average`,
    As-ViT) or the first. Each record: {"length_distortion", "ntk_condition", "curvature",
    "valid"}; a value that is not finite (or kappa with lambda_min <= 0 at any init) is None and
    makes the record invalid: an invalid init is never averaged in as a number. Curvature is None
    unless asked.
    """
    check_proxy_config(cfg)
    if len(images) < 2:
        raise UserError(f"the NTK needs at least 2 images, got {len(images)}")
    records = []
    for arch in archs:
        lengths, curvs, kappas = [], [], []
        for k in range(cfg.inits):
            net = initialised(model, arch, cfg.seed + k)
            if k == 0 or cfg.ntk_average:
                kappas.append(ntk_condition(extracted(net, arch), images, cfg))
            length, curv = length_distortion(net, images.shape[1:], cfg.seed + k, cfg, curvature)
            lengths.append(length)
            curvs.append(curv)
        rec = {"length_distortion": sum(lengths) / len(lengths), "ntk_condition": finite_mean(kappas),
               "curvature": sum(curvs) / len(curvs) if curvature else None}
        for key in FIELDS:
            if rec[key] is not None and not math.isfinite(rec[key]):
                rec[key] = None
        rec["valid"] = all(rec[key] is not None for key in FIELDS[: 3 if curvature else 2])
        records.append(rec)
    return records


def proxy_scores(model: nn.Module, arch: Optional[dict], images: torch.Tensor, cfg: ProxyConfig,
                 curvature: bool = True) -> dict:
    """Proxies of one arch of a Superformer, or of `model` itself when `arch` is None."""
    return proxy_scores_many(model, [arch], images, cfg, curvature)[0]
