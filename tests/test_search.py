"""Search: scorer interface, pymoo GA / NSGA-II, As-ViT RL, resumability, inherited accuracy, CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from vitas.core.checkpoint import load_checkpoint, save_checkpoint
from vitas.core.config import load_config
from vitas.core.data import write_digits
from vitas.core.errors import UserError
from vitas.core.stage import execute
from vitas.search import runner
from vitas.search.algorithms.evolution import Evolution, EvolutionSettings
from vitas.search.algorithms.rl import Reinforce, ReinforceSettings
from vitas.search.archive import Archive, Budget
from vitas.search.scoring.accuracy import AccuracyScorer, holdout_batches, inherited_accuracy, sides
from vitas.search.scoring.base import Scorer, rank_sum, weighted_sum
from vitas.supernet.complexity import arch_cost
from vitas.supernet.model import Superformer
from vitas.supernet.space import space_from_config
from vitas.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "yamls" / "demo-digits.yaml"
MACS_MAX = 2_000_000


class TargetScorer(Scorer):
    """Synthetic: top1 = -(L1 distance in genome space to a target architecture); optimum 0."""

    name = "target"
    fields = ("top1",)
    reward_terms = [("top1", 1.0)]

    def __init__(self, space, target: dict, fail_after: int | None = None, kill_after: int | None = None):
        super().__init__(space)
        self.target = space.encode(target)
        self.calls = 0
        self.computed = 0
        self.fail_after, self.kill_after = fail_after, kill_after

    def compute(self, archs: list[dict]) -> list[dict]:
        self.calls += 1
        if self.kill_after is not None and self.calls > self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.computed += len(archs)
        return [{"top1": -float(np.abs(self.space.encode(a) - self.target).sum())} for a in archs]


class CostScorer(Scorer):
    """Synthetic: top1 grows with MACs, so the best feasible architecture sits at the budget's edge."""

    name = "cost"
    fields = ("top1",)
    reward_terms = [("top1", 1.0)]

    def compute(self, archs: list[dict]) -> list[dict]:
        return [{"top1": arch_cost(a, self.space, 10).macs / 1e6} for a in archs]


def demo_cfg(out: Path, *overrides: str):
    return load_config(DEMO, [f"output_dir={out}", *overrides])


def cost_fn(space):
    return lambda arch: arch_cost(arch, space, 10)


def target_arch(space, seed: int = 7) -> dict:
    return space.sample_in_range(np.random.default_rng(seed), cost_fn(space), macs=(0, MACS_MAX))


def run_search(cfg, scorer) -> dict:
    """The runner's search with `scorer` into the config's search folder."""
    return runner.search(cfg, scorer, Path(cfg.output_dir) / "search")


def strip(result: dict) -> dict:
    """A result without the parts that name the output folder."""
    return {k: v for k, v in result.items() if k != "config"}


# ------------------------------------------------------------------------------ scorer interface
def test_score_caches_canonical_archs_and_fitness_puts_invalid_last() -> None:
    space = space_from_config(load_config(DEMO))
    scorer = TargetScorer(space, target_arch(space))
    arch = space.min_arch()
    depth = space.super_depth
    padded = dict(arch, identity=[False] * arch["depth"] + [True] * (depth - arch["depth"]),
                  num_heads=arch["num_heads"] + [space.head_choices[-1]] * (depth - arch["depth"]),
                  attn_dim=arch["attn_dim"] + [space.attn_choices[-1]] * (depth - arch["depth"]),
                  mlp_dim=arch["mlp_dim"] + [space.mlp_choices[-1]] * (depth - arch["depth"]))
    del padded["depth"]
    first = scorer.score([arch, padded, arch])
    assert first[0] == first[1] == first[2] and scorer.computed == 1
    scorer.score([padded])
    assert scorer.computed == 1 and scorer.calls == 1

    records = [{"a": 3.0, "b": 1.0}, {"a": 9.0, "b": 0.0, "valid": False}, {"a": 1.0, "b": 2.0}]
    ws = weighted_sum(records, [("a", 1.0)])
    assert ws[1] < ws[2] < ws[0]
    rs = rank_sum(records, [("a", 1.0), ("b", -1.0)])
    assert rs[1] < min(rs[0], rs[2]) and rs[0] > rs[2]


