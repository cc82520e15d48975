"""Experiment configuration: a typed schema with defaults, YAML loading, dotted overrides.

One YAML per experiment with the sections below. Unknown keys and wrong types are `UserError`s
that name the key (and the nearest valid key for a misspelling). YAML is read with `safe_load` only.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import yaml

from vitas.core.checkpoint import atomic_write
from vitas.core.errors import UserError


def choice(default: str, *allowed: str) -> Any:
    """A string field that must be one of `allowed` (checked when the config loads)."""
    return field(default=default, metadata={"choices": tuple(allowed)})


def at_least(default: Any, low: int | float) -> Any:
    """A number field that must be >= `low` (checked when the config loads)."""
    return field(default=default, metadata={"min": low})


def above(default: Any, low: int | float) -> Any:
    """A finite number field that must be > `low`."""
    return field(default=default, metadata={"min": low, "min_open": True})


def within(default: Any, low: int | float, high: int | float, high_open: bool = False) -> Any:
    """A number field in [low, high] (or [low, high) with `high_open`)."""
    return field(default=default, metadata={"min": low, "max": high, "max_open": high_open})


def _rule(meta: Mapping[str, Any], optional: bool, number: bool) -> str:
    """A field's rule in words, as error messages state it (`number`: a float field)."""
    low, high = meta.get("min"), meta.get("max")
    if high is not None:
        text = f"in [{low}, {high}{')' if meta.get('max_open') else ']'}"
    elif meta.get("min_open"):
        text = f"a number > {low}"
    else:
        text = f"a number >= {low}" if number else f">= {low}"
    return f"null or {text}" if optional else text


def _breaks(meta: Mapping[str, Any], value: Any) -> bool:
    """Whether a number breaks its field's bounds (a bounded number must also be finite)."""
    low, high = meta.get("min"), meta.get("max")
    if isinstance(value, float) and not math.isfinite(value):
        return True
    if low is not None and (value <= low if meta.get("min_open") else value < low):
        return True
    return high is not None and (value >= high if meta.get("max_open") else value > high)


def allowed_values(section: type, key: str) -> tuple[str, ...]:
    """The allowed values of a `choice` field, e.g. `allowed_values(SearchConfig, "algorithm")`."""
    return section.__dataclass_fields__[key].metadata["choices"]


# Keys that moved: the old dotted name answers with the new one.
MOVED = {
    "search.checkpoint": "supernet.checkpoint",
    "search.proxy_combine": "proxy.combine",
    "search.proxy_weights": "proxy.weights",
    "proxy.rank_archs": "rank.archs",
    "proxy.ground_truth_epochs": "rank.ground_truth_epochs",
    "proxy.scaling_param_limit": "scale.param_limit",
    "proxy.scaling_seed_arch": "scale.seed_arch",
}

POLICIES = ("left", "bilateral", "cyclic")


@dataclass
class ChannelsConfig:
    """Channel policy (`left`, `bilateral`, `cyclic`) per elastic dimension."""

    embed: str = choice("left", *POLICIES)
    attn: str = choice("left", *POLICIES)
    mlp: str = choice("left", *POLICIES)

    @property
    def bilateral(self) -> bool:
        """Whether any dimension uses the bilateral (BCNet) policy, i.e. a right pass exists."""
        return "bilateral" in (self.embed, self.attn, self.mlp)


@dataclass
class AsVitSpaceConfig:
    """As-ViT's hierarchical topology space (its Table 1), read when `space.kind: asvit`.

    `kernel`, `split`, `expansion` and `depth` hold one list of choices per stage (4 stages);
    `num_heads` the last stage's head count, `embed_dim` the first stage's width C (docs/ASVIT.md).
    """

    kernel: list[list[int]] = field(default_factory=lambda: [[4, 5, 6, 7, 8], [2, 3, 4], [2, 3, 4], [2, 3, 4]])
    split: list[list[int]] = field(default_factory=lambda: [[2, 4, 8], [1, 2, 4], [1, 2], [1]])
    expansion: list[list[int]] = field(default_factory=lambda: [[2, 3, 4, 5, 6], [2, 3, 4, 5, 6],
                                                                 [2, 3, 4, 5, 6], [2, 3, 4, 5, 6]])
    depth: list[list[int]] = field(default_factory=lambda: [[1], [1], [1], [1]])
    num_heads: list[int] = field(default_factory=lambda: [16, 32, 64])
    embed_dim: list[int] = field(default_factory=lambda: [32])
    width_cap: int = at_least(1024, 1)  # no stage wider (As-ViT's code)
    pre_logits: bool = True  # linear + tanh before the classifier (As-ViT's code)


