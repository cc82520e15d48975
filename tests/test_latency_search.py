"""Latency in the search: bounds hold for every reported architecture (GA, NSGA-II, RL, random),
latency as NSGA-II's cost axis, near-limit choices re-measured (one measured past the limit is not
chosen), resume refused on a rebuilt model, one-line refusals before anything is written, and
`vitas arch cost` with a latency model."""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from vitas.cli import main
from vitas.core.checkpoint import save_checkpoint
from vitas.core.config import load_config
from vitas.core.errors import UserError
from vitas.inference.latency import LatencyMismatchWarning, LatencySetting, build_latency_model, load_latency_model
from vitas.search import runner
from vitas.search.archive import Budget
from vitas.search.scoring.base import Scorer
from vitas.supernet.model import Superformer
from vitas.supernet.space import SearchSpace, space_from_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "yamls" / "demo-digits.yaml")
# Short timings (steadiness is not under test) of process CPU time (steadier on a shared machine).
FAST = LatencySetting(warmup=2, repeats=5, rounds=3, clock="cpu")
ARCH = '{"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": [2, 4], "attn_dim": [32, 64], "mlp_dim": [64, 192]}'


class MacsScorer(Scorer):
    """Synthetic: top1 grows with MACs, so the best architecture presses against a latency limit."""

    name = "macs"
    fields = ("top1",)
    reward_terms = [("top1", 1.0)]

    def compute(self, archs: list[dict]) -> list[dict]:
        return [{"top1": self.space.cost(a, 10).macs / 1e6} for a in archs]


class SlownessScorer(Scorer):
    """Synthetic: top1 is the latency model's prediction, so the best architecture is the slowest
    one a latency limit allows, within the model's margin of it."""

    name = "slowness"
    fields = ("top1",)
    reward_terms = [("top1", 1.0)]

    def __init__(self, space: SearchSpace, model_path: Path):
        super().__init__(space)
        self.model = load_latency_model(model_path)

    def compute(self, archs: list[dict]) -> list[dict]:
        return [{"top1": self.model.predict(a)} for a in archs]


class TargetScorer(Scorer):
    """Synthetic: top1 = -(L1 distance in genome space to a target architecture)."""

    name = "target"
    fields = ("top1",)
    reward_terms = [("top1", 1.0)]

    def __init__(self, space: SearchSpace, fail_after: int | None = None):
        super().__init__(space)
        self.target = space.encode(space.sample(np.random.default_rng(7)))
        self.calls, self.fail_after = 0, fail_after

    def compute(self, archs: list[dict]) -> list[dict]:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        return [{"top1": -float(np.abs(self.space.encode(a) - self.target).sum())} for a in archs]


# ---------------------------------------------------------------- latency models of the demo space
@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real lookup-table latency model of the demo space, timed here (few, short timings)."""
    out = tmp_path_factory.mktemp("latency")
    space = SearchSpace(load_config(DEMO).space)
    return build_latency_model(space, 10, FAST, "lut", samples=6, holdout=0, seed=0).save(out / "latency.json")


def variant(source: Path, path: Path, scale: float = 1.0, margin_pct: float | None = None,
            machine: str | None = None) -> Path:
    """A copy of a latency model whose predictions are `scale` times the calibrated ones, whose
    margin (the p90 hold-out error) is `margin_pct` percent, or that says it was measured on
    another `machine`; it re-measures with the fewest timed calls (predictions a factor 4 off are
    what the tests tell apart)."""
    data = json.loads(source.read_text())
    data["setting"].update(warmup=0, repeats=2, rounds=1)
    data["calibration"] = {k: scale * v for k, v in data["calibration"].items()}
    if margin_pct is not None:
        data["holdout"] = {"median_ape": margin_pct, "p90_ape": margin_pct, "max_ape": margin_pct, "archs": 4}
    if machine is not None:
        data["machine"]["device"]["name"] = machine
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def span(path: Path) -> tuple[float, float]:
    """Predicted latency of the demo space's cheapest and costliest architectures, in order (a
    model fitted to few noisy timings may even rank them the other way)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LatencyMismatchWarning)  # a model from "another machine"
        model = load_latency_model(path)
    space = model.search_space()
    return tuple(sorted((model.predict(space.min_arch()), model.predict(space.max_arch()))))