# ------------------------------------------------------------------------------ algorithms
@pytest.mark.parametrize("algorithm", ["ga", "nsga2"])
def test_evolution_reaches_known_optimum_inside_budget(algorithm: str) -> None:
    """Budget: population 16, 25 generations (<= 416 archs). The GA finds the target exactly;
    NSGA-II, which spreads its population along the whole front, gets within one gene of it."""
    space = space_from_config(load_config(DEMO))
    target = target_arch(space)
    archive = Archive(space, TargetScorer(space, target), cost_fn(space), Budget(macs=(0, MACS_MAX)))
    evo = Evolution(archive, EvolutionSettings(algorithm, 16, 0.1, 0.9, 0), rounds=25)
    evo.start()
    while not evo.done:
        evo.step()
    best = archive.best()
    if algorithm == "ga":
        assert best["arch"] == space.canonical(target) and best["top1"] == 0
    else:
        assert best["top1"] >= -1
    assert len({r["key"] for r in archive.records}) == len(archive)


def test_ga_budget_is_a_real_constraint() -> None:
    """Score rises with MACs: the GA climbs to the budget's edge (within 5%) and never past it."""
    space = space_from_config(load_config(DEMO))
    lo, hi = 500_000, 1_200_000
    archive = Archive(space, CostScorer(space), cost_fn(space), Budget(macs=(lo, hi)))
    evo = Evolution(archive, EvolutionSettings("ga", 16, 0.1, 0.9, 1), rounds=15)
    evo.start()
    while not evo.done:
        evo.step()
    assert any(not r["feasible"] for r in archive.records)  # offspring did cross the budget ...
    assert all("top1" not in r for r in archive.records if not r["feasible"])  # ... unscored
    best = archive.best()
    assert 0.95 * hi <= best["macs"] <= hi
    assert all(lo <= r["macs"] <= hi for r in archive.top_k(10) + archive.pareto_front())


def test_rl_reaches_known_optimum() -> None:
    """As-ViT RL, 500 steps, lr 0.08: the argmax policy is the target architecture."""
    space = space_from_config(load_config(DEMO))
    target = target_arch(space, seed=3)
    archive = Archive(space, TargetScorer(space, target), cost_fn(space), Budget(macs=(0, MACS_MAX)))
    rl = Reinforce(archive, ReinforceSettings(lr=0.08, momentum=0.9, window=20, seed=0), rounds=500)
    start = rl.entropy()
    while not rl.done:
        rl.step()
    assert rl.argmax_arch() == space.canonical(target)
    assert rl.entropy() < 0.5 * start
    assert all(r["macs"] <= MACS_MAX for r in archive.records)


def test_nsga2_front_is_non_dominated_and_inside_budget(tmp_path: Path) -> None:
    cfg = demo_cfg(tmp_path, "search.algorithm=nsga2", "search.population=12",
                   "search.generations=6", "search.macs_min=600000", f"search.macs_max={MACS_MAX}")
    space = space_from_config(cfg)
    result = run_search(cfg, TargetScorer(space, target_arch(space)))
    front = result["pareto_front"]
    scored = [r for r in result["evaluated"] if r["feasible"]]
    assert front and len(scored) > len(front)
    for f in front:
        assert 600_000 <= f["macs"] <= MACS_MAX
        assert not any(r["fitness"] >= f["fitness"] and r["macs"] <= f["macs"]
                       and (r["fitness"] > f["fitness"] or r["macs"] < f["macs"]) for r in scored)
    for r in scored:  # every scored arch is dominated by or equal to a front member
        assert any(f["fitness"] >= r["fitness"] and f["macs"] <= r["macs"] for f in front)
    assert (tmp_path / "search" / "pareto.png").stat().st_size > 1000


