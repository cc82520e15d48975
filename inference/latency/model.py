"""The latency model of a space on one device and setting: fit, predict, save, load, check.

Two predictors, both fitted to the same end-to-end measurements:
- `lut`: a lookup table of measured parts (stem and head, attention halves, MLP halves; see
  `parts.py`), summed per architecture, then calibrated by `scale * sum + offset` fitted to the
  end-to-end measurements (timing parts one at a time misses what they share in a whole model).
- `regression`: non-negative least squares on `parts.FEATURES` (MACs by kind, attention scores,
  elements touched, block count, a constant), weighted to minimise relative error.

The file (`latency.json`) records the setting (device, batch size, precision, threads, backend,
clock) and the space fields that set the model's shapes, which must match where it is used (else
refused), and the machine (device name, torch version), which may differ (a model is usually
built on the deployment device and used elsewhere) but is then warned about, and refused for
re-measuring.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from scipy.optimize import nnls

from vitas.core.checkpoint import write_json
from vitas.core.config import Config, SpaceConfig, config_from_dict
from vitas.core.errors import UserError
from vitas.inference.latency.measure import (LatencySetting, Timing, arch_factory, describe_machine, measure_arch,
                                             measure_modules)
from vitas.inference.latency.parts import FEATURES, arch_features, arch_parts, space_parts
from vitas.supernet.space import SearchSpace

FORMAT = "vitas-latency"
VERSION = 1
PREDICTORS = ("lut", "regression")
# Space fields that change the shapes a model runs (the choices are checked through the parts).
SPACE_KEYS = ("img_size", "in_chans", "qkv_bias", "rel_pos", "rel_pos_max", "pool")


class LatencyMismatchWarning(UserWarning):
    """A latency model is used on another machine than the one it was measured on."""


def latency_search_space(space: SpaceConfig) -> SearchSpace:
    """The SearchSpace of a flat ViT space; UserError for a space kind latency does not cover."""
    kind = getattr(space, "kind", "vit")
    if kind != "vit":
        raise UserError(f"latency models cover flat ViT spaces (space.kind=vit), not space.kind={kind}")
    return SearchSpace(space)


def latency_space(space: SpaceConfig) -> dict:
    """The fields of a space that a latency model records (`SPACE_KEYS`)."""
    return {k: getattr(space, k) for k in SPACE_KEYS}


def ape_stats(predicted: Sequence[float], measured: Sequence[float]) -> dict:
    """Median, 90th-percentile and largest absolute percentage error of predictions."""
    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    ape = 100.0 * np.abs(p - m) / m
    return {"median_ape": float(np.median(ape)), "p90_ape": float(np.percentile(ape, 90)),
            "max_ape": float(ape.max()), "archs": int(len(ape))}


def fit_calibration(raw_ms: Sequence[float], measured_ms: Sequence[float]) -> tuple[float, float]:
    """(scale, offset) minimising the relative error of `scale * raw + offset` (identity for <2)."""
    raw, y = np.asarray(raw_ms, dtype=float), np.asarray(measured_ms, dtype=float)
    if len(y) < 2:
        return 1.0, 0.0
    design = np.stack([raw, np.ones_like(raw)], axis=1) / y[:, None]
    (scale, offset), *_ = np.linalg.lstsq(design, np.ones_like(y), rcond=None)
    return float(scale), float(offset)


def fit_regression(features: np.ndarray, measured_ms: Sequence[float]) -> dict[str, float]:
    """Non-negative coefficients per feature minimising relative error (columns scaled to unit max
    first, so that the solver sees numbers of one magnitude)."""
    X, y = np.asarray(features, dtype=float), np.asarray(measured_ms, dtype=float)
    norm = np.abs(X).max(axis=0)
    norm[norm == 0] = 1.0
    coef, _ = nnls(X / norm / y[:, None], np.ones_like(y))
    return {k: float(c / n) for k, c, n in zip(FEATURES, coef, norm)}


@dataclass(frozen=True)
class Remeasured:
    """A re-measured latency on the build's scale: `raw_ms` (here, now) times `shift` (reference
    samples' recorded over current medians), from `references` reference architectures."""

    median_ms: float
    raw_ms: float
    shift: float
    references: int


