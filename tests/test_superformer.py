"""Superformer: channel policies, extraction equivalence, identity shifting, gradients, attention."""
from __future__ import annotations

import random

import pytest
import torch
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from vitas.core.config import ChannelsConfig, SpaceConfig, load_config
from vitas.core.errors import UserError
from vitas.supernet.channels import ChannelPolicy
from vitas.supernet.layers import ElasticLinear
from vitas.supernet.model import Superformer, active_norm, per_patch_state
from vitas.supernet.space import SearchSpace

from vitas.core.config import POLICIES


def vitas_space(policy: str = "cyclic", norms: str = "shared", blocks: str = "shared") -> SearchSpace:
    """Tiny ViTAS-like space: 2 patch sizes, identities, private q/k, per-layer attn widths."""
    return SearchSpace(SpaceConfig(
        name="tiny-vitas", img_size=32, patch_size=[8, 16], embed_dim=[16, 24, 32], depth=[2, 3, 4],
        identity=True, num_heads=[2, 4], attn_dim=[16, 24, 32], mlp_dim=[32, 48, 64], qk="private",
        pool="cls", norms=norms, blocks=blocks, channels=ChannelsConfig(policy, policy, policy)))


def autoformer_space(policy: str = "left") -> SearchSpace:
    """Tiny AutoFormer-like space: fixed head_dim, MLP ratios, entangled qkv, rel-pos, mean pool."""
    return SearchSpace(SpaceConfig(
        name="tiny-autoformer", img_size=32, patch_size=[8], embed_dim=[24, 32, 40], depth=[2, 3],
        num_heads=[2, 3], head_dim=8, mlp_ratio=[2.0, 3.0], super_embed_dim=48, super_attn_dim=24,
        super_depth=3, qk="entangled", rel_pos=True, rel_pos_max=2, pool="mean",
        channels=ChannelsConfig(policy, policy, policy)))


SPACES = {"vitas": vitas_space, "autoformer": autoformer_space,
          "vitas-per-patch-norms": lambda policy: vitas_space(policy, norms="per_patch"),
          "vitas-per-patch-blocks": lambda policy: vitas_space(policy, blocks="per_patch")}


def build(space: SearchSpace, seed: int = 0, **kw) -> Superformer:
    torch.manual_seed(seed)
    return Superformer(space, num_classes=7, **kw).eval()


# ---------------------------------------------------------------------- channel policies
def test_policy_channel_sets():
    left = ChannelPolicy("left", 10, [4, 6, 10])
    assert left.indices(4) == [0, 1, 2, 3] and left.select(4).contiguous
    bil = ChannelPolicy("bilateral", 10, [4, 6, 10])
    assert bil.indices(4, "left") == [0, 1, 2, 3] and bil.indices(4, "right") == [6, 7, 8, 9]
    assert bil.select(10, "right").full
    cyc = ChannelPolicy("cyclic", 10, [4, 6, 8])
    assert cyc.indices(4) == [0, 1, 2, 3]
    assert cyc.indices(6) == [4, 5, 6, 7, 8, 9] and cyc.select(6).contiguous
    assert cyc.indices(8) == [0, 1, 2, 3, 4, 5, 6, 7]  # offset (4 + 6) mod 10 = 0
    ring = ChannelPolicy("cyclic", 10, [4, 8, 10])
    assert ring.indices(8) == [4, 5, 6, 7, 8, 9, 0, 1] and not ring.select(8).contiguous
    assert ring.indices(10) == list(range(10)) and ring.select(10).full
    assert ring.select(8) is ring.select(8)  # cached, and so is its index tensor
    assert ring.select(8).index(torch.device("cpu")) is ring.select(8).index(torch.device("cpu"))
    with pytest.raises(ValueError):
        ring.select(6)


def test_cyclic_balances_channel_usage():
    space = SearchSpace(load_config("yamls/vitas-deit-1.3G.yaml").space)
    widths, C = space.widths("embed"), space.super_embed_dim
    cyclic = ChannelPolicy("cyclic", C, widths).usage_counts()
    left = ChannelPolicy("left", C, widths).usage_counts()
    assert max(cyclic) - min(cyclic) <= 1
    assert max(left) - min(left) == len(widths) - 1