def between(path: Path, low: float, high: float) -> tuple[float, float]:
    """Latency bounds at fractions `low` and `high` of the model's predicted span."""
    lo, hi = span(path)
    return round(lo + low * (hi - lo), 6), round(lo + high * (hi - lo), 6)


def typical(path: Path, q: float, n: int = 200) -> float:
    """The `q` quantile of the model's predictions over `n` random architectures of its space: a
    limit with many architectures just under it, however skewed a few noisy timings left the model."""
    model = load_latency_model(path)
    space, rng = model.search_space(), np.random.default_rng(0)
    return round(float(np.quantile([model.predict(space.sample(rng)) for _ in range(n)], q)), 6)


def demo_cfg(out: Path, model: Path, *overrides: str):
    return load_config(DEMO, [f"output_dir={out}", f"latency.model={model}", "latency.clock=cpu", "search.macs_min=null",
                              "search.macs_max=null", *overrides])


def run_search(cfg, scorer: Scorer) -> dict:
    return runner.search(cfg, scorer, Path(cfg.output_dir) / "search")


def reported(result: dict) -> list[dict]:
    """Every architecture a result reports as a candidate: chosen, front, top-k, every scored one."""
    return [result["chosen"], *result["pareto_front"], *result["top_k"],
            *[r for r in result["evaluated"] if "fitness" in r]]


def strip(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "config"}


# ---------------------------------------------------------------- constraints
@pytest.mark.parametrize("algorithm", ["ga", "nsga2", "rl", "random"])
def test_latency_bounds_hold_for_every_reported_architecture(tmp_path: Path, measured: Path, algorithm: str) -> None:
    lo, hi = between(measured, 0.2, 0.55)
    cfg = demo_cfg(tmp_path, measured, f"search.algorithm={algorithm}", "search.population=10",
                   "search.generations=3", "search.steps=40", f"search.latency_min={lo}", f"search.latency_max={hi}")
    space = space_from_config(cfg)
    result = run_search(cfg, MacsScorer(space))
    model = load_latency_model(measured)
    if algorithm in ("ga", "nsga2"):
        assert any(not r["feasible"] for r in result["evaluated"])  # offspring crossed the bounds
    for r in reported(result):
        assert lo <= r["latency_ms"] <= hi
        assert r["latency_ms"] == pytest.approx(model.predict(r["arch"]), rel=1e-12)
    for r in [result["chosen"], *result["pareto_front"], *result["top_k"]]:  # re-measured ones too
        assert lo <= r.get("latency_measured_ms", lo) <= hi
    assert all("latency_ms" in r for r in result["evaluated"])  # infeasible ones are costed too
    assert result["budget"]["latency_ms"] == [lo, hi] and result["budget"]["primary"] == "macs"
    described = result["latency_model"]
    assert Path(described["path"]) == measured and described["predictor"] == "lut"
    assert described["margin"] == pytest.approx(model.margin)
    on_disk = json.loads((tmp_path / "search" / "result.json").read_text())
    assert on_disk["chosen"]["latency_ms"] == result["chosen"]["latency_ms"]


def test_latency_as_nsga2_axis_gives_a_front_non_dominated_in_fitness_and_latency(tmp_path: Path,
                                                                                    measured: Path) -> None:
    exact = variant(measured, tmp_path / "exact.json", margin_pct=0.0)  # nothing near a limit to re-measure
    _, hi = between(exact, 0.0, 0.7)
    cfg = demo_cfg(tmp_path / "run", exact, "search.algorithm=nsga2", "search.constraint=latency",
                   "search.population=12", "search.generations=5", f"search.latency_max={hi}")
    space = space_from_config(cfg)
    result = run_search(cfg, TargetScorer(space))
    assert result["budget"]["primary"] == "latency_ms"
    front, scored = result["pareto_front"], [r for r in result["evaluated"] if "fitness" in r]
    assert front and len(scored) > len(front)
    assert [f["latency_ms"] for f in front] == sorted(f["latency_ms"] for f in front)
    for f in front:
        assert f["latency_ms"] <= hi
        assert not any(r["fitness"] >= f["fitness"] and r["latency_ms"] <= f["latency_ms"]
                       and (r["fitness"] > f["fitness"] or r["latency_ms"] < f["latency_ms"]) for r in scored)
    for r in scored:  # every scored architecture is dominated by or equal to a front member
        assert any(f["fitness"] >= r["fitness"] and f["latency_ms"] <= r["latency_ms"] for f in front)
    assert (tmp_path / "run" / "search" / "pareto.png").stat().st_size > 1000


