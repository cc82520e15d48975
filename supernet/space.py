"""Search spaces: validation, canonical form, sampling and the integer genome used by search.

An architecture is the flat dict of DESIGN 2. An *encoding* may also carry
`"identity": [bool, ...]` with per-layer lists of that length; `canonical` shifts the identities
to the end (drops those layers, keeps the order of the others), so that each architecture has
exactly one form, one path through the superformer and one set of weights.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from vitas.core.checkpoint import check_space
from vitas.core.config import SpaceConfig
from vitas.core.errors import UserError
from vitas.supernet.complexity import arch_cost

LAYER_FIELDS = ("num_heads", "attn_dim", "mlp_dim")
ARCH_FIELDS = ("patch_size", "embed_dim", "depth") + LAYER_FIELDS


def load_arch(source: str, what: str = "--arch") -> Any:
    """An architecture from a JSON file or an inline JSON object (`what` names the source in
    errors); a result record `{"arch": {...}, ...}` gives its "arch". Not validated here."""
    if source.lstrip().startswith("{"):
        text, where = source, what
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"{what}: architecture file not found: {path}")
        text, where = path.read_text(), f"{what} file {path}"
    try:
        arch = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where} is not valid JSON: {exc}") from None
    if isinstance(arch, dict) and isinstance(arch.get("arch"), dict):
        arch = arch["arch"]
    return arch


def _pick(rng: Any, seq: Sequence) -> Any:
    """Uniform choice with either a `random.Random` or a NumPy `Generator`."""
    if isinstance(rng, np.random.Generator):
        return seq[int(rng.integers(len(seq)))]
    return seq[rng.randrange(len(seq))]


def _nearest(value: int, allowed: Sequence[int]) -> int:
    return min(allowed, key=lambda a: (abs(a - value), a))


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


class SearchSpace:
    """The choices of every architecture field and the superformer's maximum sizes."""

    def __init__(self, cfg: SpaceConfig):
        self.cfg = cfg
        self._check_config()
        self.patch_sizes = sorted(cfg.patch_size)
        self.embed_choices = sorted(cfg.embed_dim)
        self.depth_choices = sorted(cfg.depth)
        self.head_choices = sorted(cfg.num_heads)
        self.mlp_ratios = sorted(cfg.mlp_ratio) if cfg.mlp_ratio else None
        self.attn_choices = (
            sorted({h * cfg.head_dim for h in self.head_choices}) if cfg.head_dim else sorted(cfg.attn_dim)
        )
        if self.mlp_ratios:
            self.mlp_choices = sorted({self._ratio_width(r, e) for r in self.mlp_ratios for e in self.embed_choices})
        else:
            self.mlp_choices = sorted(cfg.mlp_dim)
        self.super_embed_dim = cfg.super_embed_dim or self.embed_choices[-1]
        self.super_depth = cfg.super_depth or self.depth_choices[-1]
        self.super_attn_dim = cfg.super_attn_dim or self.attn_choices[-1]
        self.super_mlp_dim = cfg.super_mlp_dim or self.mlp_choices[-1]
        self._check_sizes()
        self._attn_for_heads = {h: self._allowed_attn(h) for h in self.head_choices}
        self._genes = self._gene_layout()
        self.n_var = len(self._genes)
        self.xl = np.zeros(self.n_var, dtype=np.int64)
        self.xu = np.array([n - 1 for _, n in self._genes], dtype=np.int64)

    # ----------------------------------------------------------------- space checks
    def _check_config(self) -> None:
        c = self.cfg
        for name in ("patch_size", "embed_dim", "depth", "num_heads"):
            values = getattr(c, name)
            if not values or any(v <= 0 for v in values):
                raise UserError(f"space.{name} must be a non-empty list of positive integers")
        if (c.head_dim is None) == (c.attn_dim is None):
            raise UserError("space: set exactly one of 'head_dim' (fixed) and 'attn_dim' (choices)")
        if (c.mlp_ratio is None) == (c.mlp_dim is None):
            raise UserError("space: set exactly one of 'mlp_ratio' and 'mlp_dim'")
        for p in c.patch_size:
            if c.img_size % p:
                raise UserError(f"space.patch_size {p} does not divide space.img_size {c.img_size}")
        if c.qkv_bias_slice == "prefix" and (c.qk != "entangled" or c.channels.attn != "left"):
            raise UserError("space.qkv_bias_slice=prefix needs entangled q/k (space.qk) and the "
                            "'left' policy on space.channels.attn (it is AutoFormer's slicing)")
        if c.rel_pos and c.head_dim is None:
            raise UserError("space.rel_pos needs a fixed space.head_dim (its tables are head_dim wide)")

    def _ratio_width(self, ratio: float, embed: int) -> int:
        width = ratio * embed
        if abs(width - round(width)) > 1e-6:
            raise UserError(f"space.mlp_ratio {ratio} x embed_dim {embed} is not a whole width")
        return int(round(width))

    def _allowed_attn(self, heads: int) -> list[int]:
        if self.cfg.head_dim:
            return [heads * self.cfg.head_dim]
        allowed = [a for a in self.attn_choices if a % heads == 0]
        if not allowed:
            raise UserError(f"space: no space.attn_dim choice is divisible by num_heads {heads}")
        return allowed

    def _check_sizes(self) -> None:
        for name, biggest, size in (
            ("embed_dim", self.embed_choices[-1], self.super_embed_dim),
            ("depth", self.depth_choices[-1], self.super_depth),
            ("attn_dim", self.attn_choices[-1], self.super_attn_dim),
            ("mlp_dim", self.mlp_choices[-1], self.super_mlp_dim),
        ):
            if size < biggest:
                raise UserError(f"space.super_{name} {size} is smaller than the largest choice {biggest}")

    # ----------------------------------------------------------------- widths
    def widths(self, dim: str) -> list[int]:
        """Sorted distinct widths a subnet may use in `dim` (`embed`, `attn` or `mlp`)."""
        return {"embed": self.embed_choices, "attn": self.attn_choices, "mlp": self.mlp_choices}[dim]

    def super_width(self, dim: str) -> int:
        """The superformer's size of `dim` (the ring size of the cyclic policy)."""
        return {"embed": self.super_embed_dim, "attn": self.super_attn_dim, "mlp": self.super_mlp_dim}[dim]

    def allowed_attn(self, heads: int) -> list[int]:
        """attn_dim values a layer with `heads` heads may take."""
        return self._attn_for_heads[heads]

    def allowed_mlp(self, embed: int) -> list[int]:
        """mlp_dim values a layer may take in an architecture of width `embed`."""
        if self.mlp_ratios:
            return [self._ratio_width(r, embed) for r in self.mlp_ratios]
        return self.mlp_choices

    # ----------------------------------------------------------------- canonical form
    def canonical(self, arch: dict) -> dict:
        """Validated canonical copy: identities shifted out, plain ints, fixed key order."""
        return self.validate(arch)

    def validate(self, arch: Any) -> dict:
        """Check `arch` against the space; UserError naming the field and allowed values."""
        if not isinstance(arch, dict):
            raise UserError(f"architecture must be a JSON object, got {type(arch).__name__}")
        unknown = set(arch) - set(ARCH_FIELDS) - {"identity"}
        if unknown:
            raise UserError(f"architecture has unknown field(s) {sorted(unknown)}; fields are {list(ARCH_FIELDS)}")
        missing = [f for f in ARCH_FIELDS if f not in arch and not (f == "depth" and "identity" in arch)]
        if missing:
            raise UserError(f"architecture is missing field(s) {missing}")
        layers = {f: arch[f] for f in LAYER_FIELDS}
        for f, values in layers.items():
            if not isinstance(values, list) or not all(_is_int(v) for v in values):
                raise UserError(f"architecture field '{f}' must be a list of integers")
        if "identity" in arch:
            layers, depth = self._shift_identities(arch, layers)
        else:
            depth = arch["depth"]
        out = {
            "patch_size": self._check_choice("patch_size", arch["patch_size"], self.patch_sizes),
            "embed_dim": self._check_choice("embed_dim", arch["embed_dim"], self.embed_choices),
            "depth": self._check_choice("depth", depth, self.depth_choices),
        }
        for f, values in layers.items():
            if len(values) != out["depth"]:
                raise UserError(f"architecture field '{f}' has {len(values)} entries, depth is {out['depth']}")
        heads = [self._check_choice(f"num_heads[{i}]", h, self.head_choices) for i, h in enumerate(layers["num_heads"])]
        attn = [
            self._check_choice(f"attn_dim[{i}]", a, self.allowed_attn(h), f" (for num_heads {h})")
            for i, (a, h) in enumerate(zip(layers["attn_dim"], heads))
        ]
        mlp_allowed = self.allowed_mlp(out["embed_dim"])
        mlp = [self._check_choice(f"mlp_dim[{i}]", m, mlp_allowed) for i, m in enumerate(layers["mlp_dim"])]
        out.update(num_heads=heads, attn_dim=attn, mlp_dim=mlp)
        return out

    def _shift_identities(self, arch: dict, layers: dict) -> tuple[dict, int]:
        if not self.cfg.identity:
            raise UserError("architecture field 'identity' is not allowed: this space has no identity layers")
        identity = arch["identity"]
        if not isinstance(identity, list) or not all(isinstance(v, (bool, int)) for v in identity):
            raise UserError("architecture field 'identity' must be a list of booleans")
        if len(identity) > self.super_depth:
            raise UserError(f"architecture field 'identity' has {len(identity)} entries, the space has {self.super_depth} layers")
        for f, values in layers.items():
            if len(values) != len(identity):
                raise UserError(f"architecture field '{f}' has {len(values)} entries, 'identity' has {len(identity)}")
        keep = [i for i, skip in enumerate(identity) if not skip]
        if "depth" in arch and arch["depth"] != len(keep):
            raise UserError(f"architecture field 'depth' is {arch['depth']} but {len(keep)} layers are not identities")
        return {f: [values[i] for i in keep] for f, values in layers.items()}, len(keep)

    @staticmethod
    def _check_choice(field: str, value: Any, allowed: Sequence[int], extra: str = "") -> int:
        if not _is_int(value) or int(value) not in allowed:
            raise UserError(f"architecture field '{field}' is {value!r}{extra}; allowed values: {list(allowed)}")
        return int(value)

    def key(self, arch: dict) -> str:
        """Canonical JSON string: equal architectures give equal keys."""
        return json.dumps(self.canonical(arch), sort_keys=True, separators=(",", ":"))

    # ----------------------------------------------------------------- sampling
    def sample(self, rng: Any) -> dict:
        """A uniformly sampled canonical architecture (`random.Random` or NumPy Generator)."""
        embed = _pick(rng, self.embed_choices)
        depth = _pick(rng, self.depth_choices)
        heads = [_pick(rng, self.head_choices) for _ in range(depth)]
        return {
            "patch_size": _pick(rng, self.patch_sizes),
            "embed_dim": embed,
            "depth": depth,
            "num_heads": heads,
            "attn_dim": [_pick(rng, self.allowed_attn(h)) for h in heads],
            "mlp_dim": [_pick(rng, self.allowed_mlp(embed)) for _ in range(depth)],
        }

    def _widest_attention(self, largest: bool) -> tuple[int, int]:
        """(heads, attn_dim) of the widest (or narrowest) attention a layer can take, over every
        head count: the extreme width need not be reachable with the extreme head count."""
        pairs = [(attn, heads) for heads in self.head_choices for attn in self.allowed_attn(heads)]
        attn, heads = max(pairs) if largest else min(pairs)  # ties: more heads / fewer heads
        return heads, attn

    def max_arch(self) -> dict:
        """The most costly subnet: smallest patch (most tokens), every width and the depth at
        their maximum."""
        embed, depth = self.embed_choices[-1], self.depth_choices[-1]
        heads, attn = self._widest_attention(largest=True)
        return {
            "patch_size": self.patch_sizes[0], "embed_dim": embed, "depth": depth,
            "num_heads": [heads] * depth, "attn_dim": [attn] * depth,
            "mlp_dim": [max(self.allowed_mlp(embed))] * depth,
        }

    def min_arch(self) -> dict:
        """The cheapest subnet: largest patch (fewest tokens), every width and the depth at their
        minimum."""
        embed, depth = self.embed_choices[0], self.depth_choices[0]
        heads, attn = self._widest_attention(largest=False)
        return {
            "patch_size": self.patch_sizes[-1], "embed_dim": embed, "depth": depth,
            "num_heads": [heads] * depth, "attn_dim": [attn] * depth,
            "mlp_dim": [min(self.allowed_mlp(embed))] * depth,
        }

    def cost_span(self, cost_fn: Callable[[dict], Any]) -> dict[str, tuple[int, int]]:
        """{"macs": (lo, hi), "params": (lo, hi)}: the exact range of `cost_fn` over the space.

        Cost grows with every width and the depth, but not monotonically with the patch size (a
        larger patch has fewer tokens but a larger stem: at 224 px patch 32 has more parameters
        than patch 14), so the extremes are taken over every patch size.
        """
        ends = [cost_fn({**arch, "patch_size": patch}) for arch in (self.min_arch(), self.max_arch())
                for patch in self.patch_sizes]
        return {name: (min(getattr(c, name) for c in ends), max(getattr(c, name) for c in ends))
                for name in ("macs", "params")}

    def sample_in_range(
        self,
        rng: Any,
        cost_fn: Callable[[dict], Any],
        macs: tuple[Optional[int], Optional[int]] = (None, None),
        params: tuple[Optional[int], Optional[int]] = (None, None),
        max_tries: int = 2000,
    ) -> dict:
        """Rejection-sample an architecture whose `cost_fn(arch)` (.macs, .params) is in range.

        Fails at once when the range misses the space's `cost_span`, and after `max_tries`
        otherwise, with an error that names the range: it never loops forever.
        """
        def inside(cost: Any) -> bool:
            return all(
                (lo is None or value >= lo) and (hi is None or value <= hi)
                for value, (lo, hi) in ((cost.macs, macs), (cost.params, params))
            )

        span = self.cost_span(cost_fn)
        for name, (lo, hi) in (("macs", macs), ("params", params)):
            a, b = span[name]
            if (lo is not None and lo > b) or (hi is not None and hi < a) or (
                    lo is not None and hi is not None and lo > hi):
                raise UserError(f"no architecture has {name} in [{lo}, {hi}]: the space spans [{a}, {b}]")
        for _ in range(max_tries):
            arch = self.sample(rng)
            if inside(cost_fn(arch)):
                return arch
        raise UserError(
            f"no architecture with macs in {list(macs)} and params in {list(params)} found in "
            f"{max_tries} samples; widen the range"
        )

    # ----------------------------------------------------------------- genome
    def _gene_layout(self) -> list[tuple[str, int]]:
        genes = [("patch_size", len(self.patch_sizes)), ("embed_dim", len(self.embed_choices))]
        if not self.cfg.identity:
            genes.append(("depth", len(self.depth_choices)))
        for i in range(self.super_depth):
            if self.cfg.identity:
                genes.append((f"identity[{i}]", 2))
            genes.append((f"num_heads[{i}]", len(self.head_choices)))
            if not self.cfg.head_dim:
                genes.append((f"attn_dim[{i}]", len(self.attn_choices)))
            genes.append((f"mlp_dim[{i}]", len(self.mlp_ratios or self.mlp_choices)))
        return genes

    def gene_names(self) -> list[str]:
        """Name of each genome position, e.g. `num_heads[3]`."""
        return [name for name, _ in self._genes]

    def decode(self, x: Sequence[int]) -> dict:
        """Genome -> canonical architecture. Unused genes are ignored; an attn_dim that the
        layer's head count does not divide is repaired to the nearest allowed width, and an
        identity pattern leaving too few layers keeps the first identities as blocks."""
        genes = dict(zip(self.gene_names(), (int(v) for v in np.asarray(x).round())))
        embed = self.embed_choices[genes["embed_dim"]]
        if self.cfg.identity:
            active = [i for i in range(self.super_depth) if not genes[f"identity[{i}]"]]
            skipped = [i for i in range(self.super_depth) if genes[f"identity[{i}]"]]
            while len(active) < self.depth_choices[0]:
                active = sorted(active + [skipped.pop(0)])
            while len(active) not in self.depth_choices:
                active.pop()
            layers = active
        else:
            layers = list(range(self.depth_choices[genes["depth"]]))
        heads, attn, mlp = [], [], []
        for i in layers:
            h = self.head_choices[genes[f"num_heads[{i}]"]]
            heads.append(h)
            if self.cfg.head_dim:
                attn.append(self.allowed_attn(h)[0])
            else:
                attn.append(_nearest(self.attn_choices[genes[f"attn_dim[{i}]"]], self.allowed_attn(h)))
            if self.mlp_ratios:
                mlp.append(self._ratio_width(self.mlp_ratios[genes[f"mlp_dim[{i}]"]], embed))
            else:
                mlp.append(self.mlp_choices[genes[f"mlp_dim[{i}]"]])
        return {
            "patch_size": self.patch_sizes[genes["patch_size"]], "embed_dim": embed, "depth": len(layers),
            "num_heads": heads, "attn_dim": attn, "mlp_dim": mlp,
        }

    def encode(self, arch: dict) -> np.ndarray:
        """Canonical architecture -> genome (layers past the depth are identities / unused)."""
        arch = self.canonical(arch)
        genes = {name: 0 for name in self.gene_names()}
        genes["patch_size"] = self.patch_sizes.index(arch["patch_size"])
        genes["embed_dim"] = self.embed_choices.index(arch["embed_dim"])
        if self.cfg.identity:
            for i in range(self.super_depth):
                genes[f"identity[{i}]"] = int(i >= arch["depth"])
        else:
            genes["depth"] = self.depth_choices.index(arch["depth"])
        for i in range(arch["depth"]):
            genes[f"num_heads[{i}]"] = self.head_choices.index(arch["num_heads"][i])
            if not self.cfg.head_dim:
                genes[f"attn_dim[{i}]"] = self.attn_choices.index(arch["attn_dim"][i])
            if self.mlp_ratios:
                ratio = arch["mlp_dim"][i] / arch["embed_dim"]
                genes[f"mlp_dim[{i}]"] = min(range(len(self.mlp_ratios)), key=lambda k: abs(self.mlp_ratios[k] - ratio))
            else:
                genes[f"mlp_dim[{i}]"] = self.mlp_choices.index(arch["mlp_dim"][i])
        return np.array([genes[n] for n in self.gene_names()], dtype=np.int64)

    def mutate(self, x: np.ndarray, rng: np.random.Generator, prob: float) -> np.ndarray:
        """Resample each gene uniformly within its bounds with probability `prob`."""
        x = np.array(x, dtype=np.int64)
        hit = rng.random(self.n_var) < prob
        x[hit] = rng.integers(self.xl[hit], self.xu[hit] + 1)
        return x

    def crossover(self, a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Uniform crossover: each gene swapped between the parents with probability 1/2."""
        swap = rng.random(self.n_var) < 0.5
        c1, c2 = np.array(a, dtype=np.int64), np.array(b, dtype=np.int64)
        c1[swap], c2[swap] = b[swap], a[swap]
        return c1, c2

    # ----------------------------------------------------------------- records
    def spec(self) -> dict:
        """What a checkpoint records about its space (plain values)."""
        return dataclasses.asdict(self.cfg)

    def check_spec(self, recorded: dict, where: str = "checkpoint") -> None:
        """UserError naming the differing field when `recorded` is another space. A field the
        record lacks (written before the field existed) counts as its default."""
        full = {**_flatten(dataclasses.asdict(SpaceConfig())), **_flatten(recorded)}
        check_space(full, _flatten(self.spec()), where)

    @property
    def norm_eps(self) -> float:
        """The LayerNorms' eps (timm's 1e-6 unless the space sets one, e.g. AutoFormer's 1e-5)."""
        return self.cfg.norm_eps if self.cfg.norm_eps is not None else 1e-6

    def cost(self, arch: dict, num_classes: int) -> Any:
        """Params and MACs (`supernet.complexity.Cost`) of a valid `arch` with a `num_classes`-way
        head: `supernet.complexity.arch_cost`, the call every kind of space answers."""
        return arch_cost(arch, self, num_classes)

    def model_args(self, arch: dict, num_classes: int) -> dict:
        """The static model's constructor arguments for a canonical `arch` (what checkpoints
        record); `arch` may lie outside the space's choices (auto-scaling grows beyond them)."""
        c = self.cfg
        return dict(arch=arch, num_classes=num_classes, img_size=c.img_size,
                    in_chans=c.in_chans, qkv_bias=c.qkv_bias, rel_pos=c.rel_pos,
                    rel_pos_max=c.rel_pos_max, pool=c.pool, norm_eps=self.norm_eps,
                    final_norm_eps=self.norm_eps)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# The space class of each `space.kind`. Other kinds register themselves when their module is
# imported (`supernet.asvit_space` adds "asvit"; the package's __init__ imports it), so this
# module never imports them.
SPACE_KINDS: dict[str, Callable[[SpaceConfig], Any]] = {"vit": SearchSpace}


def register_space_kind(kind: str, space_class: Callable[[SpaceConfig], Any]) -> None:
    """Make `space_from_config` build `space_class(cfg.space)` for `space.kind: <kind>`."""
    SPACE_KINDS[kind] = space_class


def space_from_config(cfg: Any) -> Any:
    """The space of a full `Config` (its `space` section): a `SearchSpace` for flat ViTs, an
    `AsVitSpace` for `space.kind: asvit`. Both offer validate, canonical, key, sample,
    sample_in_range, cost_span, the genome, spec/check_spec, model_args and cost."""
    kind = cfg.space.kind
    if kind not in SPACE_KINDS:
        raise UserError(f"space.kind {kind!r} is not a known kind of space; kinds: {sorted(SPACE_KINDS)}")
    return SPACE_KINDS[kind](cfg.space)