def test_take_is_a_view_for_slices_and_a_gather_when_wrapped():
    w = torch.randn(10, 3)
    assert ChannelPolicy("left", 10, [4, 10]).select(4).take(w, 0).data_ptr() == w.data_ptr()
    wrapped = ChannelPolicy("cyclic", 10, [4, 8, 10]).select(8)
    assert torch.equal(wrapped.take(w, 0), w[[4, 5, 6, 7, 8, 9, 0, 1]])


# ---------------------------------------------------------------------- extraction
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", sorted(SPACES))
def test_extract_matches_superformer(name: str, policy: str):
    model = build(SPACES[name](policy))
    rng = random.Random(1)
    x = torch.randn(2, 3, 32, 32)
    seen = set()
    with torch.no_grad():
        for i in range(50):
            side = "right" if policy == "bilateral" and i % 2 else "left"
            arch = model.sample(rng, side=side)
            seen.add(model.space.key(arch))
            expected = model(x)
            static = model.extract()
            assert static.arch == arch and not static.training
            torch.testing.assert_close(static(x), expected, atol=1e-5, rtol=1e-5)
    assert len(seen) > 40


def test_extract_of_a_given_arch_defaults_to_the_left_pass():
    model = build(vitas_space("bilateral"))
    arch = model.space.min_arch()
    model.set_active(model.space.max_arch(), side="right")
    left, right = model.extract(arch, side="left"), model.extract(arch, side="right")
    assert torch.equal(model.extract(arch).blocks[0].mlp.fc1.weight, left.blocks[0].mlp.fc1.weight)
    assert not torch.equal(left.blocks[0].mlp.fc1.weight, right.blocks[0].mlp.fc1.weight)
    assert model.active_side == "right"
    model.set_active(arch, side="right")
    assert torch.equal(model.extract().blocks[0].mlp.fc1.weight, right.blocks[0].mlp.fc1.weight)


def test_extract_leaves_active_arch_and_copies_weights():
    model = build(vitas_space())
    model.set_min()
    arch = model.space.max_arch()
    static = model.extract(arch)
    assert model.active_arch == model.space.canonical(model.space.min_arch())
    assert static.arch == model.space.canonical(arch)
    with torch.no_grad():
        static.head.weight.add_(1.0)
    assert not torch.equal(static.head.weight, model.head.weight[:, : arch["embed_dim"]])


def test_explicit_attention_matches_sdpa_and_supports_forward_ad():
    model = build(vitas_space("cyclic"))
    model.sample(random.Random(3))
    x, t = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
    with sdpa_kernel(SDPBackend.MATH):
        out_math, tan_math = jvp(model, (x,), (t,))
    model.explicit_attention = True
    out_explicit, tan_explicit = jvp(model, (x,), (t,))
    torch.testing.assert_close(out_math, fused, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_explicit, fused, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tan_explicit, tan_math, atol=1e-5, rtol=1e-5)
    static = model.extract()
    assert static.explicit_attention
    _, tan_static = jvp(static, (x,), (t,))
    torch.testing.assert_close(tan_static, tan_explicit, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- mechanisms
def test_identity_shifting_gives_one_path():
    model = build(vitas_space())
    layer = {"num_heads": [2, 4], "attn_dim": [16, 32], "mlp_dim": [48, 32]}
    filler = {"num_heads": 4, "attn_dim": 24, "mlp_dim": 64}
    a = {"patch_size": 8, "embed_dim": 24, "identity": [False, True, False, True]}
    b = {"patch_size": 8, "embed_dim": 24, "identity": [True, False, True, False]}
    for f in layer:
        a[f] = [layer[f][0], filler[f], layer[f][1], filler[f]]
        b[f] = [filler[f], layer[f][0], filler[f], layer[f][1]]
    x = torch.randn(2, 3, 32, 32)
    outputs, params = [], []
    for enc in (a, b):
        model.set_active(enc)
        assert model.active_arch["depth"] == 2
        outputs.append(model(x))
        params.append([id(p) for p in model.active_parameters()])
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)
    assert params[0] == params[1]
    assert not {id(p) for p in model.blocks[2].parameters()} & set(params[0])


def _mask(shape: torch.Size, **dims: list[int]) -> torch.Tensor:
    """Boolean mask selecting the given indices along dims named d0, d1, d2 (others: all)."""
    mask = torch.ones(shape, dtype=torch.bool)
    for name, idx in dims.items():
        d = int(name[1:])
        keep = torch.zeros(shape[d], dtype=torch.bool)
        keep[idx] = True
        view = [1] * len(shape)
        view[d] = shape[d]
        mask &= keep.view(view)
    return mask