def test_latency_as_the_axis_without_a_bound_records_latency(tmp_path: Path, measured: Path) -> None:
    """`search.constraint=latency` alone (GA): no bound, but every architecture's latency is recorded."""
    cfg = demo_cfg(tmp_path, measured, "search.constraint=latency", "search.population=6", "search.generations=1")
    result = run_search(cfg, TargetScorer(space_from_config(cfg)))
    assert all(r["feasible"] and r["latency_ms"] > 0 for r in result["evaluated"])
    assert result["latency_model"]["remeasured"] == []


# ---------------------------------------------------------------- re-measuring near a limit
def test_choice_measured_past_the_limit_is_not_chosen(tmp_path: Path, measured: Path) -> None:
    """A model predicting a fifth of the real latency with a 15% margin: every candidate predicted
    within 15% of the limit measures far past it and gives way; the choice lies outside the
    margin. A second run in the same folder reuses the measurements: the same result."""
    low = variant(measured, tmp_path / "low.json", scale=0.2, margin_pct=15.0)
    hi = typical(low, 0.5)  # a limit from the span's midpoint can sit where a skewed model predicts no one
    cfg = demo_cfg(tmp_path / "run", low, "search.population=10", "search.generations=3", f"search.latency_max={hi}")
    space = space_from_config(cfg)
    result = run_search(cfg, SlownessScorer(space, low))
    checks = result["latency_model"]["remeasured"]
    assert checks and not any(c["within_limits"] for c in checks)
    for c in checks:
        assert hi <= c["latency_ms"] * 1.15 and c["latency_measured_ms"] > hi  # near by prediction, past by measurement
        assert c["latency_shift"] > 0
    refused = {json.dumps(c["arch"]) for c in checks}
    chosen = result["chosen"]
    assert "latency_measured_ms" not in chosen and chosen["latency_ms"] * 1.15 < hi
    for r in [chosen, *result["top_k"], *result["pareto_front"]]:
        assert json.dumps(r["arch"]) not in refused
    best = max((r for r in result["evaluated"] if "fitness" in r), key=lambda r: r["fitness"])
    assert json.dumps(best["arch"]) in refused  # the measurement did change the choice
    assert best["latency_measured_ms"] > hi  # recorded in `evaluated` too
    again = run_search(demo_cfg(tmp_path / "run", low, "search.population=10", "search.generations=3",
                                f"search.latency_max={hi}"), SlownessScorer(space, low))
    assert strip(again) == strip(result)


@pytest.mark.parametrize("bound", ["max", "min"])
def test_choice_measured_inside_the_limit_is_chosen_with_its_measurement(tmp_path: Path, measured: Path,
                                                                         bound: str) -> None:
    """Predictions four times too high (max bound) or a sixth of the real value (min bound), 300%
    margin: the first choice is re-measured and, being well inside, is chosen with its number."""
    scale = 4.0 if bound == "max" else 1 / 6
    model = variant(measured, tmp_path / "off.json", scale=scale, margin_pct=300.0)
    limit = between(model, 0.0, 0.5)[1]
    cfg = demo_cfg(tmp_path / "run", model, "search.population=8", "search.generations=1",
                   f"search.latency_{bound}={limit}")
    result = run_search(cfg, MacsScorer(space_from_config(cfg)))
    chosen = result["chosen"]
    measured_ms = chosen["latency_measured_ms"]
    assert (measured_ms <= limit) if bound == "max" else (measured_ms >= limit)
    assert [c["within_limits"] for c in result["latency_model"]["remeasured"]] == [True]