# ------------------------------------------------------------------------------ runner: constraints,
# determinism, resume
@pytest.mark.parametrize("algorithm", ["ga", "nsga2", "rl", "random"])
def test_reported_archs_satisfy_constraints_and_same_seed_same_result(tmp_path: Path, algorithm: str) -> None:
    over = [f"search.algorithm={algorithm}", "search.population=10", "search.generations=4",
            "search.steps=60", "search.macs_min=700000", "search.macs_max=1500000",
            "search.params_max=80000"]
    results = []
    for name in ("a", "b"):
        cfg = demo_cfg(tmp_path / name, *over)
        space = space_from_config(cfg)
        results.append(run_search(cfg, TargetScorer(space, target_arch(space))))
    assert strip(results[0]) == strip(results[1])
    res = results[0]
    reported = [res["chosen"]] + res["pareto_front"] + res["top_k"]
    reported += [r for r in res["evaluated"] if "fitness" in r]
    for r in reported:
        assert 700_000 <= r["macs"] <= 1_500_000 and r["params"] <= 80_000
        assert arch_cost(r["arch"], space, 10) == (r["params"], r["macs"])
    arch = json.loads((tmp_path / "a" / "search" / "arch.json").read_text())
    assert arch == res["chosen"]["arch"] == space.validate(arch)
    on_disk = json.loads((tmp_path / "a" / "search" / "result.json").read_text())
    assert on_disk["chosen"] == res["chosen"] and on_disk["seed"] == 0


@pytest.mark.parametrize("algorithm,fail_after", [("ga", 3), ("nsga2", 4), ("rl", 37), ("random", 3)])
def test_interrupted_search_resumes_to_the_uninterrupted_result(tmp_path: Path, algorithm: str,
                                                                fail_after: int) -> None:
    """Raise out of the scorer in the middle of a generation (or step), start again: same result."""
    over = [f"search.algorithm={algorithm}", "search.population=10", "search.generations=6",
            "search.steps=60"]
    cfg = demo_cfg(tmp_path / "full", *over)
    space = space_from_config(cfg)
    target = target_arch(space)
    full = run_search(cfg, TargetScorer(space, target))

    cfg = demo_cfg(tmp_path / "cut", *over)
    with pytest.raises(KeyboardInterrupt):
        run_search(cfg, TargetScorer(space, target, fail_after=fail_after))
    assert not (tmp_path / "cut" / "search" / "result.json").exists()
    saved = load_checkpoint(tmp_path / "cut" / "search" / "last.pth")["search"]
    assert 0 < saved.get("generation", saved.get("step", saved.get("round", 0))) < 60
    again = TargetScorer(space, target)
    resumed = run_search(cfg, again)
    assert strip(resumed) == strip(full)
    assert again.computed < len([r for r in full["evaluated"] if r["feasible"]])  # archive reused


