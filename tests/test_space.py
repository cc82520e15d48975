"""Search spaces: validation messages, canonical form, identity shifting, genome round trips."""
import random
from pathlib import Path

import numpy as np
import pytest

from vitas.core.config import SpaceConfig, config_from_dict, load_config
from vitas.core.errors import UserError
from vitas.supernet.complexity import arch_cost
from vitas.supernet.space import SearchSpace

ROOT = Path(__file__).resolve().parents[1]
SPACES = ["autoformer-T", "autoformer-S", "autoformer-B", "deit", "vitas-deit-1.3G", "demo-digits"]


def space(name):
    return SearchSpace(load_config(ROOT / "yamls" / f"{name}.yaml").space)


@pytest.mark.parametrize("name", SPACES)
def test_sample_encode_decode_round_trip(name):
    s, rng = space(name), random.Random(0)
    seen = set()
    for _ in range(300):
        arch = s.sample(rng)
        assert s.validate(arch) == arch
        assert s.decode(s.encode(arch)) == arch
        seen.add(s.key(arch))
    assert len(seen) > 50 or name == "deit"


@pytest.mark.parametrize("name", SPACES)
def test_mutation_and_crossover_stay_valid(name):
    s, gen = space(name), np.random.default_rng(0)
    x = s.encode(s.max_arch())
    y = s.encode(s.min_arch())
    for _ in range(200):
        x = s.mutate(x, gen, 0.2)
        assert np.all((x >= s.xl) & (x <= s.xu))
        a, b = s.crossover(x, y, gen)
        for child in (a, b):
            s.validate(s.decode(child))


def test_min_max_are_valid_and_ordered():
    s = space("autoformer-T")
    assert s.validate(s.max_arch())["embed_dim"] == 240
    assert s.validate(s.min_arch())["depth"] == 12


def test_min_max_reach_the_extreme_attention_width():
    # 66 is reachable only with 3 heads and 44 only with 4: the extremes are not tied to the head count.
    s = SearchSpace(SpaceConfig(name="odd", img_size=32, patch_size=[8], embed_dim=[32], depth=[2],
                                num_heads=[3, 4], attn_dim=[44, 48, 66], mlp_dim=[64]))
    assert (s.max_arch()["num_heads"], s.max_arch()["attn_dim"]) == ([3, 3], [66, 66])
    assert (s.min_arch()["num_heads"], s.min_arch()["attn_dim"]) == ([4, 4], [44, 44])
    cost = lambda a: arch_cost(a, s, 10)  # noqa: E731
    macs = sorted(cost(s.validate({**s.max_arch(), "num_heads": [h, h], "attn_dim": [a, a]})).macs
                  for h in (3, 4) for a in s.allowed_attn(h))
    assert s.cost_span(cost)["macs"] == (macs[0], macs[-1])


@pytest.mark.parametrize("name", SPACES)
def test_cost_span_bounds_every_architecture(name):
    s, rng = space(name), random.Random(0)
    cost = lambda a: arch_cost(a, s, 1000)  # noqa: E731
    span = s.cost_span(cost)
    for _ in range(300):
        c = cost(s.sample(rng))
        assert span["macs"][0] <= c.macs <= span["macs"][1]
        assert span["params"][0] <= c.params <= span["params"][1]


def test_params_range_beyond_max_arch_is_feasible():
    # Parameters are not monotone in the patch size (patch 16's stem is 4x patch 8's): the
    # smallest-patch max_arch is not the largest model, and a range above it can still be met.
    s = SearchSpace(SpaceConfig(name="patches", img_size=32, patch_size=[8, 16], embed_dim=[32, 48],
                                depth=[1], num_heads=[2], attn_dim=[32], mlp_dim=[32, 64]))
    cost = lambda a: arch_cost(a, s, 10)  # noqa: E731
    above = cost(s.max_arch()).params + 1
    arch = s.sample_in_range(random.Random(0), cost, params=(above, None))
    assert arch["patch_size"] == 16 and cost(arch).params >= above
    hi = s.cost_span(cost)["params"][1]
    with pytest.raises(UserError, match=rf"no architecture has params in \[{hi + 1}, None\].*\[\d+, {hi}\]"):
        s.sample_in_range(random.Random(0), cost, params=(hi + 1, None))


