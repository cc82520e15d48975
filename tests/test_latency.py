"""Latency: measurement output, the predictors reproduce what they were built from, files are
checked against the setting, space and machine they are used with, bad files are one-line errors."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from vitas.cli import main
from vitas.core.config import SpaceConfig, load_config
from vitas.core.errors import UserError
from vitas.inference.latency import (LatencyMismatchWarning, LatencySetting, build_latency_model, fit_latency_model,
                                     load_latency_model, measure_arch, spread_archs)
from vitas.inference.latency.model import LatencyModel
from vitas.inference.latency.parts import FEATURES, arch_features, arch_parts, space_parts
from vitas.supernet.complexity import arch_cost
from vitas.supernet.space import SearchSpace

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "yamls" / "demo-digits.yaml")
FAST = LatencySetting(warmup=0, repeats=2, rounds=1)
ARCH = '{"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": [2, 4], "attn_dim": [32, 64], "mlp_dim": [64, 192]}'


def tiny_space(**changes) -> SearchSpace:
    cfg = dict(name="tiny", img_size=32, patch_size=[8, 16], embed_dim=[16, 32], depth=[1, 2], num_heads=[2],
               attn_dim=[16], mlp_dim=[32])
    return SearchSpace(SpaceConfig(**{**cfg, **changes}))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[LatencyModel, Path, Path]:
    """A real lookup-table model of the tiny space (few, short timings), saved, with its cache."""
    out = tmp_path_factory.mktemp("latency")
    model = build_latency_model(tiny_space(), 10, FAST, "lut", samples=3, holdout=2, seed=0,
                                cache=out / "measurements.jsonl")
    return model, model.save(out / "latency.json"), out / "measurements.jsonl"


def machine() -> dict:
    return {"device": {"type": "cpu", "name": "test cpu"}, "torch": "0"}


# ---------------------------------------------------------------- predictors reproduce their data
def test_lut_reproduces_its_table_and_calibrated_samples() -> None:
    space = tiny_space()
    rng = np.random.default_rng(0)
    table = {k: float(rng.uniform(0.1, 2.0)) for k in space_parts(space)}
    archs = spread_archs(space, 10, 6, seed=0)
    sums = [sum(table[k] for k in arch_parts(a, space.cfg)) for a in archs]
    samples = [{"arch": a, "median_ms": 1.3 * s + 0.2, "iqr_ms": 0.0} for a, s in zip(archs, sums)]
    model = fit_latency_model("lut", samples, table, FAST, machine(), space, 10)
    assert model.calibration == pytest.approx({"scale": 1.3, "offset": 0.2})
    for s in samples:
        assert model.predict(s["arch"]) == pytest.approx(s["median_ms"])
    assert model.fit["median_ape"] == pytest.approx(0.0, abs=1e-9)
    one = {"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": [2], "attn_dim": [16], "mlp_dim": [32]}
    assert model.table_sum(one) == pytest.approx(table["base/8/16"] + table["attn/17/16/16/2"] + table["mlp/17/16/32"])


def test_regression_reproduces_latencies_linear_in_its_features() -> None:
    space = SearchSpace(load_config(DEMO).space)
    archs = spread_archs(space, 10, 30, seed=1)
    true = {k: float(c) for k, c in zip(FEATURES, np.random.default_rng(1).uniform(0, 1, len(FEATURES)))}
    X = np.array([arch_features(a, space.cfg, 10) for a in archs])
    scale = np.abs(X).max(axis=0)
    y = X @ (np.array(list(true.values())) / scale) + 0.05
    samples = [{"arch": a, "median_ms": float(v), "iqr_ms": 0.0} for a, v in zip(archs, y)]
    model = fit_latency_model("regression", samples, {}, FAST, machine(), space, 10)
    assert all(c >= 0 for c in model.coef.values())
    for s in samples:
        assert model.predict(s["arch"]) == pytest.approx(s["median_ms"], rel=1e-6)


def test_built_model_holds_its_measurements_and_a_rerun_reuses_them(built) -> None:
    model, path, cache = built
    entries = {e["key"]: e for e in map(json.loads, cache.read_text().splitlines()[1:])}
    space = tiny_space()
    assert set(model.table) == set(space_parts(space))
    for key, ms in model.table.items():
        assert ms == entries[key]["median_ms"] > 0
    for s in model.samples:
        assert s["median_ms"] == entries["arch:" + space.key(s["arch"])]["median_ms"]
    assert model.holdout["archs"] == 2 and model.fit["archs"] == 3
    again = build_latency_model(space, 10, FAST, "lut", samples=3, holdout=2, seed=0, cache=cache)
    assert again.table == model.table and again.samples == model.samples  # nothing was re-timed
    loaded = load_latency_model(path, FAST, space, 10)
    for s in model.samples:
        assert loaded.predict(s["arch"]) == model.predict(s["arch"])
    assert loaded.describe()["setting"]["batch_size"] == 1 and 0 <= loaded.margin
    again_here = loaded.measure(model.samples[0]["arch"], repeats=3)  # same machine: re-measuring is allowed
    assert len(again_here.samples_ms) == 3 * FAST.rounds and again_here.median_ms > 0


def test_remeasure_puts_a_new_timing_on_the_builds_scale(built) -> None:
    """The shift is the median over the reference samples of recorded / current median; the
    re-measured value is the raw timing times it."""
    model, _, _ = built
    arch = tiny_space().max_arch()
    again = model.remeasure(arch, references=2)
    assert again.references == 2 and again.raw_ms > 0 and again.shift > 0
    assert again.median_ms == pytest.approx(again.raw_ms * again.shift)
    assert model.remeasure(arch, references=99, near_ms=1.0).references == len(model.samples)  # at most every sample


def test_spread_archs_are_distinct_and_span_the_macs_range() -> None:
    space = SearchSpace(load_config(DEMO).space)
    first = spread_archs(space, 10, 12, seed=0)
    more = spread_archs(space, 10, 12, seed=1, exclude=map(space.key, first))
    keys = [space.key(a) for a in first + more]
    assert len(set(keys)) == 24
    lo, hi = space.cost_span(lambda a: arch_cost(a, space, 10))["macs"]
    edges = np.linspace(lo, hi, 13)
    for archs in (first, more):  # one per equal-width MACs bin, the sparse extremes included
        for i, arch in enumerate(archs):
            assert edges[i] - 1 <= arch_cost(arch, space, 10).macs <= edges[i + 1] + 1


# ---------------------------------------------------------------- setting, space and machine checks
def test_model_for_another_setting_or_space_is_refused(built) -> None:
    _, path, _ = built
    with pytest.raises(UserError, match=r"latency\.batch_size=8"):
        load_latency_model(path, LatencySetting(batch_size=8))
    with pytest.raises(UserError, match=r"latency\.device=cuda"):
        load_latency_model(path, LatencySetting(device="cuda"))
    with pytest.raises(UserError, match=r"latency\.precision=bf16.*latency\.clock=cpu"):
        load_latency_model(path, LatencySetting(precision="bf16", clock="cpu"))
    with pytest.raises(UserError, match=r"space\.img_size"):
        load_latency_model(path, FAST, tiny_space(img_size=64))
    with pytest.raises(UserError, match=r"lacks 6 part"):  # a new width has parts it never timed
        load_latency_model(path, FAST, tiny_space(embed_dim=[16, 32, 48]))
    with pytest.raises(UserError, match=r"10 classes"):
        load_latency_model(path, FAST, tiny_space(), num_classes=1000)
    assert load_latency_model(path, LatencySetting(repeats=99, rounds=3)).predictor == "lut"  # only steadiness


def test_model_from_another_machine_warns_and_refuses_to_remeasure(built, tmp_path) -> None:
    _, path, _ = built
    data = json.loads(path.read_text())
    data["machine"]["device"]["name"] = "Some Other CPU"
    data["machine"]["torch"] = "1.0"
    other = tmp_path / "latency.json"
    other.write_text(json.dumps(data))
    with pytest.warns(LatencyMismatchWarning, match="Some Other CPU"):
        model = load_latency_model(other, FAST, tiny_space(), 10)
    arch = model.samples[0]["arch"]
    assert model.predict(arch) > 0
    with pytest.raises(UserError, match="cannot re-measure"):
        model.measure(arch)
    with pytest.raises(UserError, match="cannot re-measure"):
        model.remeasure(arch)


@pytest.mark.parametrize("content, needle", [
    (None, "latency model not found"),
    ('{"format": "vitas-latency", "version": 1, "predic', "cannot read latency model"),
    ("[1, 2]", "not a vitas-latency file"),
    ('{"format": "vitas-latency", "version": 7}', "format version 7"),
    ("\xff\xfe", "cannot read latency model"),
])
def test_missing_or_corrupt_file_is_a_one_line_error(tmp_path, content, needle) -> None:
    path = tmp_path / "latency.json"
    if content is not None:
        path.write_bytes(content.encode("latin-1"))
    with pytest.raises(UserError, match=needle) as info:
        load_latency_model(path)
    assert "\n" not in str(info.value)


def test_damaged_fields_are_a_one_line_error(built, tmp_path) -> None:
    _, path, _ = built
    for damage in ({"table": {}}, {"setting": {"device": "cpu", "turbo": True}}, {"calibration": {}},
                   {"predictor": "oracle"}, {"machine": {}}):
        data = {**json.loads(path.read_text()), **damage}
        (tmp_path / "bad.json").write_text(json.dumps(data))
        with pytest.raises(UserError, match="cannot read latency model") as info:
            load_latency_model(tmp_path / "bad.json")
        assert "\n" not in str(info.value)


def test_cli_predict_with_a_corrupt_model_is_one_line_exit_2(tmp_path, capsys) -> None:
    (tmp_path / "latency").mkdir()
    (tmp_path / "latency" / "latency.json").write_text("{not json")
    assert main(["latency", "predict", "-c", DEMO, "--arch", ARCH, f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vitas: error: cannot read latency model")


# ---------------------------------------------------------------- measuring
def test_measure_prints_the_documented_fields(capsys) -> None:
    assert main(["latency", "measure", "-c", DEMO, "--arch", ARCH, "latency.warmup=1", "latency.repeats=3",
                 "latency.rounds=2"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("median_ms", "iqr_ms", "q1_ms", "q3_ms", "min_ms", "wall_median_ms", "batch_size", "precision",
                "threads", "backend", "clock", "warmup", "repeats", "rounds", "torch", "loadavg", "macs", "params"):
        assert key in report, key
    assert report["device"]["type"] == "cpu" and report["device"]["name"]
    assert report["min_ms"] <= report["q1_ms"] <= report["median_ms"] <= report["q3_ms"]
    assert report["iqr_ms"] == pytest.approx(report["q3_ms"] - report["q1_ms"])
    assert (report["batch_size"], report["threads"], report["repeats"]) == (1, 1, 3)


def test_measure_timing_counts_and_precisions() -> None:
    space = tiny_space()
    arch = space.max_arch()
    timing = measure_arch(arch, space, 10, LatencySetting(warmup=1, repeats=3, rounds=2, batch_size=2))
    assert len(timing.samples_ms) == 6 and timing.median_ms > 0
    bf16 = measure_arch(arch, space, 10, LatencySetting(warmup=0, repeats=1, rounds=1, precision="bf16"))
    assert bf16.median_ms > 0


def test_impossible_settings_are_user_errors() -> None:
    space = tiny_space()
    with pytest.raises(UserError, match="latency.clock=cpu"):
        measure_arch(space.max_arch(), space, 10, LatencySetting(clock="cpu", threads=2))
    with pytest.raises(UserError, match="latency.backend"):
        load_config(DEMO, ["latency.backend=tensorrt"])
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install"):
            measure_arch(space.max_arch(), space, 10, LatencySetting(backend="onnx"))


def test_cli_build_then_predict(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    common = ["-c", DEMO, f"output_dir={out}", "space.depth=[2]", "space.patch_size=[8]",
              "latency.warmup=0", "latency.repeats=1", "latency.rounds=1", "latency.samples=3", "latency.holdout=0",
              "latency.predictor=regression"]
    assert main(["latency", "build", *common]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert Path(summary["model"]) == out / "latency" / "latency.json" and summary["samples"] == 3
    assert summary["holdout"] is None and summary["parts"] == 0
    assert main(["latency", "predict", *common, "--arch", ARCH]) == 0
    predicted = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert predicted["latency_ms"] > 0 and predicted["model"] == summary["model"]
    assert main(["latency", "predict", *common, "latency.batch_size=4", "--arch", ARCH]) == 2
    assert "latency.batch_size=4" in capsys.readouterr().err


def test_onnx_backend_when_installed() -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    space = tiny_space()
    timing = measure_arch(space.max_arch(), space, 10, LatencySetting(backend="onnx", warmup=0, repeats=2, rounds=1))
    assert len(timing.samples_ms) == 2 and timing.median_ms > 0


def test_hierarchical_space_is_refused(capsys) -> None:
    assert main(["latency", "measure", "-c", str(ROOT / "yamls" / "asvit-digits.yaml"), "--arch", "{}"]) == 2
    assert "space.kind=asvit" in capsys.readouterr().err
