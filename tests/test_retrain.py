"""Retraining on digits: it learns, its checkpoint evaluates to what it logged, it resumes."""
import json
from pathlib import Path

import pytest
import torch

from vitas.core.checkpoint import load_checkpoint, save_checkpoint
from vitas.core.config import RetrainConfig, SupernetConfig, load_config
from vitas.core.data import write_digits
from vitas.core.engine import check_recipe
from vitas.core.errors import UserError
from vitas.retrain.train import read_arch, supernet_weights, train_arch
from vitas.supernet.model import Superformer
from vitas.supernet.space import SearchSpace
from vitas.cli import main

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "yamls" / "demo-digits.yaml"
ARCH = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": [2, 2], "attn_dim": [32, 32],
        "mlp_dim": [64, 64]}
# A short, augmentation-free recipe that learns digits in seconds on one CPU core.
FAST = ["retrain.epochs=6", "retrain.lr=5e-3", "retrain.warmup_epochs=0", "retrain.log_every_steps=5",
        "data.smoothing=0", "data.scale=[1.0, 1.0]"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`vitas retrain` of ARCH on digits: (output dir, data dir, final stdout JSON)."""
    tmp = tmp_path_factory.mktemp("retrain")
    data, out = tmp / "digits", tmp / "run"
    write_digits(data)
    (tmp / "arch.json").write_text(json.dumps(ARCH))
    code = main(["retrain", "-c", str(YAML), "--arch", str(tmp / "arch.json"), f"output_dir={out}",
                 f"data.root={data}", *FAST])
    assert code == 0
    return out, data


def test_retrain_learns(run):
    out, _ = run
    stage = out / "retrain"
    losses = [r["train/loss"] for r in map(json.loads, (stage / "log.jsonl").read_text().splitlines())
              if "train/loss" in r]
    assert len(losses) >= 20
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["top1"] > 30.0  # chance is 10 %
    assert summary["images"] == 360 and summary["epochs"] == 6 and summary["arch"] == ARCH
    assert summary["best_top1"] >= summary["top1"]
    assert sorted(p.name for p in stage.iterdir() if p.name.startswith(".")) == []  # no temp files
    assert (stage / "config.yaml").is_file()


def test_checkpoint_contents(run):
    out, _ = run
    state = load_checkpoint(out / "retrain" / "last.pth")
    assert state["arch"] == ARCH and state["model_args"]["arch"] == ARCH
    assert state["model_args"]["num_classes"] == 10 and state["epoch"] == 6
    assert state["class_names"] == [str(i) for i in range(10)]
    assert set(state["model"]) >= {"patch_embed.proj.weight", "pos_embed", "head.weight"}
    assert SearchSpace(load_config(YAML).space).spec() == state["space"]
    assert {"optimizer", "scheduler", "rng", "config"} <= set(state)
    assert 0 < state["train_seconds"] <= json.loads((out / "retrain" / "summary.json").read_text())["train_seconds"] + 0.1


def test_evaluate_reproduces_training_accuracy(run, capsys):
    out, data = run
    logged = [r for r in map(json.loads, (out / "retrain" / "log.jsonl").read_text().splitlines())
              if "val/top1" in r][-1]
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out / "retrain" / "last.pth"), "--data", str(data)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == {"top1": logged["val/top1"], "top5": logged["val/top5"], "images": 360}


def test_finished_run_resumes_without_training(run):
    out, data = run
    cfg = load_config(YAML, [f"output_dir={out}", f"data.root={data}", *FAST])
    before = (out / "retrain" / "last.pth").stat().st_mtime_ns
    first = json.loads((out / "retrain" / "summary.json").read_text())
    again = train_arch(cfg, ARCH, out / "retrain")
    summary = json.loads((out / "retrain" / "summary.json").read_text())
    assert again["top1"] == summary["top1"] and again["top5"] == summary["top5"]
    # the run's training time survives the resume (it was once reported as the last session's, 0 s)
    assert first["train_seconds"] > 0 and abs(again["train_seconds"] - first["train_seconds"]) < 0.5
    assert (out / "retrain" / "last.pth").stat().st_mtime_ns == before  # nothing was retrained
    other = dict(ARCH, embed_dim=64, mlp_dim=[128, 128])
    with pytest.raises(UserError, match="another architecture"):
        train_arch(cfg, other, out / "retrain")
    trained = json.loads((out / "retrain" / "summary.json").read_text())["epochs"]
    with pytest.raises(UserError, match=f"already trained {trained} epochs"):
        train_arch(cfg, ARCH, out / "retrain", epochs=trained - 1)
    assert json.loads((out / "retrain" / "summary.json").read_text())["epochs"] == trained


def test_arch_sources_and_errors(tmp_path, capsys):
    cfg = load_config(YAML, [f"output_dir={tmp_path}"])
    with pytest.raises(UserError, match="run the search first"):
        read_arch(cfg)
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "arch.json").write_text(json.dumps(ARCH))
    assert read_arch(cfg) == ARCH
    cfg.retrain.arch = json.dumps({"arch": dict(ARCH, patch_size=16)})
    with pytest.raises(UserError, match="patch_size"):
        read_arch(cfg)
    code = main(["retrain", "-c", str(YAML), f"output_dir={tmp_path}", "--arch",
                 json.dumps(dict(ARCH, embed_dim=50))])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("vitas: error:") and "embed_dim" in err and err.count("\n") == 1
    code = main(["retrain", "-c", str(YAML), f"output_dir={tmp_path}", "retrain.init=imagenet"])
    assert code == 2 and "retrain.init" in capsys.readouterr().err


def test_init_from_supernet(tmp_path):
    cfg = load_config(YAML, [f"output_dir={tmp_path}"])
    space = SearchSpace(cfg.space)
    torch.manual_seed(0)
    supernet = Superformer(space, num_classes=10)
    state = {"model": supernet.state_dict(), "ema": None, "config": cfg.to_dict(), "space": space.spec()}
    save_checkpoint(state, tmp_path / "supernet" / "last.pth")
    weights = supernet_weights(cfg, space, space.validate(ARCH), 10)
    expected = supernet.extract(ARCH).state_dict()
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    with pytest.raises(UserError, match="superformer checkpoint not found"):
        supernet_weights(load_config(YAML, [f"output_dir={tmp_path / 'none'}"]), space, ARCH, 10)
    with pytest.raises(UserError, match="10-class head"):
        supernet_weights(cfg, space, space.validate(ARCH), 7)
    other = load_config(YAML, [f"output_dir={tmp_path}", "space.embed_dim=[48, 96]"])
    with pytest.raises(UserError, match="embed_dim"):
        supernet_weights(other, SearchSpace(other.space), ARCH, 10)


BAD_RETRAIN = [  # (overrides, text the one error line must contain)
    (["retrain.batch_size=0"], "retrain.batch_size must be >= 1, got 0"),
    (["retrain.batch_size=-5"], "retrain.batch_size must be >= 1, got -5"),
    (["retrain.epochs=0"], "retrain.epochs must be >= 1"),
    (["retrain.opt=bogus"], "retrain.opt: 'bogus' is not a timm optimizer"),
    (["retrain.opt=fancy_adamw"], "retrain.opt"),
    (["retrain.lr=-1"], "retrain.lr must be a number > 0, got -1.0"),
    (["retrain.lr=.nan"], "retrain.lr must be a number > 0, got nan"),
    (["retrain.min_lr=-1"], "retrain.min_lr"),
    (["retrain.warmup_lr=.inf"], "retrain.warmup_lr"),
    (["retrain.warmup_epochs=-1"], "retrain.warmup_epochs must be >= 0"),
    (["retrain.weight_decay=-0.1"], "retrain.weight_decay"),
    (["retrain.clip_grad=-1"], "retrain.clip_grad must be null or a number >= 0"),
    (["retrain.drop_path=1"], "retrain.drop_path must be in [0, 1)"),
    (["retrain.ema_decay=1"], "retrain.ema_decay must be in [0, 1)"),
    (["retrain.ema_decay=-0.5"], "retrain.ema_decay"),
    (["retrain.log_every_steps=-1"], "retrain.log_every_steps"),
    (["retrain.seed=-1"], "retrain.seed must be >= 0"),
    (["data.workers=-1"], "data.workers must be >= 0"),
    (["data.interpolation=foo"], "data.interpolation must be one of"),
    (["data.auto_augment=bogus"], "data.auto_augment: 'bogus' is not a timm augmentation policy"),
    (["data.scale=[1.0]"], "data.scale must be [min, max]"),
    (["data.smoothing=1"], "data.smoothing"),
    (["data.num_classes=5"], "data.num_classes=5 is fewer than the 10 class folders"),
    (["data.mixup=0.8", "retrain.batch_size=63"], "Mixup/CutMix needs an even batch per process"),
]


@pytest.mark.parametrize("overrides, needle", BAD_RETRAIN, ids=[" ".join(o) for o, _ in BAD_RETRAIN])
def test_bad_settings_are_one_line_and_write_nothing(tmp_path, tiny_digits, capsys, overrides, needle):
    out = tmp_path / "run"
    code = main(["retrain", "-c", str(YAML), "--arch", json.dumps(ARCH), f"output_dir={out}",
                 f"data.root={tiny_digits}", *overrides])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("20")]  # drop log lines
    assert code == 2 and len(lines) == 1 and lines[0].startswith("vitas: error: "), err
    assert needle in lines[0], lines[0]
    assert not out.exists()


@pytest.mark.parametrize("changes", [{}, {"opt": "sgd"}, {"opt": "AdamW"}, {"opt": "lookahead_adamw"},
                                     {"clip_grad": None}, {"clip_grad": 0.0}, {"ema_decay": 0.0},
                                     {"warmup_epochs": 0}, {"lr": 1e-9, "min_lr": 0.0}])
def test_good_recipes_pass(changes):
    for section in (RetrainConfig, SupernetConfig):
        check_recipe(section(**changes), "recipe")