@pytest.mark.parametrize("change, message", [
    ({"embed_dim": 200}, r"'embed_dim' is 200; allowed values: \[192, 216, 240\]"),
    ({"num_heads": [3] * 11}, r"'num_heads' has 11 entries, depth is 12"),
    ({"attn_dim": [256] + [192] * 11}, r"'attn_dim\[0\]' is 256 \(for num_heads 3\); allowed values: \[192\]"),
    ({"mlp_dim": [100] * 12}, r"'mlp_dim\[0\]' is 100; allowed values: \[576, 672, 768\]"),
    ({"depth": 11}, r"'depth' is 11; allowed values: \[12, 13, 14\]"),
    ({"color": 1}, r"unknown field"),
])
def test_invalid_arch_names_field(change, message):
    s = space("autoformer-T")
    arch = {"patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": [3] * 12,
            "attn_dim": [192] * 12, "mlp_dim": [768] * 12}
    s.validate(arch)
    with pytest.raises(UserError, match=message):
        s.validate({**arch, **change})


def test_heads_must_divide_attn():
    s = SearchSpace(SpaceConfig(img_size=32, patch_size=[4], embed_dim=[32], depth=[1],
                                num_heads=[2, 3], attn_dim=[32, 48], mlp_dim=[64]))
    arch = {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": [3], "attn_dim": [48], "mlp_dim": [64]}
    s.validate(arch)
    with pytest.raises(UserError, match=r"attn_dim\[0\]' is 32 \(for num_heads 3\); allowed values: \[48\]"):
        s.validate({**arch, "attn_dim": [32]})
    assert all(a % h == 0 for h in (2, 3) for a in s.allowed_attn(h))


def test_identity_shifting_many_to_one():
    s = space("vitas-deit-1.3G")
    layers = [(3, 96, 384), (6, 144, 576), (12, 192, 768), (16, 384, 1536)] * 2
    canonical = None
    for positions in ([0, 1, 2, 3], [8, 9, 10, 11], [0, 4, 7, 11]):
        it = iter(layers)
        enc = {"patch_size": 16, "embed_dim": 192, "identity": [], "num_heads": [], "attn_dim": [], "mlp_dim": []}
        for i in range(12):
            skip = i in positions
            h, a, m = (3, 96, 384) if skip else next(it)
            enc["identity"].append(skip)
            enc["num_heads"].append(h), enc["attn_dim"].append(a), enc["mlp_dim"].append(m)
        c = s.canonical(enc)
        assert c["depth"] == 8 and c["num_heads"] == [h for h, _, _ in layers]
        canonical = canonical or c
        assert c == canonical and s.key(enc) == s.key(canonical)


def test_identity_rejected_where_space_has_none():
    s = space("autoformer-T")
    with pytest.raises(UserError, match="no identity layers"):
        s.validate({**s.min_arch(), "identity": [False] * 12})


def test_space_config_errors():
    with pytest.raises(UserError, match="exactly one of 'head_dim'"):
        SearchSpace(SpaceConfig(attn_dim=[64], head_dim=64, mlp_ratio=[4.0]))
    with pytest.raises(UserError, match="does not divide"):
        SearchSpace(SpaceConfig(patch_size=[15], head_dim=64, mlp_ratio=[4.0]))
    with pytest.raises(UserError, match="space.channels.embed must be one of left, bilateral, cyclic"):
        config_from_dict({"space": {"head_dim": 64, "mlp_ratio": [4.0], "channels": {"embed": "round"}}})
    with pytest.raises(UserError, match="qkv_bias_slice=prefix needs entangled q/k"):
        SearchSpace(SpaceConfig(head_dim=64, mlp_ratio=[4.0], qk="private", qkv_bias_slice="prefix"))


class FakeCost:
    def __init__(self, arch):
        self.macs = arch["embed_dim"] * arch["depth"]
        self.params = 0


def test_sample_in_range_and_infeasible():
    s, rng = space("autoformer-T"), random.Random(0)
    for _ in range(20):
        a = s.sample_in_range(rng, FakeCost, macs=(216 * 13, 216 * 13))
        assert a["embed_dim"] * a["depth"] == 216 * 13
    with pytest.raises(UserError, match=r"no architecture has macs in \[1, 10\]"):
        s.sample_in_range(rng, FakeCost, macs=(1, 10))
    with pytest.raises(UserError, match="widen the range"):
        s.sample_in_range(rng, FakeCost, macs=(192 * 12 + 1, 192 * 12 + 1), max_tries=50)


def test_spec_mismatch_names_field():
    a, b = space("autoformer-T"), space("autoformer-S")
    a.check_spec(a.spec())
    with pytest.raises(UserError, match="'embed_dim'"):
        a.check_spec(b.spec())
