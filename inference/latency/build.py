"""Build a latency model for a space by measuring on this machine (`vitas latency build`).

It times every part of the space (for the `lut` predictor), then `samples` architectures end to
end to fit the predictor, then `holdout` further architectures only to report its error. Sampled
architectures are spread evenly over the space's MACs range (equal-width bins), so that the fit
and the error cover small and large models alike. Each measurement is appended to a cache file as
it is taken, so an interrupted build resumes where it stopped; the cache is discarded when the
setting, machine or space differ.
"""
from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from tqdm import tqdm

from vitas.inference.latency.measure import (LatencySetting, ModelFactory, Timing, arch_factory,
                                             describe_machine, load_average, measure_modules)
from vitas.inference.latency.model import LatencyModel, ape_stats, fit_calibration, fit_regression, latency_space
from vitas.inference.latency.parts import arch_features, part_factory, space_parts
from vitas.supernet.complexity import arch_cost
from vitas.supernet.space import SearchSpace
from vitas.core.errors import UserError


class MeasurementCache:
    """Measurements by key in a JSON-lines file whose first line says what they hold for."""

    def __init__(self, path: Optional[Path], header: dict):
        self.path = path
        self.entries: dict[str, dict] = {}
        if path is None:
            return
        lines = path.read_text().splitlines() if path.is_file() else []
        if lines and _json_or_none(lines[0]) == header:
            for line in lines[1:]:
                entry = _json_or_none(line)  # a line cut short by a kill is skipped
                if isinstance(entry, dict) and "key" in entry:
                    self.entries[entry["key"]] = entry
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(header) + "\n")

    def put(self, key: str, timing: Timing) -> None:
        """Store a measurement (with the load averages at the time)."""
        entry = {"key": key, **timing.summary(), "loadavg": load_average()}
        self.entries[key] = entry
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    def measure(self, factories: dict[str, ModelFactory], setting: LatencySetting, seed: int) -> None:
        """Time every factory whose key is not stored yet, all in turn (in a seeded random order,
        so that groups held in memory at once mix parts and whole models)."""
        keys = [k for k in factories if k not in self.entries]
        random.Random(seed).shuffle(keys)
        bar = tqdm(total=len(keys), desc="latency", disable=None)

        def done(i: int, timing: Timing) -> None:
            self.put(keys[i], timing)
            bar.update(1)

        measure_modules([factories[k] for k in keys], setting, on_done=done)
        bar.close()