@dataclass
class SpaceConfig:
    """A search space: the choices of every architecture field and the superformer's sizes.

    Per-layer fields (`num_heads`, `attn_dim`/`head_dim`, `mlp_dim`/`mlp_ratio`) offer the same
    choices in every layer. `super_*` default to the largest choice.
    """

    name: str = "custom"
    kind: str = choice("vit", "vit", "asvit")  # flat ViT (the fields below) or As-ViT (`asvit`)
    asvit: AsVitSpaceConfig = field(default_factory=AsVitSpaceConfig)
    img_size: int = at_least(224, 1)
    in_chans: int = at_least(3, 1)
    patch_size: list[int] = field(default_factory=lambda: [16])
    embed_dim: list[int] = field(default_factory=lambda: [192])
    depth: list[int] = field(default_factory=lambda: [12])
    num_heads: list[int] = field(default_factory=lambda: [3])
    head_dim: Optional[int] = None
    attn_dim: Optional[list[int]] = None
    mlp_ratio: Optional[list[float]] = None
    mlp_dim: Optional[list[int]] = None
    identity: bool = False
    super_embed_dim: Optional[int] = None
    super_depth: Optional[int] = None
    super_attn_dim: Optional[int] = None
    super_mlp_dim: Optional[int] = None
    qk: str = choice("entangled", "entangled", "private")
    rel_pos: bool = False
    rel_pos_max: int = at_least(14, 1)
    pool: str = choice("cls", "cls", "mean")
    qkv_bias: bool = True
    # How a narrower attention slices an entangled qkv bias: `groups` takes the first channels of
    # each of q, k and v; `prefix` takes bias[:3a] as AutoFormer does (left attention only).
    qkv_bias_slice: str = choice("groups", "groups", "prefix")
    norm_eps: Optional[float] = None  # LayerNorm eps; None: timm's 1e-6 (AutoFormer's spaces: torch's 1e-5)
    # The superformer's LayerNorms: one shared by every patch size, or one per patch size (the
    # switchable norms of slimmable networks), since each token grid trains its own statistics.
    norms: str = choice("shared", "shared", "per_patch")
    # The transformer blocks: shared by every patch size (DESIGN 3), or one stack per patch size
    # (few-shot NAS split on the patch size: the token grids stop sharing weights but the head).
    blocks: str = choice("shared", "shared", "per_patch")
    channels: ChannelsConfig = field(default_factory=ChannelsConfig)


