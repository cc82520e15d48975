"""Latency on a deployment setting: measure a subnet, predict it from a per-device latency model.

The API the search calls: `load_latency_model(path, setting, space, num_classes)` ->
`LatencyModel` with `.predict(arch) -> ms`, `.margin`, `.measure(arch)`, `.remeasure(arch)` (on the
build's scale) and `.describe()`.
"""
from vitas.inference.latency.build import build_latency_model, fit_latency_model, measure_for_model, spread_archs
from vitas.inference.latency.measure import LatencySetting, Timing, describe_machine, measure_arch, measure_module
from vitas.inference.latency.model import (LatencyMismatchWarning, LatencyModel, Remeasured, ape_stats,
                                           load_for_config, load_latency_model, model_path)

__all__ = ["LatencyMismatchWarning", "LatencyModel", "LatencySetting", "Remeasured", "Timing", "ape_stats",
           "build_latency_model", "describe_machine", "fit_latency_model", "load_for_config", "load_latency_model", "measure_for_model", "model_path",
           "measure_arch", "measure_module", "spread_archs"]
