"""As-ViT's hierarchical topology space (its Table 1): validation, sampling, genome, cost.

An architecture is the dict of `supernet.asvit` (`embed_dim`, `num_heads`, four `stages` of
`kernel`, `split`, `expansion`, `depth`). `space.asvit` lists the choices: the topology fields
(`kernel`, `split`, `expansion` per stage, `num_heads`) are checked against them; `depth` and
`embed_dim` list what search draws (As-ViT searches at C = 32 and one block per stage), while any
positive depth and width validate, since As-ViT's auto-scaling grows exactly those two (every
searched and scaled model of the family is an architecture of the space). `strict=True` checks
them against the choices too. `AsVitSpace` offers the interface of `supernet.space.SearchSpace`
that search, ranking and scaling use (validate, canonical, key, sample, sample_in_range,
cost_span, max_arch/min_arch, the integer genome, spec/check_spec) plus `cost` and `model_args`.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Optional, Sequence

import numpy as np

from vitas.core.checkpoint import check_space
from vitas.core.config import SpaceConfig
from vitas.core.errors import UserError
from vitas.supernet.asvit import STAGE_KEYS, STAGES, check_asvit_arch, stage_heads, stage_widths
from vitas.supernet.asvit_complexity import asvit_cost
from vitas.supernet.complexity import Cost
from vitas.supernet.space import SearchSpace, register_space_kind

ARCH_FIELDS = ("embed_dim", "num_heads", "stages")
TOPOLOGY_KEYS = ("kernel", "split", "expansion")  # per stage; `depth` is grown by scaling


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _pick(rng: Any, seq: Sequence) -> Any:
    """Uniform choice with either a `random.Random` or a NumPy `Generator`."""
    if isinstance(rng, np.random.Generator):
        return seq[int(rng.integers(len(seq)))]
    return seq[rng.randrange(len(seq))]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


class AsVitSpace:
    """The choices of every As-ViT architecture field (`space.kind: asvit`, section `space.asvit`)."""

    def __init__(self, cfg: SpaceConfig):
        if cfg.kind != "asvit":
            raise UserError(f"space.kind is {cfg.kind!r}; an As-ViT space needs space.kind: asvit")
        self.cfg = cfg
        a = cfg.asvit
        for key in STAGE_KEYS:
            lists = getattr(a, key)
            if len(lists) != STAGES or not all(lst and all(v >= 1 for v in lst) for lst in lists):
                raise UserError(f"space.asvit.{key} must hold {STAGES} non-empty lists (one per stage) "
                                f"of positive integers, got {lists}")
        for key in ("num_heads", "embed_dim"):
            if not getattr(a, key) or any(v < 1 for v in getattr(a, key)):
                raise UserError(f"space.asvit.{key} must be a non-empty list of positive integers")
        self.stage_choices = [{k: sorted(set(getattr(a, k)[i])) for k in STAGE_KEYS} for i in range(STAGES)]
        self.head_choices = sorted(set(a.num_heads))
        self.embed_choices = sorted(set(a.embed_dim))
        for h in self.head_choices:
            for c in self.embed_choices:
                self._check_consistent({"embed_dim": c, "num_heads": h,
                                        "stages": [{k: v[0] for k, v in s.items()} for s in self.stage_choices]},
                                       f"space.asvit: embed_dim {c} with num_heads {h}")
        self._genes = [(f"stages[{i}].{k}", s[k]) for i, s in enumerate(self.stage_choices)
                       for k in STAGE_KEYS if len(s[k]) > 1]
        self._genes += [(k, c) for k, c in (("num_heads", self.head_choices), ("embed_dim", self.embed_choices))
                        if len(c) > 1]
        self.n_var = len(self._genes)
        self.xl = np.zeros(self.n_var, dtype=np.int64)
        self.xu = np.array([len(c) - 1 for _, c in self._genes], dtype=np.int64)

    # ----------------------------------------------------------------- validation
    def _check_consistent(self, arch: dict, where: str) -> dict:
        try:
            return check_asvit_arch(arch, self.cfg.asvit.width_cap)
        except ValueError as exc:
            raise UserError(f"{where}: {exc}") from None

    @staticmethod
    def _check_choice(field: str, value: Any, allowed: Sequence[int]) -> int:
        if not _is_int(value) or int(value) not in allowed:
            raise UserError(f"architecture field '{field}' is {value!r}; allowed values: {list(allowed)}")
        return int(value)

    @staticmethod
    def _check_positive(field: str, value: Any, searched: Sequence[int]) -> int:
        if not _is_int(value) or int(value) < 1:
            raise UserError(f"architecture field '{field}' is {value!r}; allowed values: integers >= 1 "
                            f"(search draws from {list(searched)}, auto-scaling grows it)")
        return int(value)

    def validate(self, arch: Any, strict: bool = False) -> dict:
        """Canonical copy of `arch`; UserError naming the field and its allowed values. A stage
        field with a single choice may be left out (it is filled in). `strict`: `depth` and
        `embed_dim` must also be among the search choices."""
        if not isinstance(arch, dict):
            raise UserError(f"architecture must be a JSON object, got {type(arch).__name__}")
        unknown = sorted(set(arch) - set(ARCH_FIELDS))
        if unknown:
            raise UserError(f"architecture has unknown field(s) {unknown}; fields are {list(ARCH_FIELDS)}")
        missing = [f for f in ARCH_FIELDS if f not in arch and not (f == "embed_dim" and len(self.embed_choices) == 1)]
        if missing:
            raise UserError(f"architecture is missing field(s) {missing}")
        stages = arch["stages"]
        if not isinstance(stages, list) or len(stages) != STAGES or not all(isinstance(s, dict) for s in stages):
            raise UserError(f"architecture field 'stages' must be a list of {STAGES} objects with fields "
                            f"{list(STAGE_KEYS)}")
        check = self._check_choice if strict else self._check_positive
        embed = arch.get("embed_dim", self.embed_choices[0])
        out = {"embed_dim": check("embed_dim", embed, self.embed_choices),
               "num_heads": self._check_choice("num_heads", arch["num_heads"], self.head_choices), "stages": []}
        for i, (stage, choices) in enumerate(zip(stages, self.stage_choices)):
            unknown = sorted(set(stage) - set(STAGE_KEYS))
            if unknown:
                raise UserError(f"architecture field 'stages[{i}]' has unknown field(s) {unknown}; "
                                f"fields are {list(STAGE_KEYS)}")
            canon = {}
            for key in STAGE_KEYS:
                field = f"stages[{i}].{key}"
                if key not in stage:
                    if len(choices[key]) != 1:
                        raise UserError(f"architecture field '{field}' is missing; allowed values: {choices[key]}")
                    canon[key] = choices[key][0]
                elif key == "depth":
                    canon[key] = check(field, stage[key], choices[key])
                else:
                    canon[key] = self._check_choice(field, stage[key], choices[key])
            out["stages"].append(canon)
        return self._check_consistent(out, "architecture")

    def canonical(self, arch: dict) -> dict:
        """Validated canonical copy (plain ints, every field present, fixed key order)."""
        return self.validate(arch)

    def key(self, arch: dict) -> str:
        """Canonical JSON string: equal architectures give equal keys."""
        return json.dumps(self.canonical(arch), sort_keys=True, separators=(",", ":"))

    # ----------------------------------------------------------------- sampling
    def sample(self, rng: Any) -> dict:
        """A uniformly drawn architecture of the search choices (`random.Random` or NumPy Generator)."""
        stages = [{k: _pick(rng, s[k]) for k in STAGE_KEYS} for s in self.stage_choices]
        return {"embed_dim": _pick(rng, self.embed_choices), "num_heads": _pick(rng, self.head_choices),
                "stages": stages}

    def _extreme(self, largest: bool, heads: int) -> dict:
        """Most (least) costly architecture with `heads`: kernels, expansions, depths and width at
        their maximum (minimum), splits at their minimum (maximum: smaller windows)."""
        pick = max if largest else min
        stages = [{"kernel": pick(s["kernel"]), "split": (min if largest else max)(s["split"]),
                   "expansion": pick(s["expansion"]), "depth": pick(s["depth"])} for s in self.stage_choices]
        return {"embed_dim": pick(self.embed_choices), "num_heads": heads, "stages": stages}

    def _attention_width(self, arch: dict) -> int:
        widths = stage_widths(arch["embed_dim"], self.cfg.asvit.width_cap)
        return sum(s["depth"] * h * (w // h) for s, w, h in zip(arch["stages"], widths, stage_heads(arch["num_heads"])))

    def max_arch(self) -> dict:
        """The most costly architecture: every size at its maximum, the fewest splits, and the head
        count whose (truncated) attention is widest."""
        return max((self._extreme(True, h) for h in self.head_choices), key=self._attention_width)

    def min_arch(self) -> dict:
        """The cheapest architecture: every size at its minimum, the most splits, and the head count
        whose attention is narrowest."""
        return min((self._extreme(False, h) for h in self.head_choices), key=self._attention_width)

    def cost_span(self, cost_fn: Callable[[dict], Any]) -> dict[str, tuple[int, int]]:
        """{"macs": (lo, hi), "params": (lo, hi)}: the exact range of `cost_fn` over the search
        choices. For a fixed head count the cost grows with kernels, expansions, depths and width and
        falls with the splits; across head counts the truncation to whole heads is not monotone, so
        every head count's extremes are costed."""
        ends = [cost_fn(self._extreme(largest, h)) for largest in (False, True) for h in self.head_choices]
        return {name: (min(getattr(c, name) for c in ends), max(getattr(c, name) for c in ends))
                for name in ("macs", "params")}

    sample_in_range = SearchSpace.sample_in_range  # rejection sampling on sample() and cost_span()

    # ----------------------------------------------------------------- genome
    def gene_names(self) -> list[str]:
        """Name of each genome position (only fields with more than one choice), e.g. `stages[0].kernel`."""
        return [name for name, _ in self._genes]

    def decode(self, x: Sequence[int]) -> dict:
        """Genome -> canonical architecture (fields with one choice take it)."""
        genes = dict(zip(self.gene_names(), (int(v) for v in np.asarray(x).round())))
        pick = {name: choices[genes[name]] for name, choices in self._genes}
        stages = [{k: pick.get(f"stages[{i}].{k}", s[k][0]) for k in STAGE_KEYS}
                  for i, s in enumerate(self.stage_choices)]
        return {"embed_dim": pick.get("embed_dim", self.embed_choices[0]),
                "num_heads": pick.get("num_heads", self.head_choices[0]), "stages": stages}

    def encode(self, arch: dict) -> np.ndarray:
        """Canonical architecture of the search choices -> genome (UserError for a scaled one)."""
        arch = self.validate(arch, strict=True)
        values = {"num_heads": arch["num_heads"], "embed_dim": arch["embed_dim"]}
        values.update({f"stages[{i}].{k}": s[k] for i, s in enumerate(arch["stages"]) for k in STAGE_KEYS})
        return np.array([choices.index(values[name]) for name, choices in self._genes], dtype=np.int64)

    mutate = SearchSpace.mutate  # each gene redrawn within its bounds with probability `prob`
    crossover = SearchSpace.crossover  # uniform crossover

    # ----------------------------------------------------------------- cost and model
    def model_args(self, arch: dict, num_classes: int) -> dict:
        """`supernet.asvit.AsViT` constructor arguments of a valid `arch` (what a checkpoint records)."""
        c = self.cfg
        return dict(arch=arch, num_classes=num_classes, img_size=c.img_size, in_chans=c.in_chans,
                    qkv_bias=c.qkv_bias, width_cap=c.asvit.width_cap, pre_logits=c.asvit.pre_logits)

    def cost(self, arch: dict, num_classes: int, stem_stride: Optional[int] = None) -> Cost:
        """Params and MACs of a valid `arch` (DESIGN 4 adapted; `supernet.asvit_complexity`)."""
        args = self.model_args(arch, num_classes)
        del args["arch"]
        extra = {} if stem_stride is None else {"stem_stride": stem_stride}
        return asvit_cost(arch, **args, **extra)

    # ----------------------------------------------------------------- records
    def spec(self) -> dict:
        """What a checkpoint records about the space (plain values; the flat fields are unused)."""
        c = self.cfg
        return {"kind": c.kind, "name": c.name, "img_size": c.img_size, "in_chans": c.in_chans,
                "qkv_bias": c.qkv_bias, "asvit": dataclasses.asdict(c.asvit)}

    def check_spec(self, recorded: dict, where: str = "checkpoint") -> None:
        """UserError naming the differing field when `recorded` is another space."""
        check_space(_flatten(recorded), _flatten(self.spec()), where)