def test_sigkilled_search_process_resumes_to_the_same_result(tmp_path: Path) -> None:
    """SIGKILL the process running a GA in the middle of generation 3, run it again: same result."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_search import TargetScorer, demo_cfg, run_search, target_arch
        from vitas.supernet.space import space_from_config
        cfg = demo_cfg(sys.argv[1], "search.population=10", "search.generations=5")
        space = space_from_config(cfg)
        run_search(cfg, TargetScorer(space, target_arch(space), kill_after=3))
    """))
    killed = subprocess.run([sys.executable, str(script), str(tmp_path / "cut")], capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    folder = tmp_path / "cut" / "search"
    assert load_checkpoint(folder / "last.pth")["search"]["generation"] == 2
    assert not (folder / "result.json").exists()
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no torn temp files

    results = []
    for name in ("cut", "full"):
        cfg = demo_cfg(tmp_path / name, "search.population=10", "search.generations=5")
        space = space_from_config(cfg)
        results.append(strip(run_search(cfg, TargetScorer(space, target_arch(space)))))
    assert results[0] == results[1]


def test_resume_with_other_search_settings_is_a_user_error(tmp_path: Path) -> None:
    cfg = demo_cfg(tmp_path, "search.population=6", "search.generations=1")
    space = space_from_config(cfg)
    run_search(cfg, TargetScorer(space, target_arch(space)))
    cfg = demo_cfg(tmp_path, "search.population=8", "search.generations=1")
    with pytest.raises(UserError, match="search.population=6"):
        run_search(cfg, TargetScorer(space, target_arch(space)))


# ------------------------------------------------------------------------------ inherited accuracy
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits data + an (untrained, seeded) superformer checkpoint in `<out>/supernet/last.pth`."""
    base = tmp_path_factory.mktemp("tiny")
    write_digits(base / "digits")
    cfg = demo_cfg(base / "run", f"data.root={base / 'digits'}", "data.holdout_per_class=5")
    space = space_from_config(cfg)
    torch.manual_seed(0)
    model = Superformer(space, 10)
    save_checkpoint({"model": model.state_dict(), "ema": None, "config": cfg.to_dict(),
                     "space": space.spec(), "epoch": 1}, base / "run" / "supernet" / "last.pth")
    return base


def tiny_cfg(base: Path, *overrides: str):
    return demo_cfg(base / "run", f"data.root={base / 'digits'}", "data.holdout_per_class=5", *overrides)


def test_accuracy_scorer_is_holdout_top1_of_the_extracted_subnet(tiny_run: Path) -> None:
    cfg = tiny_cfg(tiny_run, "search.batch_size=16")
    scorer = AccuracyScorer(cfg)
    space = scorer.space
    archs = [space.sample(np.random.default_rng(i)) for i in range(3)]
    metrics = scorer.score(archs)
    model = scorer._model
    batches = holdout_batches(cfg, 50)
    for arch, m in zip(archs, metrics):
        assert m["images"] == 50  # 5 per class from train/, never val/
        net = model.extract(arch).eval()
        with torch.no_grad():
            correct = sum(int((net(x).argmax(1) == y).sum()) for x, y in batches)
        assert m["top1"] == pytest.approx(100.0 * correct / 50)
    assert sides(cfg) == ("left",)


def test_finetuned_scores_leave_the_superformer_alone_and_depend_on_the_arch_only(tiny_run: Path) -> None:
    cfg = tiny_cfg(tiny_run, "search.batch_size=16", "search.finetune_steps=4", "search.finetune_batch_size=8",
                   "data.workers=0")
    scorer = AccuracyScorer(cfg)
    space = scorer.space
    a, b, c = (space.sample(np.random.default_rng(i)) for i in range(3))
    scorer.setup()
    before = {k: v.clone() for k, v in scorer._model.state_dict().items()}
    first = scorer.compute([a, b])
    assert all(torch.equal(before[k], v) for k, v in scorer._model.state_dict().items())
    assert scorer.compute([c, b, a]) == [scorer.compute([c])[0], first[1], first[0]]  # order-free
    plain = AccuracyScorer(tiny_cfg(tiny_run, "search.batch_size=16")).compute([a, b])
    assert [m["images"] for m in first] == [m["images"] for m in plain] == [50, 50]
    assert scorer.settings()["finetune_steps"] == 4 and "finetune_steps" not in AccuracyScorer(
        tiny_cfg(tiny_run)).settings()


def test_finetuning_trains_a_copy_on_the_training_split_and_scores_that_copy(tiny_run: Path) -> None:
    from vitas.search.scoring.finetune import SubnetFinetuner

    cfg = tiny_cfg(tiny_run, "search.finetune_steps=6", "search.finetune_batch_size=16", "data.workers=0")
    tuner = SubnetFinetuner(cfg)
    scorer = AccuracyScorer(cfg)
    scorer.setup()
    arch = scorer.space.sample(np.random.default_rng(0))
    key = scorer.space.key(arch)
    loader = tuner.images(key)
    assert len(loader) == 6 and not set(loader.dataset.indices) & set(split_holdout(cfg))
    assert list(tuner.images(key).dataset.indices) == list(loader.dataset.indices)  # a function of the arch
    copy, inherited = scorer._model.extract(arch), scorer._model.extract(arch).state_dict()
    losses = tuner.finetune(copy, key)
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert all(not torch.equal(v, inherited[k]) for k, v in copy.state_dict().items() if k.endswith("weight"))
    batches = holdout_batches(cfg, cfg.search.batch_size)
    with torch.no_grad():
        correct = sum(int((copy(x).argmax(1) == y).sum()) for x, y in batches)
    assert scorer.compute([arch])[0]["top1"] == pytest.approx(100.0 * correct / 50)


def split_holdout(cfg) -> list[int]:
    from vitas.core.data import build_dataset, split_train_holdout

    train = build_dataset(cfg.data, "train", cfg.space.img_size, is_training=False)
    return split_train_holdout(train, cfg.data.holdout_per_class, cfg.data.split_seed)[1]


def test_accuracy_search_refuses_to_resume_on_a_retrained_superformer(tiny_run: Path, tmp_path: Path) -> None:
    """Inherited accuracies cached from one superformer are not ranked against another's."""
    ckpt = tmp_path / "supernet.pth"
    state = load_checkpoint(tiny_run / "run" / "supernet" / "last.pth")
    save_checkpoint(state, ckpt)
    args = (f"output_dir={tmp_path}", f"supernet.checkpoint={ckpt}", "search.population=4")
    execute(runner.STAGE, tiny_cfg(tiny_run, *args, "search.generations=1"))
    save_checkpoint({**state, "epoch": 2}, ckpt)  # trained on for another epoch
    with pytest.raises(UserError, match=r"checkpoint.progress=\[1, None\]"):
        execute(runner.STAGE, tiny_cfg(tiny_run, *args, "search.generations=2"))
    save_checkpoint(state, ckpt)
    with pytest.raises(UserError, match="data.holdout_per_class=5"):
        execute(runner.STAGE, tiny_cfg(tiny_run, *args, "search.generations=2", "data.holdout_per_class=4"))


def test_bilateral_accuracy_averages_left_and_right_and_ema_is_preferred(tiny_run: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(tiny_run, f"output_dir={tmp_path}", "space.channels.mlp=bilateral")
    space = space_from_config(cfg)
    torch.manual_seed(1)
    model, ema = Superformer(space, 10), Superformer(space, 10)
    save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(), "config": cfg.to_dict(),
                     "space": space.spec(), "epoch": 1}, tmp_path / "supernet" / "last.pth")
    scorer = AccuracyScorer(cfg)
    assert sides(cfg) == ("left", "right")
    arch = space.sample(np.random.default_rng(0))
    (m,) = scorer.score([arch])
    ema.eval()
    batches = holdout_batches(cfg, 64)
    expected = [inherited_accuracy(ema, arch, batches, passes=(side,))["top1"] for side in ("left", "right")]
    assert m["top1"] == pytest.approx(sum(expected) / 2)

    other = tiny_cfg(tiny_run, f"output_dir={tmp_path}", "space.channels.mlp=bilateral",
                     "space.embed_dim=[48]")
    with pytest.raises(UserError, match="embed_dim"):
        AccuracyScorer(other).setup()