def _json_or_none(line: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def spread_archs(space: SearchSpace, num_classes: int, n: int, seed: int,
                 exclude: Iterable[str] = ()) -> list[dict]:
    """`n` distinct canonical architectures, one per equal-width bin of the space's MACs range,
    none of whose keys is in `exclude`. A bin that uniform sampling rarely hits (the largest
    models of a deep space) is reached by a random walk of mutations toward it."""
    def cost(arch: dict) -> int:
        return arch_cost(arch, space, num_classes).macs

    rng, walk_rng = random.Random(seed), np.random.default_rng(seed)
    lo, hi = space.cost_span(lambda a: arch_cost(a, space, num_classes))["macs"]
    edges = np.linspace(lo, hi, n + 1)
    seen, archs = set(exclude), []
    for i in range(n):
        draws = (_in_bin(space, cost, int(edges[i]), int(edges[i + 1]), rng, walk_rng) for _ in range(20))
        fallback = (space.sample(rng) for _ in range(1000))  # a small space may leave a bin empty
        arch = next((a for a in itertools.chain(draws, fallback) if space.key(a) not in seen), None)
        if arch is None:
            raise UserError(f"could not draw {n} distinct architectures from this space for latency "
                            "samples: lower latency.samples or latency.holdout")
        seen.add(space.key(arch))
        archs.append(arch)
    return archs


def _in_bin(space: SearchSpace, cost: Callable[[dict], int], lo: int, hi: int, rng: random.Random,
            walk_rng: np.random.Generator, tries: int = 200, steps: int = 2000) -> dict:
    """An architecture with MACs in [lo, hi]: rejection sampling, then a greedy mutation walk
    toward the bin's middle from a uniform sample (the sample itself if both fail)."""
    for _ in range(tries):
        arch = space.sample(rng)
        if lo <= cost(arch) <= hi:
            return arch
    x = space.encode(arch)
    target = (lo + hi) / 2
    gap = abs(cost(arch) - target)
    for _ in range(steps):
        y = space.mutate(x, walk_rng, prob=2 / space.n_var)
        candidate = space.decode(y)
        macs = cost(candidate)
        if lo <= macs <= hi:
            return candidate
        if abs(macs - target) < gap:
            x, gap = y, abs(macs - target)
    return arch


@dataclass
class Measured:
    """What a build measured: the parts' medians and the end-to-end samples (fit and hold-out)."""

    machine: dict
    table: dict[str, float]
    fit: list[dict]  # {"arch", "median_ms", "iqr_ms", "loadavg"}
    holdout: list[dict]
    extra: list[dict]
    started: float
    loadavg_start: Optional[list[float]]


def measure_for_model(space: SearchSpace, num_classes: int, setting: LatencySetting, parts: bool,
                      samples: int, holdout: int, seed: int = 0, cache: Optional[Path] = None,
                      extra: Sequence[dict] = ()) -> Measured:
    """Time, on this machine, every part of the space (if `parts`), the `samples` architectures a
    model is fitted to, the `holdout` ones it is checked on and any `extra` ones, all together, in
    turn (`measure_modules`); measurements already in `cache` are reused."""
    setting.check()
    started, load_start = time.time(), load_average()
    machine = describe_machine(setting.device)
    header = {"setting": dataclasses.asdict(setting), "machine": machine,
              "space": latency_space(space.cfg), "num_classes": num_classes}
    store = MeasurementCache(cache, header)
    fit_archs = spread_archs(space, num_classes, samples, seed)
    held = spread_archs(space, num_classes, holdout, seed + 1, exclude=map(space.key, fit_archs)) if holdout else []
    factories: dict[str, ModelFactory] = {}
    if parts:
        factories.update({k: part_factory(k, space, num_classes, setting.batch_size) for k in space_parts(space)})
    for arch in [*fit_archs, *held, *extra]:
        factories[arch_key(space, arch)] = arch_factory(arch, space, num_classes, setting.batch_size)
    store.measure(factories, setting, seed)

    def measured(archs: list[dict]) -> list[dict]:
        entries = [store.entries[arch_key(space, a)] for a in archs]
        return [{"arch": a, "median_ms": e["median_ms"], "iqr_ms": e["iqr_ms"], "loadavg": e["loadavg"]}
                for a, e in zip(archs, entries)]

    table = {k: store.entries[k]["median_ms"] for k in factories if not k.startswith("arch:")}
    return Measured(machine, table, measured(fit_archs), measured(held), measured(list(extra)), started, load_start)


def build_latency_model(space: SearchSpace, num_classes: int, setting: LatencySetting, predictor: str,
                        samples: int, holdout: int, seed: int = 0,
                        cache: Optional[Path] = None) -> LatencyModel:
    """Measure on this machine (`measure_for_model`) and fit a `predictor` (`lut` or
    `regression`) latency model; its error on the hold-out architectures goes in `.holdout`."""
    m = measure_for_model(space, num_classes, setting, predictor == "lut", samples, holdout, seed, cache)
    model = fit_latency_model(predictor, m.fit, m.table, setting, m.machine, space, num_classes)
    if m.holdout:
        model.holdout = ape_stats([model.predict(s["arch"]) for s in m.holdout], [s["median_ms"] for s in m.holdout])
    model.built = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "seconds": round(time.time() - m.started, 1), "loadavg_start": m.loadavg_start,
                   "loadavg_end": load_average()}
    return model


def arch_key(space: SearchSpace, arch: dict) -> str:
    """The cache key of an architecture's end-to-end measurement."""
    return "arch:" + space.key(arch)


def fit_latency_model(predictor: str, samples: list[dict], table: dict[str, float], setting: LatencySetting,
                      machine: dict, space: SearchSpace, num_classes: int) -> LatencyModel:
    """Fit a model to end-to-end `samples` ({"arch", "median_ms", ...}); `table` holds the parts'
    medians for `lut`. Pure arithmetic: no timing happens here."""
    samples = [{k: s[k] for k in ("arch", "median_ms", "iqr_ms")} for s in samples]
    model = LatencyModel(predictor=predictor, setting=dataclasses.asdict(setting), machine=machine,
                         space=space.spec(), num_classes=num_classes, table=dict(table),
                         samples=samples)
    measured = [s["median_ms"] for s in samples]
    if predictor == "lut":
        scale, offset = fit_calibration([model.table_sum(s["arch"]) for s in samples], measured)
        model.calibration = {"scale": scale, "offset": offset}
    else:
        features = np.array([arch_features(s["arch"], space.cfg, num_classes) for s in samples])
        model.coef = fit_regression(features, measured)
    model.fit = ape_stats([model.predict(s["arch"]) for s in samples], measured)
    return model