@dataclass
class LatencyModel:
    """Predicted latency (ms per batch) of the architectures of one space on one setting."""

    predictor: str
    setting: dict  # LatencySetting fields
    machine: dict  # describe_machine() where it was measured
    space: dict  # SearchSpace.spec() of the space it was built for
    num_classes: int
    table: dict[str, float] = field(default_factory=dict)  # part key -> median ms (lut)
    calibration: dict[str, float] = field(default_factory=lambda: {"scale": 1.0, "offset": 0.0})
    coef: dict[str, float] = field(default_factory=dict)  # feature -> ms per unit (regression)
    samples: list[dict] = field(default_factory=list)  # end-to-end: {"arch", "median_ms", "iqr_ms"}
    fit: dict = field(default_factory=dict)  # ape_stats on the samples it was fitted to
    holdout: Optional[dict] = None  # ape_stats on architectures it was not fitted to
    built: dict = field(default_factory=dict)  # when, how long, load averages
    _space: Optional[SearchSpace] = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------ predicting
    def table_sum(self, arch: dict) -> float:
        """Sum of the table's parts of a canonical `arch` (before calibration)."""
        total = 0.0
        for key in arch_parts(arch, self.search_space().cfg):
            if key not in self.table:
                raise UserError(f"latency model has no entry for part {key}: it was built for another "
                                "space; rebuild it with `vitas latency build`")
            total += self.table[key]
        return total

    def predict(self, arch: dict) -> float:
        """Predicted latency in ms of one batch (the setting's) through a canonical `arch`."""
        if self.predictor == "lut":
            return self.calibration["scale"] * self.table_sum(arch) + self.calibration["offset"]
        x = arch_features(arch, self.search_space().cfg, self.num_classes)
        return float(sum(self.coef[k] * v for k, v in zip(FEATURES, x)))

    def search_space(self) -> SearchSpace:
        """The space it was built for, rebuilt from its record (once)."""
        if self._space is None:
            self._space = latency_search_space(config_from_dict({"space": self.space}).space)
        return self._space

    @property
    def margin(self) -> float:
        """Relative error to allow around a limit: the 90th-percentile error (held-out when
        measured, else in-sample), as a fraction. Candidates predicted within it of a latency
        limit are worth re-measuring."""
        stats = self.holdout or self.fit
        return float(stats.get("p90_ape", 0.0)) / 100.0

    def describe(self) -> dict:
        """What the model holds for and how accurate it is (for logs and result files)."""
        return {"predictor": self.predictor, "setting": self.setting, "machine": self.machine,
                "space": {"name": self.space.get("name"), **latency_space(self.search_space().cfg)},
                "num_classes": self.num_classes, "fit": self.fit,
                "holdout": self.holdout, "built": self.built}

    # ------------------------------------------------------------------ this machine
    def machine_difference(self) -> Optional[str]:
        """None when this machine is the one the model was measured on, else how it differs."""
        device = self.setting["device"]
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                return f"it was measured on {self.machine['device']['name']}; this machine has no CUDA"
        here = describe_machine(device)
        diffs = [f"{what} {mine!r} (this machine: {theirs!r})"
                 for what, mine, theirs in (("device", self.machine["device"]["name"], here["device"]["name"]),
                                            ("torch", self.machine["torch"], here["torch"]))
                 if mine != theirs]
        return "it was measured with " + ", ".join(diffs) if diffs else None

    def measure(self, arch: dict, repeats: Optional[int] = None) -> Timing:
        """Re-measure a canonical `arch` here under the model's setting (e.g. a candidate whose
        prediction is within `margin` of a limit). Refused on another machine."""
        self._check_here()
        setting = dict(self.setting, repeats=repeats or self.setting["repeats"])
        return measure_arch(arch, self.search_space(), self.num_classes, LatencySetting(**setting))

    def remeasure(self, arch: dict, references: int = 8, near_ms: Optional[float] = None) -> "Remeasured":
        """Re-measure a canonical `arch` here on the scale of the build: timed in the same rounds
        as `references` of the end-to-end samples the model was fitted to (those recorded nearest
        `near_ms`, default its prediction; give a latency limit to check several candidates against
        one reference set), whose recorded medians over their medians now give the shift between
        the build and now (load from other processes, cache state). On a shared machine the latency
        of one model can move by 2x within minutes; the shift cancels what moves all models alike.
        Refused on another machine."""
        self._check_here()
        near_ms = self.predict(arch) if near_ms is None else near_ms
        refs = sorted(self.samples, key=lambda s: abs(s["median_ms"] - near_ms))[:max(1, references)]
        space, batch = self.search_space(), self.setting["batch_size"]
        timings = measure_modules([arch_factory(a, space, self.num_classes, batch)
                                   for a in [arch, *(r["arch"] for r in refs)]], LatencySetting(**self.setting))
        shift = float(np.median([r["median_ms"] / t.median_ms for r, t in zip(refs, timings[1:])]))
        return Remeasured(median_ms=timings[0].median_ms * shift, raw_ms=timings[0].median_ms, shift=shift,
                          references=len(refs))

    def _check_here(self) -> None:
        difference = self.machine_difference()
        if difference is not None:
            raise UserError(f"cannot re-measure for this latency model here: {difference}")

    # ------------------------------------------------------------------ checking
    def check(self, setting: Optional[LatencySetting] = None, space: Optional[SearchSpace] = None,
              num_classes: Optional[int] = None, where: str = "latency model") -> None:
        """Refuse (UserError naming the key) a model built for another setting, space or class
        count; warn (LatencyMismatchWarning) when it was measured on another machine."""
        if setting is not None:
            wanted = setting.key()
            diffs = [k for k in LatencySetting.KEYS if self.setting.get(k) != wanted[k]]
            if diffs:
                mine = ", ".join(f"{k}={self.setting.get(k)}" for k in diffs)
                asked = ", ".join(f"latency.{k}={wanted[k]}" for k in diffs)
                raise UserError(f"{where} holds for {mine}, the config asks for {asked}: rebuild it "
                                "with `vitas latency build` or set the config to match")
        if space is not None:
            current = latency_space(space.cfg)
            recorded = latency_space(self.search_space().cfg)
            for k in SPACE_KEYS:
                if recorded[k] != current[k]:
                    raise UserError(f"{where} was built for space.{k}={recorded[k]!r}, the config "
                                    f"has {current[k]!r}: rebuild it with `vitas latency build`")
            if self.predictor == "lut":
                missing = [k for k in space_parts(space) if k not in self.table]
                if missing:
                    raise UserError(f"{where} lacks {len(missing)} part(s) of this space (e.g. {missing[0]}): "
                                    "rebuild it with `vitas latency build`")
        if num_classes is not None and num_classes != self.num_classes:
            raise UserError(f"{where} was built for {self.num_classes} classes, the config has "
                            f"{num_classes}: rebuild it with `vitas latency build`")
        difference = self.machine_difference()
        if difference is not None:
            warnings.warn(f"{where}: {difference}; its predictions hold for that machine, not this one",
                          LatencyMismatchWarning, stacklevel=2)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        """The file's content (plain JSON values)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        return {"format": FORMAT, "version": VERSION, **json.loads(json.dumps(data))}

    def save(self, path: str | Path) -> Path:
        """Write the model atomically as JSON."""
        return write_json(self.to_dict(), path)


def _from_dict(data: Any) -> LatencyModel:
    """Rebuild a model from a file's content; ValueError/KeyError/TypeError when malformed."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file")
    if data.get("version") != VERSION:
        raise ValueError(f"format version {data.get('version')!r}, this vitas reads {VERSION}")
    names = {f.name for f in dataclasses.fields(LatencyModel) if not f.name.startswith("_")}
    model = LatencyModel(**{k: v for k, v in data.items() if k in names})
    if model.predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {model.predictor!r}")
    LatencySetting(**model.setting)
    model.search_space()
    numbers = model.table if model.predictor == "lut" else model.coef
    expected = set(numbers) if model.predictor == "lut" else set(FEATURES)
    if not numbers or set(numbers) != expected or not all(_is_number(v) for v in numbers.values()):
        raise ValueError(f"its {'table' if model.predictor == 'lut' else 'coefficients'} are missing or not numbers")
    if not all(_is_number(model.calibration.get(k)) for k in ("scale", "offset")):
        raise ValueError("its calibration is missing or not numbers")
    if not isinstance(model.machine.get("device", {}).get("name"), str) or "torch" not in model.machine:
        raise ValueError("it does not say which machine it was measured on")
    return model


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_latency_model(path: str | Path, setting: Optional[LatencySetting] = None,
                       space: Optional[SearchSpace] = None, num_classes: Optional[int] = None) -> LatencyModel:
    """Read a latency model, checked against the setting, space and class count it is used with
    (`LatencyModel.check`). A missing or unreadable file is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"latency model not found: {path} (build it with `vitas latency build -c CONFIG`)")
    try:
        model = _from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UserError) as exc:  # JSON errors are ValueErrors
        reason = f"missing field {exc}" if isinstance(exc, KeyError) else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot read latency model {path}: {reason}") from None
    model.check(setting, space, num_classes, where=f"latency model {path}")
    return model


def model_path(cfg: Config) -> Path:
    """Where a config's latency model lives: `latency.model`, else `<output_dir>/latency/latency.json`."""
    return Path(cfg.latency.model).expanduser() if cfg.latency.model else cfg.stage_dir("latency") / "latency.json"


def load_for_config(cfg: Config, num_classes: int) -> tuple[LatencyModel, Path]:
    """The config's latency model, checked against its `latency` setting, space and class count."""
    path = model_path(cfg)
    space = latency_search_space(cfg.space)
    return load_latency_model(path, LatencySetting.from_config(cfg.latency), space, num_classes), path