@dataclass
class DataConfig:
    """Folder data set (`root/train/<class>/`, `root/val/<class>/`) and timm's augmentation."""

    root: str = ""
    num_classes: Optional[int] = at_least(None, 1)
    holdout_per_class: int = at_least(10, 0)
    split_seed: int = at_least(0, 0)
    workers: int = at_least(2, 0)
    broken_images: str = choice("error", "error", "skip")  # skip: leave out and count them
    # timm's interpolations; its 'random' (train only) would fail in the eval transform
    interpolation: str = choice("bicubic", "nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    crop_pct: float = above(0.875, 0)
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    hflip: float = within(0.5, 0, 1)
    color_jitter: float = at_least(0.4, 0)
    # DeiT's RandAugment with magnitudes capped at 9: at 10, timm's increasing posterize keeps
    # 0 bits, which Pillow >= 13 rejects in the middle of a run.
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1-mmax9"
    reprob: float = within(0.25, 0, 1)
    mixup: float = at_least(0.8, 0)
    cutmix: float = at_least(1.0, 0)
    mixup_prob: float = within(1.0, 0, 1)
    mixup_switch_prob: float = within(0.5, 0, 1)
    smoothing: float = within(0.1, 0, 1, high_open=True)


@dataclass
class TrainingRecipe:
    """The optimisation settings that supernet training and retraining share (timm's factories)."""

    epochs: int = at_least(100, 1)
    batch_size: int = at_least(128, 1)
    opt: str = "adamw"
    lr: float = above(5e-4, 0)
    min_lr: float = at_least(1e-5, 0)
    warmup_lr: float = at_least(1e-6, 0)
    warmup_epochs: int = at_least(5, 0)
    weight_decay: float = at_least(0.05, 0)
    clip_grad: Optional[float] = at_least(None, 0)
    drop_path: float = within(0.1, 0, 1, high_open=True)
    ema: bool = False
    ema_decay: float = within(0.99996, 0, 1, high_open=True)
    amp: bool = True
    save_every_steps: int = at_least(0, 0)
    log_every_steps: int = at_least(20, 0)
    seed: int = at_least(0, 0)
    deterministic: bool = False


@dataclass
class SupernetConfig(TrainingRecipe):
    """Superformer training (`vitas train-supernet`), and which superformer later stages use.

    `batch_size` is the global batch per step. `checkpoint` and `weights` say which file and which
    of its weights search, rank and `retrain.init=supernet` read (one policy for all of them).
    """

    clip_grad: Optional[float] = at_least(5.0, 0)
    sampling: str = choice("uniform", "uniform", "autoslim", "bcnet", "sandwich")
    random_subnets: int = at_least(1, 1)  # random subnets per step (BigNAS's sandwich: max, min and 2)
    distill: bool = False  # in-place distillation from the max subnet (added as a pass if needed)
    distill_loss: str = choice("kl", "kl", "alpha")  # soft cross-entropy, or AlphaNet's bounded alpha-divergence
    cost_sampling: str = choice("genes", "genes", "macs_bins")  # macs_bins: ElasticViT's complexity-aware draws
    cost_bins: int = at_least(8, 1)
    grad_projection: bool = False  # NASViT: project the others' gradient off a conflict with the max subnet's
    max_warmup_epochs: int = at_least(0, 0)  # first epochs train the max subnet alone
    # The max and min passes take the patch sizes in turn, step by step (each token grid gets its
    # own largest and smallest subnet); off, the max subnet always has the smallest patch.
    patch_cycle: bool = False
    # ViTAS's identity shifting: identity layers sit after the blocks, so an architecture of
    # depth d always trains blocks 0..d-1. false: each pass runs its d layers on d blocks drawn
    # anywhere in the stack (where identity encodings would put them); scoring keeps blocks 0..d-1.
    identity_shift: bool = True
    # Once-for-All's progressive shrinking: each item (an arch field, or fields joined by '+')
    # stays at the max subnet's value until its turn; the items unlock in order, evenly over
    # `progressive_epochs` after the max warm-up (default: half the epochs left after it).
    progressive: list[str] = field(default_factory=list)
    progressive_epochs: Optional[int] = at_least(None, 1)
    val_random_archs: int = at_least(3, 0)
    checkpoint: Optional[str] = None  # default: <output_dir>/supernet/last.pth
    weights: str = choice("auto", "auto", "ema", "raw")  # auto: EMA when the checkpoint has it
    init: Optional[str] = None  # timm/DeiT weights to start from (supernet.pretrained.init_from_timm)


@dataclass
class SearchConfig:
    """Architecture search (`vitas search`): evolution (`ga`, `nsga2`) or `rl`, over a scorer."""

    algorithm: str = choice("ga", "ga", "nsga2", "rl", "random")
    scorer: str = choice("accuracy", "accuracy", "proxy")
    population: int = at_least(50, 2)
    generations: int = at_least(20, 0)
    steps: int = at_least(500, 1)
    constraint: str = choice("macs", "macs", "params", "latency")  # NSGA-II's cost axis, the plot's x axis
    macs_min: Optional[int] = None
    macs_max: Optional[int] = None
    params_min: Optional[int] = None
    params_max: Optional[int] = None
    latency_min: Optional[float] = at_least(None, 0)  # ms per batch, predicted by the latency model
    latency_max: Optional[float] = at_least(None, 0)  # (docs/LATENCY.md "Search with it")
    mutation_prob: float = 0.1
    crossover_prob: float = 0.9
    top_k: int = at_least(10, 1)
    rl_lr: float = 0.08
    rl_baseline_momentum: float = 0.9
    rl_window: int = at_least(20, 2)
    batch_size: int = at_least(256, 1)
    array_jobs: int = at_least(0, 0)
    seed: int = at_least(0, 0)
    # accuracy scorer: fine-tune a copy of each subnet this many steps before scoring it (0: the
    # inherited weights as they are; search/scoring/finetune.py)
    finetune_steps: int = at_least(0, 0)
    finetune_lr: float = above(5e-4, 0)
    finetune_batch_size: int = at_least(64, 1)


@dataclass
class ProxyConfig:
    """Training-free proxies (As-ViT): length distortion, NTK condition number, curvature."""

    radius: str = "unit"
    output: str = "features"
    norm: str = "identity"
    thetas: int = 10
    inits: int = 5
    ntk_images: int = 16
    velocity: str = "fd"
    ntk_method: str = "vmap"
    ntk_output: str = choice("features", "features", "logits")  # As-ViT: pooled features before the final norm
    ntk_average: bool = True  # kappa averaged over the `inits` initialisations (As-ViT), else the first only
    zico_batches: int = at_least(2, 2)  # ZiCo: the proxy images split into this many equal batches
    seed: int = at_least(0, 0)
    names: list[str] = field(default_factory=lambda: ["length_distortion", "ntk_condition"])  # proxies search uses
    combine: str = choice("rank_sum", "rank_sum", "weighted", "ensemble")  # how search ranks by the proxies
    weights: list[float] = field(default_factory=lambda: [1.0, 1.0])  # one per name (rank_sum, weighted)
    ensemble: Optional[str] = None  # combine=ensemble: a fitted ensemble's JSON (search.proxies.ensemble)


@dataclass
class RankConfig:
    """The ranking study (`vitas rank`): scores against trained ground truth."""

    archs: int = at_least(20, 2)  # architectures sampled evenly over the MACs range
    ground_truth: Optional[str] = None  # a table of architectures and accuracies (CSV/JSON)
    targets: list[str] = field(default_factory=list)  # its accuracy columns to rank (all: [])
    ground_truth_epochs: int = at_least(0, 0)  # train each from scratch for E epochs (0: none)
    ground_truth_seeds: int = at_least(1, 1)  # ... with S seeds, the target being their mean
    proxies: list[str] = field(default_factory=lambda: ["length_distortion", "ntk_condition", "curvature"])
    inherited: bool = True  # score inherited accuracy when a superformer checkpoint exists
    bands: int = at_least(4, 1)  # equal-count MACs bands for the within-budget correlations
    top_k: int = at_least(5, 1)  # top-k overlap
    bootstrap: int = at_least(2000, 100)  # bootstrap resamples of the 95% intervals


@dataclass
class ScaleConfig:
    """Training-free auto-scaling (`vitas scale`, As-ViT Algorithm 2)."""

    param_limit: int = at_least(100_000_000, 1)
    seed_arch: Optional[str] = None  # the seed topology: arch.json or inline JSON


@dataclass
class RetrainConfig(TrainingRecipe):
    """Training the chosen architecture from scratch or from superformer weights."""

    epochs: int = at_least(300, 1)
    ema: bool = True
    arch: Optional[str] = None
    init: str = choice("scratch", "scratch", "supernet")
    retokenize: list[list[int]] = field(default_factory=list)


@dataclass
class InferenceConfig:
    """Evaluation and prediction of a trained checkpoint."""

    checkpoint: Optional[str] = None
    sha256: Optional[str] = None
    cache_dir: Optional[str] = None
    batch_size: int = at_least(256, 1)
    split: str = "val"  # the folder of data.root to evaluate on
    arch: Optional[str] = None  # a foreign checkpoint's architecture, where the file does not say
    heads: Optional[int] = None  # a foreign checkpoint's head count, where the file does not say
    ema: bool = False  # evaluate the checkpoint's EMA weights instead of its raw ones


@dataclass
class LatencyConfig:
    """Latency on a deployment setting (`vitas latency`): how to measure, and the latency model.

    A latency model holds for one setting (device, batch_size, precision, threads, backend,
    clock); loading it under another is refused. `clock: cpu` times process CPU time instead of
    wall time: steadier on a shared machine, valid only on the CPU with one thread.
    """

    device: str = choice("cpu", "cpu", "cuda")
    batch_size: int = at_least(1, 1)
    precision: str = choice("fp32", "fp32", "bf16", "fp16")
    threads: int = at_least(1, 1)  # torch intra-op threads on the CPU (onnxruntime's too)
    backend: str = choice("eager", "eager", "compile", "onnx")
    clock: str = choice("wall", "wall", "cpu")
    warmup: int = at_least(5, 0)  # untimed calls before each round's timed ones
    repeats: int = at_least(10, 1)  # timed calls per round
    rounds: int = at_least(5, 1)  # rounds; a build times all its models in turn in each
    predictor: str = choice("lut", "lut", "regression")
    samples: int = at_least(40, 2)  # architectures measured end to end to fit the predictor
    holdout: int = at_least(10, 0)  # further ones measured only to report its error
    seed: int = at_least(0, 0)
    model: Optional[str] = None  # default: <output_dir>/latency/latency.json


@dataclass
class LaunchConfig:
    """How `vitas submit` runs a stage: Slurm through submitit, or submitit's local executor."""

    executor: str = choice("auto", "auto", "slurm", "local")
    nodes: int = at_least(1, 1)
    tasks_per_node: int = at_least(1, 1)
    gpus_per_node: int = at_least(0, 0)
    cpus_per_task: int = at_least(1, 1)
    mem_gb: Optional[int] = at_least(None, 1)  # null: the cluster's default
    partition: Optional[str] = None
    timeout_min: int = at_least(60, 1)
    job_name: str = "vitas"
    array_parallelism: int = at_least(8, 1)
    max_requeue: int = at_least(3, 0)


@dataclass
class Config:
    """The whole experiment."""

    output_dir: str = "runs/default"
    space: SpaceConfig = field(default_factory=SpaceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    supernet: SupernetConfig = field(default_factory=SupernetConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    rank: RankConfig = field(default_factory=RankConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)

    def to_dict(self) -> dict:
        """Plain nested dict (JSON/YAML-able, and safe in a `weights_only` checkpoint)."""
        return dataclasses.asdict(self)

    def stage_dir(self, stage: str) -> Path:
        """`<output_dir>/<stage>`, the folder a stage writes into."""
        return Path(self.output_dir) / stage


# (field, rule in words, test): a value range check of a section, beyond its type.
FieldRule = tuple[str, str, Callable[[Any], bool]]


def check_fields(section: Any, rules: Sequence[FieldRule], prefix: str) -> None:
    """UserError naming `<prefix>.<field>` and its rule for the first value that breaks one."""
    for key, rule, ok in rules:
        value = getattr(section, key)
        if not ok(value):
            raise UserError(f"{prefix}.{key} must be {rule}, got {value!r}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _number(value: Any) -> Any:
    """PyYAML reads `1e-3` and `1.3e9` (no dot or sign) as strings: take them as numbers."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; int widens to float. Raises UserError."""
    origin = typing.get_origin(tp)
    if tp in (int, float):
        value = _number(value)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except UserError:
                continue
        raise UserError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item_tp,) = typing.get_args(tp)
            return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, key)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 1.3e9 is a float to YAML; a whole number is a fine int
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `output_dir=2024` means the folder "2024", not a type error
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    raise UserError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def _unknown(key: str, prefix: str, valid: list[str]) -> UserError:
    full = f"{prefix}.{key}" if prefix else key
    if full in MOVED:
        return UserError(f"config key '{full}' has moved: use '{MOVED[full]}'")
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" (did you mean '{prefix + '.' if prefix else ''}{near[0]}'?)" if near else ""
    return UserError(f"unknown config key '{full}'{hint}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise _unknown(str(key), prefix, names)
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}" if prefix else key)
        _check_allowed(cls.__dataclass_fields__[key], kwargs[key], f"{prefix}.{key}" if prefix else key)
    return cls(**kwargs)


def _check_allowed(f: dataclasses.Field, value: Any, key: str) -> None:
    """The field's `choice`/`at_least` rule, as a UserError naming the key and what is allowed."""
    allowed = f.metadata.get("choices")
    if allowed is not None and value not in allowed:
        near = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.6)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise UserError(f"{key} must be one of {', '.join(allowed)}, got {value!r}{hint}")
    if value is not None and f.metadata.get("min", f.metadata.get("max")) is not None and _breaks(f.metadata, value):
        optional = "Optional" in str(f.type)
        raise UserError(f"{key} must be {_rule(f.metadata, optional, 'float' in str(f.type))}, got {value!r}")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"config key '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`['search.population=30', ...]` -> `[('search.population', 30), ...]` (values as YAML)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override '{item}' is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise UserError(f"override '{item}': value is not valid YAML ({exc.problem})") from None
        parsed.append((key.strip(), value))
    return parsed


def refuse_duplicate_keys(text: str, name: str) -> None:
    """A UserError for a key given twice in one mapping, at any level (`yaml.safe_load` would
    silently keep the last one). Works on the composed node tree: nothing is constructed."""
    loader = yaml.SafeLoader(text)
    loader.name = name  # syntax errors name the file
    try:
        root = loader.get_single_node()
    finally:
        loader.dispose()
    stack, visited = [root], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:  # aliases share nodes
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            lines: dict[tuple, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    line = key.start_mark.line + 1
                    if (key.tag, key.value) in lines:
                        raise UserError(f"{name}: key '{key.value}' is given twice (lines "
                                        f"{lines[key.tag, key.value]} and {line}); the second would "
                                        f"silently win")
                    lines[key.tag, key.value] = line
                stack += [value, key]
        elif isinstance(node, yaml.SequenceNode):
            stack += node.value


def safe_load(text: str, name: str = "<string>") -> Any:
    """`yaml.safe_load` of `text`, refusing duplicated keys first."""
    refuse_duplicate_keys(text, name)
    return yaml.safe_load(text)


def read_yaml(path: str | os.PathLike) -> Any:
    """The YAML file at `path` read safely, with missing files, syntax errors and duplicated keys
    as UserErrors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        return safe_load(path.read_text(encoding="utf-8"), str(path))
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text") from None


def config_from_dict(tree: dict) -> Config:
    """Validate a nested dict against the schema (used for YAML files and checkpoints)."""
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise UserError("config must be a mapping of sections")
    cfg = _build(Config, tree)
    _check_relations(cfg)
    return cfg


def _check_relations(cfg: Config) -> None:
    """Value relations between fields, checked when the config loads."""
    for name in ("supernet", "retrain"):
        sec = getattr(cfg, name)
        if 0 < sec.lr < float("inf") and sec.min_lr > sec.lr:  # bad values: the stage's rules
            raise UserError(f"{name}.min_lr {sec.min_lr} is larger than {name}.lr {sec.lr}: the "
                            "cosine schedule would raise the learning rate")
    for name in ("macs", "params"):
        lo, hi = getattr(cfg.search, f"{name}_min"), getattr(cfg.search, f"{name}_max")
        if lo is not None and hi is not None and lo > hi:
            raise UserError(f"search.{name}_min {lo} is larger than search.{name}_max {hi}")


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = (),
                values: Sequence[tuple[str, Any]] = ()) -> Config:
    """Load a YAML experiment (or only defaults when `path` is None), then set `values` (dotted
    key, value taken as it is: a command-line option's string), then apply `overrides`
    (`key=value`, the value read as YAML).

    `output_dir` becomes absolute so that Slurm jobs started elsewhere write to the same place.
    """
    tree = read_yaml(path) if path is not None else {}
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise UserError(f"config file {path} must hold a mapping of sections")
    for key, value in [*values, *parse_overrides(list(overrides))]:
        _set_dotted(tree, key, value)
    cfg = config_from_dict(tree)
    cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write(path, lambda f: yaml.safe_dump(cfg.to_dict(), f, sort_keys=False), mode="w")


def _require(path: str, key: str, kind: str) -> Path:
    if not path:
        raise UserError(f"config key '{key}' is not set")
    p = Path(path).expanduser()
    if not (p.is_dir() if kind == "directory" else p.is_file()):
        raise UserError(f"{key}: {kind} not found: {p}")
    return p


def require_dir(path: str, key: str) -> Path:
    """A folder the config names must exist: UserError naming the key otherwise."""
    return _require(path, key, "directory")


def require_file(path: str, key: str) -> Path:
    """A file the config names must exist: UserError naming the key otherwise."""
    return _require(path, key, "file")
