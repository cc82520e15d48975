"""Export: timm folders that `timm.create_model('local-dir:...', pretrained=True)` rebuilds exactly."""
from __future__ import annotations

import json
import os
import random

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from vitas.core.checkpoint import save_checkpoint
from vitas.core.config import ChannelsConfig, Config, SpaceConfig
from vitas.core.errors import UserError
from vitas.supernet.export import EXPORT_FILES, export, load_exported
from vitas.supernet.model import Superformer
from vitas.supernet.space import SearchSpace
from vitas.supernet.static import StaticViT
from vitas.cli import main


def space_cfg(pool: str = "cls", rel_pos: bool = False) -> SpaceConfig:
    return SpaceConfig(
        name="tiny-export", img_size=32, patch_size=[8, 16], embed_dim=[16, 24, 32], depth=[2, 3],
        num_heads=[2, 4], attn_dim=[16, 24, 32], mlp_dim=[32, 48, 64], qk="private", pool=pool,
        channels=ChannelsConfig("cyclic", "bilateral", "left"))


def supernet(pool: str = "cls") -> Superformer:
    torch.manual_seed(0)
    return Superformer(SearchSpace(space_cfg(pool)), num_classes=5).eval()


def uniform(embed: int = 24, heads: int = 2, mlp: int = 48, depth: int = 3) -> dict:
    return {"patch_size": 8, "embed_dim": embed, "depth": depth, "num_heads": [heads] * depth,
            "attn_dim": [embed] * depth, "mlp_dim": [mlp] * depth}


def assert_same_logits(model: torch.nn.Module, folder, x: torch.Tensor) -> torch.nn.Module:
    with torch.no_grad():
        expected = model(x)
        loaded = load_exported(folder)
        torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=1e-5)
    return loaded


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_uniform_arch_exports_as_stock_vit(tmp_path, pool: str):
    model = supernet(pool)
    arch = uniform()
    model.set_active(arch, side="right")
    out = export(model.extract(), tmp_path / "vit")
    loaded = assert_same_logits(model, out, torch.randn(2, 3, 32, 32))
    assert type(loaded) is VisionTransformer
    assert loaded.global_pool == ("token" if pool == "cls" else "avg")
    config = json.loads((out / "config.json").read_text())
    assert config["vitas_arch"] == arch and "pretrained_cfg" in config
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors"}


def test_non_uniform_arch_exports_as_vitas_vit(tmp_path):
    model = supernet()
    rng = random.Random(2)
    arch = model.space.sample(rng)
    while len(set(arch["attn_dim"])) == 1:
        arch = model.space.sample(rng)
    out = export((model, arch), tmp_path / "nonuniform")
    model.set_active(arch)
    loaded = assert_same_logits(model, out, torch.randn(2, 3, 32, 32))
    assert isinstance(loaded, StaticViT) and loaded.arch == arch
    assert json.loads((out / "config.json").read_text())["architecture"] == "vitas_vit"


def test_relative_positions_export_as_vitas_vit(tmp_path):
    arch = uniform(embed=32, heads=2, mlp=64, depth=2)
    static = StaticViT(arch, num_classes=3, img_size=32, rel_pos=True, rel_pos_max=2, pool="mean").eval()
    out = export(static, tmp_path / "relpos")
    assert isinstance(assert_same_logits(static, out, torch.randn(1, 3, 32, 32)), StaticViT)


def test_deit_tiny_matches_timm_vit_tiny():
    arch = {"patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": [3] * 12,
            "attn_dim": [192] * 12, "mlp_dim": [768] * 12}
    ours = StaticViT(arch, num_classes=1000, img_size=224)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters()) == 5_717_416
    reference.load_state_dict(ours.state_dict())  # the same keys and shapes (strict)


def test_export_replaces_a_folder_atomically(tmp_path):
    model = supernet()
    out = tmp_path / "model"
    export((model, uniform()), out)
    export((model, uniform(embed=32, heads=4, mlp=64)), out)
    assert json.loads((out / "config.json").read_text())["vitas_arch"]["embed_dim"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_export_refuses_what_is_not_an_earlier_export(tmp_path):
    model = supernet()
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="is not a folder"):
        export((model, uniform()), tmp_path / "notes.txt")
    run = tmp_path / "retrain"
    run.mkdir()
    (run / "last.pth").write_bytes(b"checkpoint")
    with pytest.raises(UserError, match=r"holds other files \(last.pth\)"):
        export((model, uniform()), run)
    assert (tmp_path / "notes.txt").read_text() == "keep me" and (run / "last.pth").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "retrain"]
    (tmp_path / "empty").mkdir()
    out = export((model, uniform()), tmp_path / "empty")
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPORT_FILES)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_cli_export_from_superformer_and_retrain_checkpoints(tmp_path, capsys):
    model = supernet()
    cfg = Config(space=space_cfg())
    ckpt = tmp_path / "supernet.pth"
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "space": model.space.spec()}, ckpt)
    arch = model.space.sample(random.Random(5))
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(ckpt), "--arch", json.dumps(arch), str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["arch"] == arch
    model.set_active(arch)
    x = torch.randn(2, 3, 32, 32)
    assert_same_logits(model, out, x)

    static = model.extract(arch)
    retrain = tmp_path / "retrain.pth"
    save_checkpoint({"model": static.state_dict(), "arch": arch, "model_args": static.model_args}, retrain)
    assert main(["export", "--checkpoint", str(retrain), str(tmp_path / "retrained")]) == 0
    assert_same_logits(static, tmp_path / "retrained", x)

    assert main(["export", "--checkpoint", str(ckpt), str(tmp_path / "no-arch")]) == 2
    assert "--arch" in capsys.readouterr().err
    bad = dict(arch, embed_dim=20)
    assert main(["export", "--checkpoint", str(ckpt), "--arch", json.dumps(bad), str(tmp_path / "bad")]) == 2
    assert "embed_dim" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "missing.pth"), str(tmp_path / "x")]) == 2
    assert not (tmp_path / "no-arch").exists() and not (tmp_path / "bad").exists()
