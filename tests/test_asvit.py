"""As-ViT: the hierarchical model, its Table 1 space, exact cost, re-tokenization and scaling moves."""
from __future__ import annotations

import dataclasses
import itertools
import json
import random
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from timm.models._hub import save_for_hf

from flop_count import torch_macs

from vitas.core.config import AsVitSpaceConfig, ProxyConfig, SpaceConfig, load_config
from vitas.core.errors import UserError
from vitas.retrain.asvit_retokenize import (apply_stem_stage, build_stem_schedule, footnote_dilation,
                                            stem_training_macs)
from vitas.search.proxies.measures import proxy_output, proxy_scores
from vitas.search.scaling import best_choice
from vitas.search.scoring.proxy import ProxyScorer
from vitas.supernet.asvit import AsViT, Reembed, Stem, WindowAttention, stage_grids, stage_widths
from vitas.supernet.asvit_complexity import asvit_cost
from vitas.supernet.asvit_scaling import RATIOS, candidates, grow, scaling_seed, width_unit
from vitas.supernet.asvit_space import AsVitSpace, parse_genotype, to_genotype
from vitas.supernet.space import load_arch

ROOT = Path(__file__).resolve().parents[1]
TABLE4 = {  # name: (genotype "K,S,E,L|x4|H,C" of As-ViT's README / Table 4, params, MACs at 224 px, 1000 classes)
    "seed": ("8,2,3,1|4,1,2,1|4,1,4,1|4,1,6,1|32,32", 2_319_624, 491_469_312),
    "small": ("8,2,3,3|4,1,2,1|4,1,4,4|4,1,6,2|32,88", 28_775_328, 5_132_134_656),
    "base": ("8,2,3,3|4,1,2,1|4,1,4,5|4,1,6,2|32,116", 52_258_652, 8_753_694_080),
    "large": ("8,2,3,5|4,1,2,2|4,1,4,5|4,1,6,2|32,180", 87_580_820, 22_357_813_760),
}
PAPER = {"seed": (2.4e6, 0.5e9), "small": (29.0e6, 5.3e9), "base": (52.6e6, 8.9e9), "large": (88.1e6, 22.6e9)}


def space(img_size: int = 32, **asvit) -> AsVitSpace:
    return AsVitSpace(SpaceConfig(name="asvit-test", kind="asvit", img_size=img_size,
                                  asvit=AsVitSpaceConfig(**asvit)))


def topology(kernels=(8, 4, 4, 4), splits=(2, 1, 1, 1), expansions=(3, 2, 4, 6), depths=(1, 1, 1, 1),
             heads: int = 32, embed: int = 32) -> dict:
    return {"embed_dim": embed, "num_heads": heads,
            "stages": [{"kernel": k, "split": s, "expansion": e, "depth": d}
                       for k, s, e, d in zip(kernels, splits, expansions, depths)]}