@pytest.mark.parametrize("policy,side", [("cyclic", "left"), ("bilateral", "right"), ("left", "left")])
@pytest.mark.parametrize("name", sorted(SPACES))
def test_gradients_stay_inside_active_slices(name: str, policy: str, side: str):
    space = SPACES[name](policy)
    model = build(space).train()
    embed = space.widths("embed")[1]  # the cyclic ring wraps for this width in both spaces
    heads = space.head_choices[0]
    attn = space.allowed_attn(heads)[0]
    mlp = space.allowed_mlp(embed)[0]
    depth = space.depth_choices[0]
    arch = {"patch_size": space.patch_sizes[0], "embed_dim": embed, "depth": depth,
            "num_heads": [heads] * depth, "attn_dim": [attn] * depth, "mlp_dim": [mlp] * depth}
    model.set_active(arch, side=side)
    model(torch.randn(2, 3, 32, 32)).square().sum().backward()
    E = model.policies["embed"].indices(embed, side)
    A = model.policies["attn"].indices(attn, side)
    M = model.policies["mlp"].indices(mlp, side)
    if policy == "cyclic":
        assert E != sorted(E)  # a wrapped window is exercised
    stem = model.stems[str(arch["patch_size"])]
    expected = {
        stem.proj.weight: _mask(stem.proj.weight.shape, d0=E),
        stem.cls_token: _mask(stem.cls_token.shape, d2=E),
        stem.pos_embed: _mask(stem.pos_embed.shape, d2=E),
        active_norm(model.norm, arch["patch_size"]).weight: _mask((space.super_embed_dim,), d0=E),
        model.head.weight: _mask(model.head.weight.shape, d1=E),
    }
    super_attn = space.super_attn_dim
    blocks = model.block_stack(arch["patch_size"])
    for block in blocks[:depth]:
        at = block.attn
        if at.private:
            for lin in (at.q[str(heads)], at.k[str(heads)], at.v):
                expected[lin.weight] = _mask(lin.weight.shape, d0=A, d1=E)
                expected[lin.bias] = _mask(lin.bias.shape, d0=A)
            for h in space.head_choices:
                if h != heads:
                    for p in (*at.q[str(h)].parameters(), *at.k[str(h)].parameters()):
                        assert p.grad is None or not p.grad.any()
        else:
            rows = [g * super_attn + i for g in range(3) for i in A]
            expected[at.qkv.weight] = _mask(at.qkv.weight.shape, d0=rows, d1=E)
            expected[at.qkv.bias] = _mask(at.qkv.bias.shape, d0=rows)
        expected[at.proj.weight] = _mask(at.proj.weight.shape, d0=E, d1=A)
        expected[block.mlp.fc1.weight] = _mask(block.mlp.fc1.weight.shape, d0=M, d1=E)
        expected[block.mlp.fc2.weight] = _mask(block.mlp.fc2.weight.shape, d0=E, d1=M)
        expected[block.active_norms()[0].bias] = _mask((space.super_embed_dim,), d0=E)
    for p, mask in expected.items():
        assert p.grad is not None
        assert not p.grad[~mask].any(), "gradient outside the active slice"
        assert p.grad[mask].any(), "no gradient inside the active slice"
    active = {id(p) for p in model.active_parameters()}
    for p in model.parameters():
        if id(p) not in active:
            assert p.grad is None or not p.grad.any()
        elif p.grad is None:
            pytest.fail("an active parameter got no gradient")
    for block in blocks[depth:]:
        assert all(p.grad is None for p in block.parameters())


def test_active_parameters_cover_only_the_active_subnet():
    model = build(vitas_space())
    model.set_min()
    active = {id(p) for p in model.active_parameters()}
    arch = model.active_arch
    assert {id(p) for p in model.stems[str(arch["patch_size"])].parameters()} <= active
    other = [p for s, stem in model.stems.items() if s != str(arch["patch_size"]) for p in stem.parameters()]
    assert other and not {id(p) for p in other} & active
    attn = model.blocks[0].attn
    assert id(attn.q[str(arch["num_heads"][0])].weight) in active and id(attn.v.weight) in active
    unused = [h for h in model.space.head_choices if h != arch["num_heads"][0]]
    assert all(id(attn.q[str(h)].weight) not in active for h in unused)
    assert len(active) == len(list(model.active_parameters()))


