"""As-ViT through every stage of the real CLI: arch, proxy, RL search, scale, retrain with
re-tokenization of the first projection, evaluate, predict, export; and the refusals of what an
As-ViT space cannot do (it has no superformer)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from vitas.cli import main
from vitas.core.checkpoint import load_checkpoint
from vitas.core.config import load_config
from vitas.search.proxies.measures import ntk_batch, proxy_scores
from vitas.search.scoring.proxy import ProxyScorer
from vitas.supernet.asvit import AsViT
from vitas.supernet.asvit_space import AsVitSpace, to_genotype
from vitas.supernet.models import complete_model_args, create_model, model_from_args
from vitas.supernet.space import SearchSpace, space_from_config
from vitas.supernet.static import StaticViT

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "yamls" / "asvit-digits.yaml"
IMAGENET = ROOT / "yamls" / "asvit-imagenet.yaml"
FAST_PROXY = ["proxy.inits=1", "proxy.thetas=4", "proxy.ntk_images=4"]
# Table 1's topology choices with narrower models (C = 16, H in {8, 16}): seconds per architecture.
SMALL = ["space.asvit.num_heads=[8, 16]", "space.asvit.embed_dim=[16]"]
TINY = {"embed_dim": 16, "num_heads": 16, "stages": [
    {"kernel": 5, "split": 2, "expansion": 2, "depth": 1}, {"kernel": 2, "split": 1, "expansion": 2, "depth": 1},
    {"kernel": 2, "split": 1, "expansion": 2, "depth": 1}, {"kernel": 2, "split": 1, "expansion": 2, "depth": 1}]}
TABLE4 = {"seed": (2_319_624, 491_469_312), "small": (28_775_328, 5_132_134_656),
          "base": (52_258_652, 8_753_694_080), "large": (87_580_820, 22_357_813_760)}


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ space and models
def test_space_kind_selects_the_space_cost_and_model():
    asvit = space_from_config(load_config(YAML, SMALL))
    flat = space_from_config(load_config(ROOT / "yamls" / "demo-digits.yaml"))
    assert isinstance(asvit, AsVitSpace) and type(flat) is SearchSpace
    arch = asvit.sample(random.Random(0))
    model = create_model(asvit, arch, 10)
    assert isinstance(model, AsViT) and sum(p.numel() for p in model.parameters()) == asvit.cost(arch, 10).params
    flat_arch = flat.sample(random.Random(0))
    static = create_model(flat, flat_arch, 10)
    assert type(static) is StaticViT and sum(p.numel() for p in static.parameters()) == flat.cost(flat_arch, 10).params
    for m in (model, static):  # a checkpoint's model_args rebuild the same kind of model, complete
        rebuilt = model_from_args(m.model_args)
        assert type(rebuilt) is type(m) and complete_model_args(m.model_args) == rebuilt.model_args


def test_arch_commands(capsys):
    for name, (params, macs) in TABLE4.items():
        assert main(["arch", "cost", "-c", str(IMAGENET), "--arch", str(ROOT / f"yamls/archs/asvit-{name}.json")]) == 0
        assert last_json(capsys) == {"params": params, "macs": macs}
    assert main(["arch", "sample", "-c", str(YAML), "-n", "3", "--seed", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    space = space_from_config(load_config(YAML))
    assert len(lines) == 3 and all(space.validate(json.loads(line), strict=True) == json.loads(line) for line in lines)
    bad = json.dumps({**TINY, "num_heads": 16, "embed_dim": 32,
                      "stages": [dict(TINY["stages"][0], split=3)] + TINY["stages"][1:]})
    assert main(["arch", "validate", "-c", str(YAML), "--arch", bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'stages[0].split' is 3; allowed values: [2, 4, 8]" in err


def test_proxy_command_scores_the_architectures_own_model(tiny_digits, capsys):
    args = [f"data.root={tiny_digits}", *FAST_PROXY]
    assert main(["proxy", "-c", str(YAML), "--arch", json.dumps(TINY), *args]) == 0
    printed = last_json(capsys)
    cfg = load_config(YAML, args)
    with torch.random.fork_rng(devices=[]):
        model = AsViT(TINY, num_classes=10, img_size=32).eval()
    direct = proxy_scores(model, None, ntk_batch(cfg), cfg.proxy)
    assert printed == direct and printed["valid"]


def test_what_rank_needs_works_on_an_asvit_space(tiny_digits):
    """The ranking study's calls: cost span, sampling in a MACs range, proxies with curvature."""
    cfg = load_config(YAML, [f"data.root={tiny_digits}", *FAST_PROXY, *SMALL])
    space = space_from_config(cfg)
    cost_fn = lambda a: space.cost(a, 10)  # noqa: E731
    lo, hi = space.cost_span(cost_fn)["macs"]
    rng = np.random.default_rng(0)
    archs = [space.sample_in_range(rng, cost_fn, macs=(lo + (hi - lo) * i // 3, lo + (hi - lo) * (i + 1) // 3))
             for i in range(2)]
    records = ProxyScorer(cfg, device="cpu").compute(archs, curvature=True)
    assert [set(r) for r in records] == [{"length_distortion", "ntk_condition", "curvature", "valid"}] * 2
    assert all(r["valid"] and r["curvature"] > 0 for r in records)


# ------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("command, message", [
    (["search", "search.scorer=accuracy"], "search.scorer=accuracy needs a superformer"),
    (["train-supernet"], "has no superformer to train"),
    (["retrain", "--arch", json.dumps(TINY), "retrain.init=supernet"], "retrain.init=supernet needs a superformer"),
])
def test_no_superformer_refusals_are_one_line_and_write_nothing(tmp_path, tiny_digits, capsys, command, message):
    out = tmp_path / "run"
    code = main([command[0], "-c", str(YAML), *command[1:], f"output_dir={out}", f"data.root={tiny_digits}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("vitas: error:") and message in err and err.count("\n") == 1
    assert not out.exists()


# ------------------------------------------------------------------------------ RL search
def test_rl_search_is_deterministic_resumes_and_stays_in_budget(tmp_path, tiny_digits, capsys):
    """Two RL searches with one seed, the second stopped after 3 steps and continued to 6, give
    the same result.json (apart from the config, which names the output folder)."""
    space = space_from_config(load_config(YAML, SMALL))
    lo, hi = space.cost_span(lambda a: space.cost(a, 10))["params"]
    limit = (lo + hi) // 2
    results = []
    for run, steps in (("a", [6]), ("b", [3, 6])):
        for n in steps:
            code = main(["search", "-c", str(YAML), f"output_dir={tmp_path / run}", f"data.root={tiny_digits}",
                         "search.algorithm=rl", "search.scorer=proxy", f"search.steps={n}",
                         f"search.params_max={limit}", *FAST_PROXY, *SMALL])
            assert code == 0
        summary = last_json(capsys)
        result = json.loads((tmp_path / run / "search" / "result.json").read_text())
        assert summary["arch"] == result["chosen"]["arch"]
        results.append({k: v for k, v in result.items() if k != "config"})
    assert results[0] == results[1]
    result = results[0]
    assert result["progress"] == {"steps": 6} and result["scorer"]["name"] == "proxy"
    assert result["chosen"]["params"] <= limit and result["chosen"]["scores"]["valid"]
    assert space.validate(result["chosen"]["arch"], strict=True) == result["chosen"]["arch"]
    for record in result["evaluated"]:
        assert record["feasible"] == (record["params"] <= limit)
        assert record["params"] == space.cost(record["arch"], 10).params
    arch = json.loads((tmp_path / "a" / "search" / "arch.json").read_text())
    assert arch == result["chosen"]["arch"]


# ------------------------------------------------------------------------------ auto-scaling
def test_scale_grows_monotonically_stops_at_the_limit_and_resumes(tmp_path, tiny_digits, capsys):
    seed = {"embed_dim": 48, "num_heads": 8, "stages": [  # C and depths are reset to 32 and 1
        {"kernel": 4, "split": 2, "expansion": 2, "depth": 2}, {"kernel": 2, "split": 1, "expansion": 2, "depth": 1},
        {"kernel": 2, "split": 1, "expansion": 2, "depth": 1}, {"kernel": 2, "split": 1, "expansion": 2, "depth": 3}]}
    limit = 1_500_000
    args = ["scale", "-c", str(YAML), f"output_dir={tmp_path}", f"data.root={tiny_digits}", "--seed-arch",
            json.dumps(seed), f"scale.param_limit={limit}", "space.asvit.num_heads=[8, 16]", *FAST_PROXY]
    assert main(args) == 0
    summary = last_json(capsys)
    folder = tmp_path / "scale"
    traj = json.loads((folder / "trajectory.json").read_text())
    steps = traj["steps"]
    assert steps[0]["arch"]["embed_dim"] == 32 and [s["depth"] for s in steps[0]["arch"]["stages"]] == [1] * 4
    assert len(steps) >= 2 and steps[-1]["params"] >= limit > steps[-2]["params"]
    for before, after in zip(steps, steps[1:]):
        assert after["params"] > before["params"] and after["macs"] > before["macs"]
        assert after["arch"]["embed_dim"] > before["arch"]["embed_dim"]
        assert sum(s["depth"] for s in after["arch"]["stages"]) == sum(s["depth"] for s in before["arch"]["stages"]) + 1
        assert 4 <= len(after["candidates"]) <= 16 and after["choice"]["ratio"] in (1.05, 1.1, 1.15, 1.2)
    assert summary["steps"] == len(steps) - 1 and summary["arch"] == steps[-1]["arch"]
    files = sorted((folder / "archs").iterdir())
    assert [f.name for f in files] == [f"step{s['step']:03d}-{s['params'] / 1e6:.2f}M.json" for s in steps]
    record = json.loads(files[-1].read_text())
    assert record["arch"] == steps[-1]["arch"] and record["genotype"] == to_genotype(steps[-1]["arch"])
    assert main(["arch", "cost", "-c", str(YAML), "--arch", str(files[-1]), "space.asvit.num_heads=[8, 16]"]) == 0
    assert last_json(capsys) == {"params": steps[-1]["params"], "macs": steps[-1]["macs"]}

    # An interrupted run (its last step lost) continues to the same trajectory.
    (folder / "trajectory.json").write_text(json.dumps(dict(traj, steps=steps[:-1])))
    files[-1].unlink()
    assert main(args) == 0
    capsys.readouterr()
    assert json.loads((folder / "trajectory.json").read_text()) == traj and files[-1].is_file()
    # A finished one is not grown again; other settings are refused.
    mtime = (folder / "trajectory.json").stat().st_mtime_ns
    assert main(args) == 0 and (folder / "trajectory.json").stat().st_mtime_ns == mtime
    capsys.readouterr()
    assert main(args[:-len(FAST_PROXY)] + ["proxy.inits=2", "proxy.thetas=4", "proxy.ntk_images=4"]) == 2
    assert "grown with other settings (proxy differs)" in capsys.readouterr().err


# ------------------------------------------------------------------------------ retrain and after
@pytest.fixture(scope="module")
def retrained(tmp_path_factory, tiny_digits):
    """`vitas retrain` of TINY for 2 epochs, the first re-tokenized at factor 2: (output dir, stdout)."""
    out = tmp_path_factory.mktemp("asvit-retrain")
    code = main(["retrain", "-c", str(YAML), "--arch", json.dumps(TINY), f"output_dir={out}",
                 f"data.root={tiny_digits}", "retrain.epochs=2", "retrain.retokenize=[[0, 2], [1, 1]]",
                 "retrain.warmup_epochs=0", "retrain.batch_size=32"])
    assert code == 0
    return out


def test_retrain_retokenizes_the_first_projection(retrained):
    stage = retrained / "retrain"
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["arch"] == TINY and summary["epochs"] == 2 and summary["images"] == 40
    space = space_from_config(load_config(YAML))
    assert (summary["params"], summary["macs"]) == tuple(space.cost(TINY, 10))
    retok = summary["retokenize"]
    assert [(s["factor"], s["stride"], s["dilation"], s["grids"], s["tokens"]) for s in retok["stages"]] == [
        (2, 8, 2, [4, 2, 1, 1], 16), (1, 4, 1, [8, 4, 2, 1], 64)]  # K1 = 5: footnote 3's dilation 2
    assert retok["stages"][0]["macs_per_image"] == space.cost(TINY, 10, stem_stride=8).macs
    assert retok["stages"][1]["macs_per_image"] == summary["macs"]
    coarse, full = retok["stages"][0]["macs_per_image"], summary["macs"]
    assert retok["full_train_macs"] == full * 2 * 96  # 2 epochs of 3 steps x 32 images (120 images)
    assert retok["saved_fraction"] == pytest.approx(1 - (coarse + full) / (2 * full))
    tokens = [r["tokens"] for r in map(json.loads, (stage / "log.jsonl").read_text().splitlines()) if "tokens" in r]
    assert tokens == [16, 64]
    state = load_checkpoint(stage / "last.pth")
    assert state["model_args"] == space.model_args(TINY, 10) and state["arch"] == TINY
    assert state["space"] == space.spec() and "stem.proj.weight" in state["model"]


def test_evaluate_predict_and_export(retrained, tiny_digits, tmp_path, capsys):
    ckpt = retrained / "retrain" / "last.pth"
    logged = [r for r in map(json.loads, (retrained / "retrain" / "log.jsonl").read_text().splitlines())
              if "val/top1" in r][-1]
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(tiny_digits)]) == 0
    assert last_json(capsys) == {"top1": logged["val/top1"], "top5": logged["val/top5"], "images": 40}

    image = sorted((tiny_digits / "val" / "3").iterdir())[0]
    assert main(["predict", "--checkpoint", str(ckpt), str(image), "--topk", "3"]) == 0
    top = last_json(capsys)["predictions"][0]["topk"]
    assert len(top) == 3 and top[0]["prob"] >= top[1]["prob"] >= top[2]["prob"]

    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(ckpt), str(out)]) == 0
    printed = last_json(capsys)
    assert printed["architecture"] == "vitas_asvit" and printed["arch"] == TINY
    state = load_checkpoint(ckpt)
    model = model_from_args(state["model_args"])
    model.load_state_dict(state["model"])
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert isinstance(loaded, AsViT)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    assert main(["evaluate", "--checkpoint", str(out), "--data", str(tiny_digits)]) == 0
    assert last_json(capsys) == {"top1": logged["val/top1"], "top5": logged["val/top5"], "images": 40}
