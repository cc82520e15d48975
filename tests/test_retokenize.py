"""Progressive re-tokenization: weights keep their shapes, tokens follow the schedule, MACs add up."""
import json
from pathlib import Path

import pytest
import torch

from flop_count import torch_macs

from vitas.core.config import load_config
from vitas.core.data import write_digits
from vitas.core.errors import UserError
from vitas.retrain.retokenize import (ElasticTokenViT, apply_stage, build_schedule, footnote_dilation,
                                stage_at, stage_macs, training_macs)
from vitas.retrain.train import train_arch
from vitas.supernet.space import SearchSpace
from vitas.supernet.static import StaticViT

ROOT = Path(__file__).resolve().parents[1]
ARCH = {"patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": [2, 4], "attn_dim": [32, 64],
        "mlp_dim": [64, 128]}


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return SearchSpace(load_config(ROOT / "yamls" / "demo-digits.yaml").space)


def test_footnote_dilation_matches_paper():
    # As-ViT section 4: K1 = S1 = 4 gives (stride, dilation) = (16, 5), (8, 2), (4, 1).
    assert [footnote_dilation(s, 4) for s in (16, 8, 4)] == [5, 2, 1]
    assert footnote_dilation(32, 16) == 2 and footnote_dilation(64, 16) == 4
    assert footnote_dilation(4, 1) == 1


def test_schedule_rows_and_defaults():
    sched = build_schedule([[2, 4], [5, 2], [7, 1]], patch_size=4, img_size=32, epochs=10)
    assert [(s.start_epoch, s.factor, s.stride, s.dilation, s.grid) for s in sched] == [
        (0, 1, 4, 1, 8), (2, 4, 16, 5, 2), (5, 2, 8, 2, 4), (7, 1, 4, 1, 8)]
    assert [stage_at(sched, e).tokens for e in range(10)] == [65, 65, 5, 5, 5, 17, 17, 65, 65, 65]
    assert len(build_schedule([], 4, 32, 10)) == 1
    # ViT-16 at 224 px: 14x14 tokens; factor 4 (stride 64, dilation 4) leaves 3x3, factor 2 7x7.
    assert [s.grid for s in build_schedule([[0, 4], [1, 2], [2, 1]], 16, 224, 3)] == [3, 7, 14]


@pytest.mark.parametrize("rows, match", [
    ([[0, 2]], "must end at full resolution"),
    ([[0, 2], [0, 1]], "must increase"),
    ([[0, 16], [5, 1]], "leaves no token"),
    ([[0, 2], [12, 1]], "outside 0..9"),
    ([[0, 2, 5]], r"\[start_epoch, factor\]"),
    ([[0, 0]], "factor must be >= 1"),
])
def test_schedule_errors_name_the_row(rows, match):
    with pytest.raises(UserError, match=match):
        build_schedule(rows, patch_size=4, img_size=32, epochs=10)


def test_weights_unchanged_tokens_follow_schedule(space):
    torch.manual_seed(0)
    model = ElasticTokenViT(ARCH, num_classes=10, img_size=32)
    plain = StaticViT(ARCH, num_classes=10, img_size=32)
    plain.load_state_dict(model.state_dict())  # same keys and shapes as the plain ViT
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    for stage in build_schedule([[0, 4], [1, 2], [2, 1]], 4, 32, 3):
        apply_stage(model, stage)
        assert model.patch_embed(x).shape[1] == stage.tokens - 1
        assert model.patch_embed.proj.kernel_size == (4, 4)
        assert {k: v.shape for k, v in model.state_dict().items()} == shapes
        logits = model(x)
        assert logits.shape == (2, 10) and torch.isfinite(logits).all()
        logits.sum().backward()  # the reduced grid trains the full-size position embedding
        assert model.pos_embed.grad is not None and model.pos_embed.grad.abs().sum() > 0
        model.zero_grad()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    plain.eval(), model.eval()
    torch.testing.assert_close(model(x), plain(x))  # full resolution: exactly the plain ViT


def test_training_macs_match_flop_counter(space):
    model = ElasticTokenViT(ARCH, num_classes=10, img_size=32).eval()
    sched = build_schedule([[0, 4], [3, 2], [5, 1]], 4, 32, epochs=8)
    report = training_macs(ARCH, space, 10, sched, epochs=8, images_per_epoch=100)
    counted = []
    for stage in sched:
        apply_stage(model, stage)
        counted.append(torch_macs(model, 32))
        assert stage_macs(ARCH, space, 10, stage) == counted[-1]
    assert [s["epochs"] for s in report["stages"]] == [[0, 3], [3, 5], [5, 8]]
    assert [s["tokens"] for s in report["stages"]] == [5, 17, 65]
    assert report["train_macs"] == 100 * (3 * counted[0] + 2 * counted[1] + 3 * counted[2])
    assert report["full_train_macs"] == 100 * 8 * counted[2]
    assert report["saved_fraction"] == pytest.approx(1 - report["train_macs"] / report["full_train_macs"])
    assert 0.5 < report["saved_fraction"] < 0.7


def test_retrain_follows_schedule(tmp_path):
    data = tmp_path / "digits"
    write_digits(data)
    arch = dict(ARCH, patch_size=8)
    cfg = load_config(ROOT / "yamls" / "demo-digits.yaml", [
        f"output_dir={tmp_path / 'run'}", f"data.root={data}", "retrain.epochs=2",
        "retrain.batch_size=128", "retrain.warmup_epochs=0", "retrain.retokenize=[[0, 2], [1, 1]]"])
    summary = train_arch(cfg, arch, tmp_path / "run" / "retrain")
    lines = [json.loads(x) for x in (tmp_path / "run" / "retrain" / "log.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in lines if "tokens" in r] == [5, 17]  # 2x2 then 4x4 patches
    report = summary["retokenize"]
    assert [s["tokens"] for s in report["stages"]] == [5, 17]
    images = 1437 // 128 * 128
    space = SearchSpace(cfg.space)
    model = ElasticTokenViT(arch, num_classes=10, img_size=32).eval()
    expected = 0
    for stage in build_schedule([[0, 2], [1, 1]], 8, 32, 2):
        apply_stage(model, stage)
        expected += torch_macs(model, 32) * images
    assert report["train_macs"] == expected
    assert report["full_train_macs"] == 2 * images * summary["macs"]
    saved = json.loads((tmp_path / "run" / "retrain" / "summary.json").read_text())
    full = 2 * images * summary["macs"]
    assert saved["retokenize"]["saved_fraction"] == pytest.approx(1 - expected / full)
    assert space.validate(saved["arch"]) == arch