def test_different_archs_give_different_outputs():
    model = build(vitas_space())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.set_max()
        big = model(x)
        model.set_min()
        small = model(x)
    assert not torch.allclose(big, small, atol=1e-3)


@pytest.mark.parametrize("name", sorted(SPACES))
def test_attention_scale_follows_active_head_dim(name: str):
    space = SPACES[name]("left")
    model = build(space)
    heads = space.head_choices[0]
    attn_dim = space.allowed_attn(heads)[-1]
    arch = space.max_arch()
    arch["num_heads"][0], arch["attn_dim"][0] = heads, attn_dim
    model.set_active(arch)
    block = model.block_stack(arch["patch_size"])[0].attn
    x = torch.randn(2, 5, arch["embed_dim"])
    block.rel_pos = False  # plain attention for the hand computation
    weight, bias = block.active_qkv()
    q, k, v = (x @ weight.T + bias).split(attn_dim, dim=-1)
    d = attn_dim // heads
    outs = []
    for h in range(heads):
        qh, kh, vh = (t[..., h * d:(h + 1) * d] for t in (q, k, v))
        outs.append(torch.softmax(qh @ kh.transpose(1, 2) / d ** 0.5, dim=-1) @ vh)
    pw, pb = block.proj.active_weight()
    expected = torch.cat(outs, dim=-1) @ pw.T + pb
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)
    assert block.scale == d ** -0.5


def test_state_dict_keys_and_api():
    model = build(autoformer_space(), drop_path=0.2)
    keys = model.state_dict().keys()
    assert "blocks.0.attn.qkv.weight" in keys and "blocks.0.attn.rel_pos_k.table_v" in keys
    assert model.state_dict()["blocks.0.attn.qkv.weight"].shape == (3 * 24, 48)
    assert "stems.8.cls_token" in keys and "head.weight" in keys
    assert model.blocks[-1].drop_path.drop_prob == pytest.approx(0.2)
    model.set_max()
    assert model.active_arch == model.space.canonical(model.space.max_arch())
    arch = model.sample(random.Random(0))
    assert model.active_arch == arch
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    vit = build(vitas_space())
    assert "blocks.0.attn.q.2.weight" in vit.state_dict() and "blocks.0.attn.v.weight" in vit.state_dict()
    assert isinstance(vit.blocks[0].attn.q["4"], ElasticLinear)


def test_layers_run_an_architecture_on_other_blocks():
    """Without identity shifting a depth-2 subnet may run on blocks 1 and 3: only they compute and
    get gradients, extraction copies them, and a given arch is extracted from the first blocks."""
    model = build(vitas_space()).train()
    arch = {**model.space.min_arch(), "depth": 2, "num_heads": [2, 4], "attn_dim": [16, 32], "mlp_dim": [32, 64]}
    model.set_active(arch, layers=[1, 3])
    assert model.active_layers == [1, 3]
    x = torch.randn(2, 3, 32, 32)
    model(x).square().sum().backward()
    assert all(p.grad is None for j in (0, 2) for p in model.blocks[j].parameters())
    assert model.blocks[1].mlp.fc1.weight.grad.any() and model.blocks[3].mlp.fc1.weight.grad.any()
    assert {id(p) for p in model.active_parameters()} >= {id(p) for p in model.blocks[3].mlp.parameters()}
    model.eval()
    with torch.no_grad():
        static = model.extract()
        torch.testing.assert_close(static(x), model(x), atol=1e-5, rtol=1e-5)
        assert torch.equal(static.blocks[1].mlp.fc1.weight, model.blocks[3].mlp.fc1.weight[:64, :16])
        first = model.extract(arch)
        assert model.active_layers == [1, 3]
        assert torch.equal(first.blocks[1].mlp.fc1.weight, model.blocks[1].mlp.fc1.weight[:64, :16])
    for bad in ([3, 1], [0], [2, 4], [1, 1]):
        with pytest.raises(ValueError, match="ascending block indices"):
            model.set_active(arch, layers=bad)


def expanded_computes_the_same(shared: Superformer, private: Superformer) -> torch.Tensor:
    """Load `shared`'s weights into `private` through `per_patch_state` and check that 10 random
    subnets compute the same in both; returns the images used."""
    private.load_state_dict(per_patch_state(shared.state_dict(), private.space))
    x, rng = torch.randn(2, 3, 32, 32), random.Random(2)
    with torch.no_grad():
        for _ in range(10):
            private.set_active(shared.sample(rng))
            torch.testing.assert_close(private(x), shared(x), atol=1e-6, rtol=1e-6)
    return x


