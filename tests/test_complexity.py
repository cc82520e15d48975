"""Analytic cost: equal to FlopCounterMode / 2 and to the extracted model's parameter count."""
from __future__ import annotations

import dataclasses
import json
import random
import time

import pytest
import torch

from flop_count import torch_macs

from vitas.core.config import ChannelsConfig, SpaceConfig, load_config
from vitas.supernet.complexity import arch_cost
from vitas.supernet.model import Superformer
from vitas.supernet.space import SearchSpace
from vitas.supernet.static import StaticViT
from vitas.cli import main

DEIT = {  # name: (embed, heads, params, macs) at 224 px, 1000 classes (DESIGN 4)
    "ti": (192, 3, 5_717_416, 1_253_683_200),
    "s": (384, 6, 22_050_664, 4_598_882_304),
    "b": (768, 12, 86_567_656, 17_563_828_224),
}
DEIT_SPACE = {"ti": "autoformer-T", "s": "autoformer-S", "b": "deit"}


def deit_arch(embed: int, heads: int) -> dict:
    return {"patch_size": 16, "embed_dim": embed, "depth": 12, "num_heads": [heads] * 12,
            "attn_dim": [embed] * 12, "mlp_dim": [4 * embed] * 12}


def yaml_space(name: str, **changes) -> SearchSpace:
    return SearchSpace(dataclasses.replace(load_config(f"yamls/{name}.yaml").space, **changes))


def tiny_spaces() -> list[SearchSpace]:
    return [
        SearchSpace(SpaceConfig(
            name="tiny-vitas", img_size=32, patch_size=[4, 8, 16], embed_dim=[16, 24, 32], depth=[1, 2, 3],
            identity=True, num_heads=[2, 4], attn_dim=[16, 24, 32], mlp_dim=[32, 48, 64], qk="private",
            channels=ChannelsConfig("cyclic", "bilateral", "bilateral"))),
        SearchSpace(SpaceConfig(
            name="tiny-autoformer", img_size=32, patch_size=[8], embed_dim=[24, 32], depth=[2, 3],
            num_heads=[2, 3], head_dim=8, mlp_ratio=[2.0, 3.5], super_embed_dim=40, qk="entangled",
            rel_pos=True, rel_pos_max=2, pool="mean", qkv_bias=False)),
    ]


def counted(model: torch.nn.Module, img_size: int) -> tuple[int, int]:
    """(FlopCounterMode total / 2, parameter count) of one forward on one image."""
    return torch_macs(model, img_size, model.in_chans), sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(DEIT))
def test_deit_reference_values(name: str):
    embed, heads, params, macs = DEIT[name]
    space = yaml_space(DEIT_SPACE[name], rel_pos=False)
    assert arch_cost(deit_arch(embed, heads), space, 1000) == (params, macs)


@pytest.mark.parametrize("name", sorted(DEIT))
def test_deit_counted_by_torch(name: str):
    embed, heads, params, macs = DEIT[name]
    model = StaticViT(deit_arch(embed, heads), num_classes=1000, img_size=224).eval()
    assert counted(model, 224) == (macs, params)


@pytest.mark.parametrize("index", [0, 1])
def test_cost_matches_counter_on_random_archs(index: int):
    space = tiny_spaces()[index]
    torch.manual_seed(0)
    supernet = Superformer(space, num_classes=10).eval()
    rng = random.Random(index)
    for i in range(50):
        arch = supernet.sample(rng)
        static = supernet.extract()
        static.explicit_attention = bool(i % 2)  # fused SDPA and written-out attention alike
        cost = arch_cost(arch, space, 10)
        assert counted(static, space.cfg.img_size) == (cost.macs, cost.params), arch


@pytest.mark.parametrize("name", ["autoformer-T", "autoformer-S", "autoformer-B", "vitas-deit-1.3G", "deit"])
def test_params_match_static_model_in_yaml_spaces(name: str):
    space = yaml_space(name)
    c = space.cfg
    rng = random.Random(0)
    for _ in range(10):
        arch = space.sample(rng)
        with torch.device("meta"):
            model = StaticViT(arch, 1000, c.img_size, qkv_bias=c.qkv_bias, rel_pos=c.rel_pos,
                              rel_pos_max=c.rel_pos_max, pool=c.pool)
        assert arch_cost(arch, space, 1000).params == sum(p.numel() for p in model.parameters())


def test_relative_position_cost_at_224():
    space = yaml_space("autoformer-T")
    arch = space.min_arch()
    c = space.cfg
    model = StaticViT(arch, 1000, 224, rel_pos=True, rel_pos_max=c.rel_pos_max, pool="mean").eval()
    cost = arch_cost(arch, space, 1000)
    assert counted(model, 224) == (cost.macs, cost.params)
    plain = arch_cost(arch, yaml_space("autoformer-T", rel_pos=False), 1000)
    tokens, depth, attn = 197, arch["depth"], arch["attn_dim"][0]
    assert cost.macs - plain.macs == depth * 2 * tokens * tokens * attn
    assert cost.params - plain.params == depth * 4 * (2 * 14 + 2) * 64


def test_cost_is_fast():
    space = yaml_space("vitas-deit-1.3G")
    rng = random.Random(0)
    archs = [space.sample(rng) for _ in range(5000)]
    start = time.process_time()  # CPU time: robust to other processes on a shared machine
    for arch in archs:
        arch_cost(arch, space, 1000)
    rate = len(archs) / (time.process_time() - start)
    assert rate >= 10_000, f"{rate:.0f} architectures/s"


def test_identity_encoding_costs_as_its_canonical_form():
    space = SearchSpace(load_config("yamls/demo-digits.yaml").space)
    arch = {"patch_size": 4, "embed_dim": 48, "identity": [True, False, False, True],
            "num_heads": [4, 2, 2, 4], "attn_dim": [64, 32, 48, 64], "mlp_dim": [64, 128, 64, 192]}
    assert arch_cost(arch, space, 10) == arch_cost(space.canonical(arch), space, 10)


def test_cli_arch_commands(capsys, tmp_path):
    cfg = "yamls/deit.yaml"
    assert main(["arch", "sample", "-c", "yamls/demo-digits.yaml", "-n", "3", "--seed", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    space = SearchSpace(load_config("yamls/demo-digits.yaml").space)
    assert len(lines) == 3 and all(space.canonical(json.loads(s)) == json.loads(s) for s in lines)
    arch_file = tmp_path / "arch.json"
    arch_file.write_text(json.dumps(deit_arch(192, 3)))
    assert main(["arch", "cost", "-c", cfg, "--arch", str(arch_file)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == {"params": DEIT["ti"][2], "macs": DEIT["ti"][3]}
    assert main(["arch", "cost", "-c", cfg, "data.num_classes=10", "--arch", json.dumps(deit_arch(192, 3))]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["params"] == DEIT["ti"][2] - 990 * 193
    assert main(["arch", "validate", "-c", cfg, "--arch", str(arch_file)]) == 0
    assert json.loads(capsys.readouterr().out) == deit_arch(192, 3)
    assert main(["arch", "validate", "-c", cfg, "--arch", json.dumps(dict(deit_arch(192, 3), embed_dim=200))]) == 2
    err = capsys.readouterr().err
    assert "embed_dim" in err and "[192, 384, 768]" in err and "Traceback" not in err
    assert main(["arch", "cost", "-c", cfg, "--arch", "{not json"]) == 2
    assert main(["arch", "cost", "-c", cfg, "--arch", json.dumps(dict(deit_arch(192, 3), depth=11))]) == 2
    assert "depth" in capsys.readouterr().err
