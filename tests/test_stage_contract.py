"""The stage contract: one superformer reader, resume signatures derived from what scores depend
on, refusals that leave folders as they were, and a namespaced package."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vitas.core.checkpoint import save_checkpoint
from vitas.core.config import load_config
from vitas.core.errors import UserError
from vitas.core.stage import execute
from vitas.retrain.train import supernet_weights
from vitas.search import runner
from vitas.search.scoring.accuracy import AccuracyScorer
from vitas.stages import STAGES, get_stage
from vitas.supernet.model import Superformer
from vitas.supernet.space import space_from_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "yamls" / "demo-digits.yaml"


def cfg_for(out: Path, data: Path, *overrides: str):
    return load_config(DEMO, [f"output_dir={out}", f"data.root={data}", "data.holdout_per_class=5",
                              "search.population=4", "search.generations=1", *overrides])


def write_superformer(path: Path, cfg, ema: bool) -> None:
    space = space_from_config(cfg)
    torch.manual_seed(0)
    model, average = Superformer(space, 10), Superformer(space, 10)
    save_checkpoint({"model": model.state_dict(), "ema": average.state_dict() if ema else None,
                     "config": cfg.to_dict(), "space": space.spec(), "epoch": 1, "step": 10}, path)


@pytest.mark.parametrize("ema, policy, expect", [
    (True, "auto", "ema"), (True, "raw", "raw"), (True, "ema", "ema"), (False, "auto", "raw")])
@pytest.mark.parametrize("where", ["run", "elsewhere"])
def test_search_and_retrain_read_identical_weights(tiny_digits: Path, tmp_path: Path, ema: bool,
                                                   policy: str, expect: str, where: str) -> None:
    """The architecture that won the search is fine-tuned from the very weights it won with."""
    out = tmp_path / "run"
    path = out / "supernet" / "last.pth" if where == "run" else tmp_path / "other" / "super.pth"
    extra = [] if where == "run" else [f"supernet.checkpoint={path}"]
    cfg = cfg_for(out, tiny_digits, f"supernet.weights={policy}", *extra)
    write_superformer(path, cfg, ema)
    space = space_from_config(cfg)
    arch = space.sample(np.random.default_rng(3))
    scorer = AccuracyScorer(cfg)
    scorer.setup()
    scored = scorer._model.extract(arch).state_dict()
    retrained = supernet_weights(cfg, space, arch, 10)
    assert scored.keys() == retrained.keys()
    assert all(torch.equal(scored[k], retrained[k]) for k in scored)
    state = torch.load(path, weights_only=True)
    source = Superformer(space, 10)
    source.load_state_dict(state["ema" if expect == "ema" else "model"])
    reference = source.extract(arch).state_dict()
    assert all(torch.equal(reference[k], scored[k]) for k in scored)
    assert scorer.settings()["supernet.weights"] == expect


def test_ema_policy_without_ema_weights_is_refused(tiny_digits: Path, tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path, tiny_digits, "supernet.weights=ema")
    write_superformer(tmp_path / "supernet" / "last.pth", cfg, ema=False)
    with pytest.raises(UserError, match="has no EMA weights"):
        runner.check(cfg)


@pytest.fixture
def searched(tiny_digits: Path, tmp_path: Path) -> Path:
    """A finished one-generation accuracy search (GA) in `tmp_path`, scored with EMA weights."""
    cfg = cfg_for(tmp_path, tiny_digits)
    write_superformer(tmp_path / "supernet" / "last.pth", cfg, ema=True)
    execute(runner.STAGE, cfg)
    return tmp_path


@pytest.mark.parametrize("change", [
    "data.mean=[0.4,0.5,0.5]", "data.std=[0.3,0.5,0.5]", "data.crop_pct=0.9",
    "data.interpolation=bicubic", "data.broken_images=skip", "data.split_seed=3",
    "supernet.weights=raw", "search.mutation_prob=0.2", "search.seed=1", "search.macs_max=1500000",
    "search.finetune_steps=2",
])
def test_a_change_the_scores_or_path_depend_on_refuses_resume(searched: Path, tiny_digits: Path,
                                                              change: str) -> None:
    key = change.split("=")[0].split(".")[-1]
    with pytest.raises(UserError, match=key):
        runner.check(cfg_for(searched, tiny_digits, "search.generations=2", change))


@pytest.mark.parametrize("change", [
    "search.generations=3", "search.rl_lr=0.5", "search.rl_window=5", "search.steps=7",
    "search.batch_size=7", "data.workers=1", "proxy.inits=2", "retrain.epochs=3",
])
def test_a_change_the_search_does_not_read_keeps_resume(searched: Path, tiny_digits: Path,
                                                        change: str) -> None:
    runner.check(cfg_for(searched, tiny_digits, change))


def test_rl_resume_ignores_evolution_keys(tiny_digits: Path, tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path, tiny_digits, "search.algorithm=rl", "search.steps=3")
    write_superformer(tmp_path / "supernet" / "last.pth", cfg, ema=False)
    execute(runner.STAGE, cfg)
    runner.check(cfg_for(tmp_path, tiny_digits, "search.algorithm=rl", "search.steps=5",
                         "search.mutation_prob=0.5", "search.population=9"))
    with pytest.raises(UserError, match="rl_lr|search.lr"):
        runner.check(cfg_for(tmp_path, tiny_digits, "search.algorithm=rl", "search.steps=5",
                             "search.rl_lr=0.5"))


def test_every_stage_is_in_the_table_with_its_folder() -> None:
    folders = {get_stage(name).folder for name in STAGES}
    assert folders == {"supernet", "search", "rank", "scale", "retrain", "evaluate"}
    assert all(get_stage(name).name == name for name in STAGES)


def test_a_refusal_found_while_running_leaves_the_folder_as_it_was(tiny_digits: Path, tmp_path: Path) -> None:
    """Mixup's even-batch rule is only known once the process count is: the run refuses, and the
    folder it had created (config.yaml, lock) is gone again."""
    out = tmp_path / "run"
    arch = json.dumps({"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": [2, 2],
                       "attn_dim": [32, 32], "mlp_dim": [64, 64]})
    cfg = load_config(DEMO, [f"output_dir={out}", f"data.root={tiny_digits}", "data.mixup=0.8",
                             "retrain.batch_size=7", "retrain.epochs=1"], values=[("retrain.arch", arch)])
    with pytest.raises(UserError, match="even batch"):
        execute(get_stage("retrain"), cfg)
    assert not out.exists()


def test_regular_install_puts_only_vitas_in_site_packages(tmp_path: Path) -> None:
    """`pip install .` (not editable): only `vitas` and its metadata at the top, and an exported
    model loads through timm from that install."""
    source, target = tmp_path / "src", tmp_path / "site"
    for name in ("core", "supernet", "search", "retrain", "inference", "vitas"):  # a clean copy:
        shutil.copytree(ROOT / name, source / name,  # pip builds in the source folder
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=600,
                   cwd=tmp_path)
    top = sorted(p.name for p in target.iterdir() if p.name != "bin")
    assert top[0] == "vitas" and all(n.startswith("vitas-") and n.endswith(".dist-info") for n in top[1:])
    assert len(top) == 2, top
    script = (
        "import sys, json, timm, torch\n"
        "import vitas.supernet, vitas.core.config\n"
        "assert vitas.core.config.__file__.startswith(sys.argv[1]), vitas.core.config.__file__\n"
        "from vitas.supernet.export import export\n"
        "from vitas.supernet.static import StaticViT\n"
        "arch = {'patch_size': 8, 'embed_dim': 48, 'depth': 2, 'num_heads': [2, 4], "
        "'attn_dim': [32, 32], 'mlp_dim': [64, 128]}\n"
        "m = StaticViT(arch, num_classes=10, img_size=32).eval()\n"
        "export(m, sys.argv[2])\n"
        "back = timm.create_model('local-dir:' + sys.argv[2], pretrained=True).eval()\n"
        "x = torch.randn(2, 3, 32, 32)\n"
        "print(json.dumps(bool(torch.equal(m(x), back(x)))))\n")
    for name in ("core", "supernet", "search", "retrain", "inference"):
        assert not (target / name).exists()
    env = dict(os.environ, PYTHONPATH=str(target))
    res = subprocess.run([sys.executable, "-c", script, str(target), str(tmp_path / "export")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "true"
    bare = subprocess.run([sys.executable, "-c", "import core"], capture_output=True, env=env, cwd=tmp_path)
    assert bare.returncode != 0  # no top-level `core` (or any other stage name) is installed


def test_the_public_api_is_importable_from_vitas() -> None:
    import vitas

    for name in vitas.__all__:
        assert getattr(vitas, name) is not None
    with pytest.raises(AttributeError):
        vitas.no_such_thing  # noqa: B018


def test_every_file_the_docs_and_yamls_cite_exists() -> None:
    """Paths like docs/X.md, yamls/X.yaml, slurm/X.sh, bench/X.py named in docs, YAMLs, scripts."""
    import re

    pattern = re.compile(r"(?<![\w/])((?:docs|yamls|slurm|bench|tests)/[A-Za-z0-9_.*-]+(?:/[A-Za-z0-9_.*-]+)*)")
    sources = [*ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *ROOT.glob("yamls/*.yaml"),
               *ROOT.glob("slurm/*"), *ROOT.glob("slurm/*.md")]
    missing = []
    for source in sources:
        for match in pattern.findall(source.read_text(errors="replace")):
            path = match.rstrip(".,;:)")
            if path.startswith(("bench/results/", "yamls/x.yaml")) or path.endswith("-"):
                continue  # outputs of a run, and examples
            if not (list(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()):
                missing.append(f"{source.relative_to(ROOT)}: {path}")
    assert not missing, missing