def test_vitas_search_cli_writes_outputs_and_retrain_yaml(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    out = tiny_run / "cli"
    args = ["search", "-c", str(DEMO), f"output_dir={out}", f"data.root={tiny_run / 'digits'}",
            "data.holdout_per_class=5", f"supernet.checkpoint={tiny_run / 'run' / 'supernet' / 'last.pth'}",
            "search.population=6", "search.generations=2"]
    assert cli_main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    folder = out / "search"
    arch = json.loads((folder / "arch.json").read_text())
    assert arch == summary["arch"] and summary["macs"] <= MACS_MAX
    retrain = load_config(folder / "retrain.yaml")
    assert Path(retrain.retrain.arch) == folder / "arch.json" and retrain.output_dir == str(out)
    assert yaml.safe_load((folder / "config.yaml").read_text())["search"]["generations"] == 2
    result = json.loads((folder / "result.json").read_text())
    assert result["chosen"]["scores"]["top1"] == summary["scores"]["top1"]
    assert all(r["scores"]["images"] == 50 for r in result["evaluated"] if r["feasible"])
    assert (folder / "pareto.png").is_file()

    assert cli_main(args[:-1] + ["search.algorithm=bogus"]) == 2
    assert "search.algorithm must be one of" in capsys.readouterr().err