def params_of(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def stage_outputs(model: AsViT, x: torch.Tensor) -> list[torch.Size]:
    """Shapes (B, H, W, C) that each stage hands on."""
    shapes = []
    hooks = [s.register_forward_hook(lambda m, i, o: shapes.append(o.shape)) for s in model.stages]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def influence_columns(fn, x: torch.Tensor, row: int, col: int, axis: int) -> list[int]:
    """Columns of `x` (its dimension `axis`) that output token (row, col) of `fn`, (B, H, W, C),
    depends on (a random projection of the token, so that a LayerNorm does not hide them)."""
    x = x.clone().requires_grad_(True)
    out = fn(x)
    probe = torch.randn(out.shape[-1], generator=torch.Generator().manual_seed(0))
    (out[0, row, col] @ probe).backward()
    grad = x.grad.abs().sum(dim=tuple(d for d in range(x.dim()) if d != axis))
    return torch.nonzero(grad).flatten().tolist()


# ------------------------------------------------------------------------------ tokenization
@pytest.mark.parametrize("kernel", [4, 5, 6, 7, 8])
def test_stem_tokens_overlap_by_kernel_minus_stride(kernel):
    torch.manual_seed(0)
    stem = Stem(3, 8, kernel)
    x = torch.randn(1, 3, 32, 32)
    assert stem(x).shape == (1, 8, 8, 8)
    before = (kernel - 4) // 2  # SAME padding puts the odd pixel after
    for col in (2, 3, 4):
        cols = influence_columns(stem, x, 3, col, axis=3)
        assert cols == list(range(4 * col - before, 4 * col - before + kernel))
    left, right = influence_columns(stem, x, 3, 3, axis=3), influence_columns(stem, x, 3, 4, axis=3)
    assert len(set(left) & set(right)) == kernel - 4  # K1 = 4: disjoint patches; larger: overlapping


@pytest.mark.parametrize("kernel", [2, 3, 4])
def test_reembedding_windows_overlap_by_kernel_minus_two(kernel):
    torch.manual_seed(0)
    merge = Reembed(6, 12, kernel)
    x = torch.randn(1, 8, 8, 6)
    assert merge(x).shape == (1, 4, 4, 12)
    before = (kernel - 2) // 2
    for col in (1, 2):
        assert influence_columns(merge, x, 1, col, axis=2) == list(range(2 * col - before, 2 * col - before + kernel))
    shared = set(influence_columns(merge, x, 1, 1, axis=2)) & set(influence_columns(merge, x, 1, 2, axis=2))
    assert len(shared) == kernel - 2


@pytest.mark.parametrize("k1,k", list(itertools.product([4, 5, 6, 7, 8], [2, 3, 4])))
def test_stage_shapes_for_every_kernel(k1, k):
    torch.manual_seed(0)
    arch = topology(kernels=(k1, k, k, k), splits=(4, 2, 2, 1), embed=16, heads=16)
    model = AsViT(arch, num_classes=10, img_size=32).eval()
    for img in (32, 64, 40):  # 40 px: odd grids (10, 5, 3, 2) through the SAME paddings
        grids = stage_grids(img)
        shapes = stage_outputs(model, torch.randn(2, 3, img, img))
        assert shapes == [torch.Size([2, g, g, w]) for g, w in zip(grids, stage_widths(16))]
    assert grids == [10, 5, 3, 2]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_widths_double_and_cap_heads_follow_the_last_stage():
    model = AsViT(topology(depths=(3, 1, 2, 1), embed=24), num_classes=10, width_cap=128)
    assert [s.blocks[0].mlp.fc1.in_features for s in model.stages] == [24, 48, 96, 128]  # capped
    assert [s.blocks[0].attn.num_heads for s in model.stages] == [4, 8, 16, 32]
    assert [len(s.blocks) for s in model.stages] == [3, 1, 2, 1]
    assert [s.blocks[0].mlp.fc1.out_features for s in model.stages] == [72, 96, 384, 768]
    assert [s.downsample.reduction.in_features for s in model.stages[1:]] == [16 * 24, 16 * 48, 16 * 96]
    assert stage_widths(180) == [180, 360, 720, 1024]  # As-ViT Large: the last stage at the cap
    uncapped = AsViT(parse_genotype(TABLE4["seed"][0]), num_classes=10, width_cap=None)
    assert uncapped.num_features == 256
    odd = AsViT(topology(heads=64, embed=36), num_classes=10)  # 36 / 8 heads: truncated to 8 x 4
    assert odd.stages[0].blocks[0].attn.qkv.out_features == 3 * 32


def test_model_refuses_inconsistent_architectures():
    arch = topology()
    del arch["stages"][2]["expansion"]
    with pytest.raises(ValueError, match=r"'stages\[2\]' needs the fields"):
        AsViT(arch)
    with pytest.raises(ValueError, match="'num_heads' must be a multiple of 8"):
        AsViT(topology(heads=20))


# ------------------------------------------------------------------------------ window attention
def reference_attention(attn: WindowAttention, tokens: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention over all of `tokens` (B, N, C) with `attn`'s weights."""
    B, N, _ = tokens.shape
    h = attn.num_heads
    q, k, v = attn.qkv(tokens).reshape(B, N, 3, h, -1).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(B, N, -1))


@pytest.mark.parametrize("grid,splits", [(8, 1), (8, 2), (8, 4), (8, 8), (7, 2), (7, 3), (6, 4), (3, 8)])
@pytest.mark.parametrize("explicit", [False, True])
def test_window_attention_is_full_attention_inside_each_window(grid, splits, explicit):
    torch.manual_seed(0)
    attn = WindowAttention(16, num_heads=4, splits=splits, qkv_bias=True).eval()
    attn.explicit = explicit
    x = torch.randn(2, grid, grid, 16)
    out = attn(x)
    expected = torch.zeros_like(out)
    bounds = [t.tolist() for t in torch.tensor_split(torch.arange(grid), min(splits, grid))]
    for rows, cols in itertools.product(bounds, bounds):
        window = x[:, rows][:, :, cols]
        result = reference_attention(attn, window.reshape(2, -1, 16)).reshape(window.shape)
        expected[:, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = result
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    if splits == 1:  # one window: global attention over the whole grid
        torch.testing.assert_close(out, reference_attention(attn, x.reshape(2, -1, 16)).reshape(x.shape),
                                   atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ cost
@pytest.mark.parametrize("seed", range(10))
def test_macs_and_params_equal_the_counted_model(seed):
    rng = random.Random(seed)
    img = (32, 64, 40, 48)[seed % 4]
    sp = space(img)
    arch = sp.sample(rng)
    if seed % 2:  # a scaled architecture: wider, deeper
        arch = dict(arch, embed_dim=rng.choice([16, 24, 40]))
        for s in arch["stages"]:
            s["depth"] = rng.choice([1, 2])
    kw = dict(qkv_bias=seed % 3 != 0, pre_logits=seed % 2 == 0, width_cap=(None, 1024, 96)[seed % 3])
    model = AsViT(arch, num_classes=10, img_size=img, **kw).eval()
    model.explicit_attention = bool(seed % 2)  # fused SDPA (counted under the math backend) and written out
    cost = asvit_cost(arch, 10, img, **kw)
    assert (cost.params, cost.macs) == (params_of(model), torch_macs(model, img))


def test_seed_topology_cost_at_224_px_equals_the_counted_model():
    arch = parse_genotype(TABLE4["seed"][0])
    model = AsViT(arch, num_classes=1000, img_size=224).eval()
    assert (params_of(model), torch_macs(model, 224)) == TABLE4["seed"][1:]


@pytest.mark.parametrize("name", sorted(TABLE4))
def test_table4_models(name):
    genotype, params, macs = TABLE4[name]
    arch = load_arch(str(ROOT / "yamls" / "archs" / f"asvit-{name}.json"))
    assert arch == parse_genotype(genotype) and to_genotype(arch) == genotype
    sp = AsVitSpace(load_config(ROOT / "yamls" / "asvit-imagenet.yaml").space)
    assert tuple(sp.cost(sp.validate(arch), 1000)) == (params, macs)
    paper_params, paper_macs = PAPER[name]  # docs/ASVIT.md explains the gaps
    assert abs(params / paper_params - 1) < 0.04 and abs(macs / paper_macs - 1) < 0.04


# ------------------------------------------------------------------------------ the space
def test_table1_space_and_genome():
    sp = AsVitSpace(load_config(ROOT / "yamls" / "asvit-imagenet.yaml").space)
    assert sp.n_var == 12  # K1-K4, S1-S3, E1-E4, H: the fields As-ViT's RL searches
    assert int(np.prod(sp.xu + 1)) == 5 * 3 * 3 * 3 * 3 * 3 * 2 * 5**4 * 3
    rng = np.random.default_rng(0)
    for _ in range(200):
        x = rng.integers(sp.xl, sp.xu + 1)
        arch = sp.decode(x)
        assert sp.validate(arch, strict=True) == arch and np.array_equal(sp.encode(arch), x)
        y = sp.mutate(x, rng, 0.5)
        assert np.all((y >= sp.xl) & (y <= sp.xu))
    arch = sp.sample(random.Random(1))
    assert sp.key(arch) == sp.key(json.loads(json.dumps(arch)))
    lo, hi = sp.cost_span(lambda a: sp.cost(a, 1000))["macs"]
    picked = sp.sample_in_range(random.Random(2), lambda a: sp.cost(a, 1000), macs=(lo, (lo + hi) // 3))
    assert lo <= sp.cost(picked, 1000).macs <= (lo + hi) // 3


def test_cost_span_is_exact():
    sp = space(img_size=40, kernel=[[4, 8], [2, 4], [3], [2, 4]], split=[[2, 8], [1, 4], [1, 2], [1]],
               expansion=[[2, 6], [3], [2, 5], [4]], num_heads=[16, 64], embed_dim=[24, 40])
    every = [sp.cost(sp.decode(x), 10) for x in itertools.product(*(range(n + 1) for n in sp.xu))]
    span = sp.cost_span(lambda a: sp.cost(a, 10))
    assert span == {"macs": (min(c.macs for c in every), max(c.macs for c in every)),
                    "params": (min(c.params for c in every), max(c.params for c in every))}


@pytest.mark.parametrize("change,message", [
    (lambda a: a["stages"][0].update(kernel=9), "'stages[0].kernel' is 9; allowed values: [4, 5, 6, 7, 8]"),
    (lambda a: a["stages"][2].update(split=4), "'stages[2].split' is 4; allowed values: [1, 2]"),
    (lambda a: a["stages"][3].update(expansion=2.5), "'stages[3].expansion' is 2.5; allowed values: [2, 3, 4, 5, 6]"),
    (lambda a: a.update(num_heads=24), "'num_heads' is 24; allowed values: [16, 32, 64]"),
    (lambda a: a["stages"][1].update(depth=0), "'stages[1].depth' is 0; allowed values: integers >= 1"),
    (lambda a: a.update(embed_dim="32"), "'embed_dim' is '32'; allowed values: integers >= 1"),
    (lambda a: a["stages"].pop(), "'stages' must be a list of 4 objects"),
    (lambda a: a["stages"][0].pop("split"), "'stages[0].split' is missing; allowed values: [2, 4, 8]"),
    (lambda a: a["stages"][1].update(window=2), "'stages[1]' has unknown field(s) ['window']"),
    (lambda a: a.update(depth=4), "unknown field(s) ['depth']"),
    (lambda a: a.update(embed_dim=4, num_heads=64), "stage 1: width 4 is narrower than its 8 heads"),
])
def test_validation_errors_name_the_field(change, message):
    arch = parse_genotype(TABLE4["seed"][0])
    change(arch)
    with pytest.raises(UserError) as info:
        space(224).validate(arch)
    assert message in str(info.value)


def test_validation_fills_single_choices_and_strict_mode():
    sp = space(224)
    arch = parse_genotype(TABLE4["large"][0])
    assert sp.validate(arch) == arch  # scaled models validate: depth and width are what scaling grows
    with pytest.raises(UserError, match=r"'embed_dim' is 180; allowed values: \[32\]"):
        sp.validate(arch, strict=True)
    short = json.loads(json.dumps(arch))
    del short["stages"][3]["split"]  # the last stage has one split choice
    assert sp.validate(short) == arch
    with pytest.raises(UserError, match=r"'embed_dim' is 180; allowed values: \[32\]"):
        sp.encode(arch)  # the genome covers the search choices only


@pytest.mark.parametrize("override,message", [
    ("space.kind=asvt", "space.kind must be one of vit, asvit"),
    ("space.asvit.kernel=[[4], [2], [2]]", "space.asvit.kernel must hold 4 non-empty lists"),
    ("space.asvit.split=[[2], [1], [], [1]]", "space.asvit.split must hold 4 non-empty lists"),
    ("space.asvit.num_heads=[0]", "space.asvit.num_heads must be a non-empty list of positive integers"),
    ("space.asvit.embed_dim=[4]", "embed_dim 4 with num_heads 64: architecture stage 1: width 4 is narrower"),
    ("space.asvit.kernels=[[4]]", "unknown config key 'space.asvit.kernels' (did you mean 'space.asvit.kernel'?)"),
])
def test_space_config_errors_name_the_key(override, message):
    with pytest.raises(UserError) as info:
        AsVitSpace(load_config(ROOT / "yamls" / "asvit-imagenet.yaml", [override]).space)
    assert message in str(info.value)


def test_spec_records_the_space():
    sp = space(224)
    sp.check_spec(json.loads(json.dumps(sp.spec())))
    other = space(224, num_heads=[16, 32])
    with pytest.raises(UserError, match="'asvit.num_heads' is"):
        sp.check_spec(other.spec())


# ------------------------------------------------------------------------------ re-tokenization
@pytest.mark.parametrize("kernel,expected", [
    (4, [(16, 5), (8, 2), (4, 1)]), (5, [(16, 5), (8, 2), (4, 1)]), (6, [(16, 5), (8, 2), (4, 1)]),
    (7, [(16, 5), (8, 2), (4, 1)]), (8, [(16, 4), (8, 2), (4, 1)]),
])
def test_footnote_dilation(kernel, expected):
    assert [(s, footnote_dilation(s, kernel)) for s in (16, 8, 4)] == expected
    assert footnote_dilation(32, 4) == 10  # round(7 * 4 / 3) + 1


@pytest.mark.parametrize("kernel", [4, 8])
def test_retokenization_keeps_weights_and_follows_the_schedule(kernel):
    torch.manual_seed(0)
    arch = topology(kernels=(kernel, 4, 3, 2), splits=(4, 2, 2, 1), embed=16, heads=16)
    model = AsViT(arch, num_classes=10, img_size=64)
    reference = AsViT(arch, num_classes=10, img_size=64)
    reference.load_state_dict(model.state_dict())
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    schedule = build_stem_schedule([[0, 4], [2, 2], [3, 1]], kernel, 64, epochs=5)
    assert [(s.stride, s.dilation) for s in schedule] == [(16, footnote_dilation(16, kernel)),
                                                          (8, footnote_dilation(8, kernel)), (4, 1)]
    assert [s.grids for s in schedule] == [(4, 2, 1, 1), (8, 4, 2, 1), (16, 8, 4, 2)]
    assert [s.tokens for s in schedule] == [16, 64, 256]
    for stage in schedule:
        apply_stem_stage(model, stage)
        assert model.stem.proj.kernel_size == (kernel, kernel)
        assert {k: v.shape for k, v in model.state_dict().items()} == shapes
        out = stage_outputs(model, x)
        assert [o[1] for o in out] == [o[2] for o in out] == list(stage.grids)
        logits = model(x)
        assert logits.shape == (2, 10) and torch.isfinite(logits).all()
        logits.sum().backward()  # the coarse grid trains the same weights
        assert model.stem.proj.weight.grad.abs().sum() > 0
        model.zero_grad()
    model.eval(), reference.eval()
    torch.testing.assert_close(model(x), reference(x))  # back at full resolution: the same model


def test_retokenization_macs_match_the_counted_model():
    sp = space(64)
    arch = sp.validate(topology(kernels=(4, 4, 3, 2), splits=(2, 2, 1, 1), embed=16, heads=16))
    model = AsViT(**sp.model_args(arch, 10)).eval()
    schedule = build_stem_schedule([[0, 4], [3, 2], [5, 1]], 4, 64, epochs=8)
    report = stem_training_macs(arch, sp, 10, schedule, epochs=8, images_per_epoch=100)
    counted = []
    for stage in schedule:
        apply_stem_stage(model, stage)
        counted.append(torch_macs(model, 64))
    assert [s["macs_per_image"] for s in report["stages"]] == counted
    assert [s["epochs"] for s in report["stages"]] == [[0, 3], [3, 5], [5, 8]]
    assert report["train_macs"] == 100 * (3 * counted[0] + 2 * counted[1] + 3 * counted[2])
    assert report["full_train_macs"] == 100 * 8 * sp.cost(arch, 10).macs == 100 * 8 * counted[2]
    assert 0.5 < report["saved_fraction"] < 0.8


def test_retokenization_schedule_errors():
    with pytest.raises(UserError, match="factor 1"):
        build_stem_schedule([[0, 4], [2, 2]], 4, 64, epochs=5)
    with pytest.raises(UserError, match=r"retrain.retokenize\[1\]: start epochs must increase"):
        build_stem_schedule([[0, 4], [0, 1]], 4, 64, epochs=5)


# ------------------------------------------------------------------------------ scaling moves
@pytest.mark.parametrize("heads", [16, 32, 64])
def test_scaling_candidates_grow_monotonically(heads):
    sp = space(224)
    arch = scaling_seed(dict(parse_genotype(TABLE4["large"][0]), num_heads=heads))
    assert arch["embed_dim"] == 32 and [s["depth"] for s in arch["stages"]] == [1, 1, 1, 1]
    for step in range(12):
        parent = sp.cost(arch, 1000)
        cands = candidates(arch)
        assert 4 <= len(cands) <= 16 and len({json.dumps(c["arch"]) for c in cands}) == len(cands)
        assert {c["stage"] for c in cands} == {0, 1, 2, 3} and {c["ratio"] for c in cands} <= set(RATIOS)
        for c in cands:
            grown = sp.validate(c["arch"])
            depths = [s["depth"] for s in grown["stages"]]
            old = [s["depth"] for s in arch["stages"]]
            assert [d - o for d, o in zip(depths, old)] == [int(i == c["stage"]) for i in range(4)]
            assert grown["embed_dim"] >= arch["embed_dim"] * c["ratio"] and grown["embed_dim"] % width_unit(grown) == 0
            cost = sp.cost(grown, 1000)
            assert cost.params > parent.params and cost.macs > parent.macs
            model_heads = [h * (w // h) for h, w in zip([heads // 8, heads // 4, heads // 2, heads],
                                                        stage_widths(grown["embed_dim"]))]
            assert model_heads == [min(w, 1024) for w in stage_widths(grown["embed_dim"])]  # no truncation
        arch = cands[(7 * step) % len(cands)]["arch"]


def test_grow_with_the_proxies_stops_at_the_parameter_limit():
    sp = space(32)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cfg = ProxyConfig(inits=1, thetas=4, ntk_images=4)

    measured: dict[str, dict] = {}  # the proxies are a function of the architecture: measure each once

    def measure(arch: dict) -> dict:
        key = sp.key(arch)
        if key not in measured:
            scores = proxy_scores(AsViT(**sp.model_args(arch, 10)), None, images, cfg, curvature=False)
            measured[key] = {**scores, "params": sp.cost(arch, 10).params}
        return dict(measured[key])

    seed = scaling_seed(dict(parse_genotype(TABLE4["seed"][0]), num_heads=16), embed_dim=16)  # small: fast
    limit = int(sp.cost(seed, 10).params * 2.5)
    choose = partial(best_choice, scorer=ProxyScorer(load_config(ROOT / "yamls" / "asvit-digits.yaml")))
    steps = list(grow(seed, measure, choose, limit))
    params = [s["params"] for s in steps]
    assert len(steps) >= 3 and params == sorted(set(params))  # strictly growing
    assert params[-2] < limit <= params[-1]
    for prev, step in zip(steps, steps[1:]):
        assert step["arch"] == step["candidates"][choose(step["candidates"])]["arch"]
        assert sum(s["depth"] for s in step["arch"]["stages"]) == sum(s["depth"] for s in prev["arch"]["stages"]) + 1
    assert list(grow(seed, measure, choose, params[0])) == steps[:1]  # at the limit already
    assert list(grow(seed, measure, choose, limit, start=steps[1])) == steps[2:]  # resumed


# ------------------------------------------------------------------------------ proxies and export
def test_proxies_read_the_pooled_features_before_the_final_norm():
    torch.manual_seed(0)
    model = AsViT(parse_genotype(TABLE4["seed"][0]), num_classes=10, img_size=32).eval()
    x = torch.randn(3, 3, 32, 32)
    with proxy_output(model, "features", "keep") as net:
        torch.testing.assert_close(net(x), model.forward_features(x))
    torch.testing.assert_close(model(x), model.head(model.norm(model.forward_tokens(x)).mean(1)))
    cfg = ProxyConfig(inits=1, thetas=4, ntk_images=4)
    images = torch.randn(4, 3, 32, 32)
    fd = proxy_scores(model, None, images, cfg, curvature=False)
    assert fd["valid"] and fd["length_distortion"] > 0 and fd["ntk_condition"] >= 1
    jvp = proxy_scores(model, None, images, dataclasses.replace(cfg, velocity="jvp"), curvature=False)
    assert jvp["length_distortion"] == pytest.approx(fd["length_distortion"], rel=1e-3)
    assert jvp["ntk_condition"] == pytest.approx(fd["ntk_condition"], rel=1e-9)


def test_timm_round_trip(tmp_path):
    torch.manual_seed(0)
    model = AsViT(parse_genotype(TABLE4["seed"][0]), num_classes=10, img_size=32).eval()
    target = timm.create_model("vitas_asvit", pretrained=False, **model.model_args)
    target.load_state_dict(model.state_dict())
    save_for_hf(target, tmp_path, model_args=model.model_args, safe_serialization=True)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))
    assert loaded.model_args == model.model_args