def unrecorded_reads_as_shared(shared: Superformer, private: Superformer, field: str) -> None:
    """A space record written before `field` existed matches the shared space, not the private."""
    recorded = shared.space.spec()
    del recorded[field]
    shared.space.check_spec(recorded)
    with pytest.raises(UserError, match=f"'{field}' is 'shared' there but 'per_patch'"):
        private.space.check_spec(recorded)


def test_per_patch_norms_are_private_and_start_from_a_shared_norm():
    """`space.norms: per_patch`: one LayerNorm per patch size, trained only by its own patch size;
    a shared-norm superformer's weights, expanded by `per_patch_state`, compute the same for
    every subnet; a checkpoint recorded before the field existed reads as `shared`."""
    shared, private = build(vitas_space()), build(vitas_space(norms="per_patch"), seed=1)
    keys = private.state_dict().keys()
    assert {"blocks.0.norm1.8.weight", "blocks.0.norm2.16.bias", "norm.16.weight"} <= keys
    assert "blocks.0.norm1.weight" not in keys and "blocks.0.norm1.weight" in shared.state_dict()
    x = expanded_computes_the_same(shared, private)
    private.train().set_active({**private.space.max_arch(), "patch_size": 8})
    private(x).sum().backward()
    assert private.blocks[0].norm1["8"].weight.grad is not None
    assert private.blocks[0].norm1["16"].weight.grad is None and private.norm["16"].bias.grad is None
    unrecorded_reads_as_shared(shared, private, "norms")


def test_per_patch_blocks_are_private_and_start_from_shared_blocks():
    """`space.blocks: per_patch`: one block stack per patch size (keys `patch_blocks.<patch>.i.`),
    trained only by its own patch size, the head shared; a shared-block superformer's weights,
    expanded by `per_patch_state`, compute the same for every subnet; with `space.norms: per_patch`
    too, only the final norm is copied per patch size (the blocks' norms are already private); a
    checkpoint recorded before the field existed reads as `shared`."""
    shared, private = build(vitas_space()), build(vitas_space(blocks="per_patch"), seed=1)
    keys = private.state_dict().keys()
    assert {"patch_blocks.8.0.attn.q.2.weight", "patch_blocks.16.3.norm2.bias", "norm.weight", "head.bias"} <= keys
    assert not any(k.startswith("blocks.") for k in keys)
    x = expanded_computes_the_same(shared, private)
    private.train().set_active({**private.space.max_arch(), "patch_size": 8})
    private(x).sum().backward()
    assert private.patch_blocks["8"][3].mlp.fc2.weight.grad is not None and private.head.weight.grad is not None
    assert all(p.grad is None for p in private.patch_blocks["16"].parameters())
    private.explicit_attention = True  # the switch reaches every stack
    assert all(b.attn.explicit for stack in private.patch_blocks.values() for b in stack)
    both = build(vitas_space(norms="per_patch", blocks="per_patch"))
    keys = both.state_dict().keys()
    assert {"patch_blocks.8.0.norm1.weight", "norm.8.weight", "norm.16.bias"} <= keys
    expanded_computes_the_same(shared, both)
    unrecorded_reads_as_shared(shared, private, "blocks")


def test_tokens_and_tables_are_exempt_from_weight_decay():
    """timm's optimizer factory reads no_weight_decay(): tokens/position tables get none (DeiT)."""
    import timm.optim

    space = SearchSpace(SpaceConfig(img_size=32, patch_size=[8, 16], embed_dim=[16], depth=[1], num_heads=[1],
                                    head_dim=16, mlp_ratio=[2.0], rel_pos=True, channels=ChannelsConfig()))
    model = Superformer(space, 10)
    names = model.no_weight_decay()
    assert {"stems.8.cls_token", "stems.16.pos_embed", "blocks.0.attn.rel_pos_v.table_h"} <= names
    assert model.extract().no_weight_decay() >= {"cls_token", "pos_embed"}
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    params = dict(model.named_parameters())
    assert not any(id(params[n]) in decayed for n in names)
    assert id(params["blocks.0.mlp.fc1.weight"]) in decayed