def test_model_from_another_machine_skips_remeasuring_with_one_warning(tmp_path: Path, measured: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    other = variant(measured, tmp_path / "other.json", margin_pct=300.0, machine="Some Other CPU")
    _, hi = between(other, 0.0, 0.5)
    cfg = demo_cfg(tmp_path / "run", other, "search.population=8", "search.generations=1", f"search.latency_max={hi}")
    with pytest.warns(LatencyMismatchWarning, match="Some Other CPU"), caplog.at_level(logging.WARNING):
        result = run_search(cfg, MacsScorer(space_from_config(cfg)))
    warned = [r for r in caplog.records if "cannot be re-measured" in r.getMessage()]
    assert len(warned) == 1 and "Some Other CPU" in warned[0].getMessage()
    assert "Some Other CPU" in result["latency_model"]["remeasure_skipped"]
    assert result["latency_model"]["remeasured"] == []
    assert not any("latency_measured_ms" in r for r in result["evaluated"])


# ---------------------------------------------------------------- resume
def test_interrupted_latency_search_resumes_to_the_uninterrupted_result(tmp_path: Path, measured: Path) -> None:
    exact = variant(measured, tmp_path / "exact.json", margin_pct=0.0)
    lo, hi = between(exact, 0.1, 0.6)
    over = ["search.population=10", "search.generations=4", f"search.latency_min={lo}", f"search.latency_max={hi}"]
    space = space_from_config(demo_cfg(tmp_path, exact))
    full = run_search(demo_cfg(tmp_path / "full", exact, *over), TargetScorer(space))
    cut = demo_cfg(tmp_path / "cut", exact, *over)
    with pytest.raises(KeyboardInterrupt):
        run_search(cut, TargetScorer(space, fail_after=3))
    assert strip(run_search(cut, TargetScorer(space))) == strip(full)


def test_resume_with_a_rebuilt_latency_model_is_refused(tmp_path: Path) -> None:
    space = SearchSpace(load_config(DEMO).space)
    path = tmp_path / "latency.json"
    build_latency_model(space, 10, FAST, "lut", samples=2, holdout=0, seed=0).save(path)
    _, hi = between(path, 0.0, 0.6)
    cfg = demo_cfg(tmp_path / "run", path, "search.population=6", "search.generations=1", f"search.latency_max={hi}")
    run_search(cfg, TargetScorer(space_from_config(cfg)))
    build_latency_model(space, 10, FAST, "lut", samples=2, holdout=0, seed=0).save(path)  # timed again
    more = demo_cfg(tmp_path / "run", path, "search.population=6", "search.generations=2", f"search.latency_max={hi}")
    with pytest.raises(UserError, match="latency model .* rebuilt or changed since") as info:
        run_search(more, TargetScorer(space_from_config(more)))
    assert "\n" not in str(info.value)


def test_resume_with_another_latency_bound_is_refused(tmp_path: Path, measured: Path) -> None:
    _, hi = between(measured, 0.0, 0.6)
    cfg = demo_cfg(tmp_path, measured, "search.population=6", "search.generations=1", f"search.latency_max={hi}")
    run_search(cfg, TargetScorer(space_from_config(cfg)))
    other = demo_cfg(tmp_path, measured, "search.population=6", "search.generations=2", f"search.latency_max={hi * 1.1}")
    with pytest.raises(UserError, match="search.latency_max"):
        run_search(other, TargetScorer(space_from_config(other)))


# ---------------------------------------------------------------- refusals before anything is written
def one_error_line(err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if not line.startswith("20")]  # drop log lines
    assert len(lines) == 1 and lines[0].startswith("vitas: error: ") and needle in lines[0], err


REFUSALS = {
    "bound without a model": (["search.latency_max=1.0"], "search.latency_max needs a latency model"),
    "lower bound without a model": (["search.latency_min=0.5"], "search.latency_min needs a latency model"),
    "axis without a model": (["search.algorithm=nsga2", "search.constraint=latency"],
                             "search.constraint=latency needs a latency model"),
    "empty range": (["search.latency_min=2", "search.latency_max=1"], "search.latency_min 2.0 is larger"),
    "negative bound": (["search.latency_max=-1"], "search.latency_max must be"),
    "hierarchical space": (["-c", str(ROOT / "yamls" / "asvit-digits.yaml"), "search.latency_max=1.0"],
                           "space.kind=asvit"),
}


@pytest.mark.parametrize("how", ["search", "submit"])
@pytest.mark.parametrize("name", list(REFUSALS))
def test_latency_refusals_are_one_line_exit_2_and_write_nothing(name: str, how: str, tiny_digits: Path,
                                                                tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args, needle = REFUSALS[name]
    config = args[1] if args[0] == "-c" else DEMO
    overrides = [a for a in args if a.startswith("search.")]
    out = tmp_path / "run"
    command = ["search"] if how == "search" else ["submit", "search", "launch.executor=local"]
    code = main([*command, "-c", config, f"output_dir={out}", f"data.root={tiny_digits}", "search.scorer=proxy",
                 *overrides])
    assert code == 2
    one_error_line(capsys.readouterr().err, needle)
    assert not out.exists()


def test_infeasible_latency_bound_is_refused_naming_the_predicted_range(tmp_path: Path, measured: Path,
                                                                         tiny_digits: Path) -> None:
    lo, _ = span(measured)
    cfg = demo_cfg(tmp_path, measured, "search.scorer=proxy", f"data.root={tiny_digits}", f"search.latency_max={lo / 2}")
    with pytest.raises(UserError, match=r"predicted latency in \[None, .*predicted at") as info:
        runner.check(cfg)
    assert "\n" not in str(info.value)
    assert not tmp_path.joinpath("search").exists()


# ---------------------------------------------------------------- through the command line
def test_vitas_search_reports_latency(tiny_digits: Path, tmp_path: Path, measured: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    """`vitas search` (inherited accuracy from a seeded untrained superformer) with a latency bound:
    the summary, result.json and the resume signature carry the latency."""
    out = tmp_path / "run"
    base = demo_cfg(out, measured, f"data.root={tiny_digits}", "data.holdout_per_class=2")
    space = space_from_config(base)
    torch.manual_seed(0)
    save_checkpoint({"model": Superformer(space, 10).state_dict(), "ema": None, "config": base.to_dict(),
                     "space": space.spec(), "epoch": 1}, out / "supernet" / "last.pth")
    _, hi = between(measured, 0.0, 0.6)
    args = ["search", "-c", DEMO, f"output_dir={out}", f"latency.model={measured}", "latency.clock=cpu",
            f"data.root={tiny_digits}",
            "data.holdout_per_class=2", "search.macs_max=null", "search.population=6", "search.generations=1",
            f"search.latency_max={hi}"]
    assert main(args) == 0
    captured = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(captured[-1])
    assert 0 < summary["latency_ms"] <= hi and "latency" in "\n".join(captured[:-1])
    result = json.loads((out / "search" / "result.json").read_text())
    assert result["chosen"]["latency_ms"] == summary["latency_ms"]
    assert all(r["latency_ms"] > 0 and "latency_ms" not in r.get("scores", {}) for r in result["evaluated"])
    assert result["latency_model"]["setting"]["batch_size"] == 1
    signature = runner.signature(load_config(DEMO, args[3:]), runner.create_scorer(load_config(DEMO, args[3:])),
                                 runner.search_latency(load_config(DEMO, args[3:])))
    assert signature["latency.model"] == str(measured.resolve()) and len(signature["latency.sha256"]) == 64


def test_arch_cost_prints_predicted_latency_when_a_model_exists(tmp_path: Path, measured: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    assert main(["arch", "cost", "-c", DEMO, f"output_dir={tmp_path}", "--arch", ARCH]) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(plain) == {"params", "macs"}  # no latency model for this config
    clock = "latency.clock=cpu"
    assert main(["arch", "cost", "-c", DEMO, f"output_dir={tmp_path}", f"latency.model={measured}", clock, "--arch", ARCH]) == 0
    cost = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model = load_latency_model(measured)
    assert cost["latency_ms"] == pytest.approx(model.predict(json.loads(ARCH)))
    assert (cost["params"], cost["macs"]) == (plain["params"], plain["macs"])
    (tmp_path / "latency").mkdir()
    (tmp_path / "latency" / "latency.json").write_text(measured.read_text())  # the default place
    assert main(["arch", "cost", "-c", DEMO, f"output_dir={tmp_path}", clock, "--arch", ARCH]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == cost
    assert main(["arch", "cost", "-c", DEMO, f"output_dir={tmp_path}", clock, "latency.batch_size=4", "--arch", ARCH]) == 2
    assert "latency.batch_size=4" in capsys.readouterr().err


def test_budget_constraints_are_relative_to_the_bound() -> None:
    budget = Budget(macs=(0, 2_000_000), latency_ms=(0.5, 0.8))
    g = budget.violations({"macs": 1_000_000, "params": 1, "latency_ms": 0.88})
    assert g == pytest.approx([-1_000_000, -0.5, -0.76, 0.1])  # (min - c) / |min| (0: / 1), (c - max) / |max|
    assert budget.near_latency_limit(0.75, margin=0.1) == 0.8 and budget.near_latency_limit(0.65, margin=0.1) is None
    assert budget.near_latency_limit(0.52, margin=0.1) == 0.5 and budget.uses_latency and not Budget().uses_latency