register_space_kind("asvit", AsVitSpace)  # space_from_config builds it for `space.kind: asvit`


def parse_genotype(text: str) -> dict:
    """An architecture from As-ViT's genotype string, `K,S,E[,L]|...|K,S,E[,L]|H[,C]` (four stages;
    depth 1 and C = 32 when left out), e.g. the README's `8,2,3,5|4,1,2,2|4,1,4,5|4,1,6,2|32,180`."""
    parts = text.strip().split("|")
    try:
        stages = [[int(v) for v in p.split(",")] for p in parts[:-1]]
        tail = [int(v) for v in parts[-1].split(",")]
    except ValueError:
        raise UserError(f"genotype {text!r} is not of the form K,S,E[,L]|x4|H[,C]") from None
    if len(stages) != STAGES or any(len(s) not in (3, 4) for s in stages) or len(tail) not in (1, 2):
        raise UserError(f"genotype {text!r} is not of the form K,S,E[,L]|x4|H[,C]")
    return {"embed_dim": tail[1] if len(tail) == 2 else 32, "num_heads": tail[0],
            "stages": [dict(zip(STAGE_KEYS, s + [1] * (4 - len(s)))) for s in stages]}


def to_genotype(arch: dict) -> str:
    """As-ViT's genotype string `K,S,E,L|...|H,C` of an architecture."""
    stages = "|".join(",".join(str(s[k]) for k in STAGE_KEYS) for s in arch["stages"])
    return f"{stages}|{arch['num_heads']},{arch['embed_dim']}"
