"""Time a model on a deployment setting: device, batch size, precision, threads, runtime.

`measure_modules` times several models in turn (rounds of `warmup` untimed and `repeats` timed
calls each) and reports each one's median and inter-quartile range; `measure_module` and
`measure_arch` (the static model of an architecture, as `Superformer.extract` returns it; latency
does not depend on the weight values) time one. `describe_machine` says what the numbers hold
for. Backends: `eager` (PyTorch), `compile` (`torch.compile`), `onnx` (an exported graph run by
onnxruntime, when it is installed).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from vitas.core.config import LatencyConfig
from vitas.core.errors import UserError
from vitas.supernet.space import SearchSpace
from vitas.supernet.static import StaticViT

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class LatencySetting:
    """What a latency number holds for (besides the machine); `warmup`, `repeats` (timed calls per
    round) and `rounds` only steady it."""

    device: str = "cpu"
    batch_size: int = 1
    precision: str = "fp32"
    threads: int = 1
    backend: str = "eager"
    clock: str = "wall"
    warmup: int = 5
    repeats: int = 10
    rounds: int = 5

    # The fields a latency model must share with the setting it is used for.
    KEYS = ("device", "batch_size", "precision", "threads", "backend", "clock")

    @classmethod
    def from_config(cls, lc: LatencyConfig) -> "LatencySetting":
        """The setting of a config's `latency` section."""
        return cls(**{f.name: getattr(lc, f.name) for f in dataclasses.fields(cls)})

    def key(self) -> dict:
        """The fields a latency model holds for (`KEYS`), as a plain dict."""
        return {k: getattr(self, k) for k in self.KEYS}

    def check(self) -> None:
        """UserError naming `latency.<key>` for a setting this machine or build cannot time."""
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError("latency.device=cuda but CUDA is not available on this machine")
        if self.clock == "cpu" and (self.device != "cpu" or self.threads != 1):
            raise UserError("latency.clock=cpu times process CPU time, which is latency only on "
                            f"the CPU with latency.threads=1 (got device {self.device}, threads {self.threads})")
        if self.backend == "onnx":
            if self.precision != "fp32":
                raise UserError(f"latency.backend=onnx times fp32 graphs only, got latency.precision={self.precision}")
            for module in ("onnx", "onnxruntime", "onnxscript"):
                if importlib.util.find_spec(module) is None:
                    raise UserError(f"latency.backend=onnx needs the '{module}' package: "
                                    "pip install onnx onnxscript onnxruntime")


@dataclass
class Timing:
    """Per-call latency in milliseconds of one model on one setting."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    wall_median_ms: float  # the wall-clock median, whatever `clock` was chosen
    samples_ms: list[float]

    @property
    def iqr_ms(self) -> float:
        """Inter-quartile range: the spread of the timed calls."""
        return self.q3_ms - self.q1_ms

    def summary(self) -> dict:
        """Plain dict without the raw samples (for JSON lines and files)."""
        return {"median_ms": self.median_ms, "iqr_ms": self.iqr_ms, "q1_ms": self.q1_ms,
                "q3_ms": self.q3_ms, "min_ms": self.min_ms, "wall_median_ms": self.wall_median_ms}


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: str) -> dict:
    """Which device a number was measured on: type and name (and CUDA's capability)."""
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return {"type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
                "cuda": torch.version.cuda}
    return {"type": "cpu", "name": cpu_name(), "logical_cpus": os.cpu_count()}


def describe_machine(device: str) -> dict:
    """Device, torch version and platform: what a latency model's numbers hold for."""
    return {"device": describe_device(device), "torch": torch.__version__,
            "platform": platform.platform(terse=True)}


def load_average() -> Optional[list[float]]:
    """1, 5 and 15 minute load averages (None where the OS has none): record with every timing."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run with `threads` intra-op threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def static_model(arch: dict, space: SearchSpace, num_classes: int) -> StaticViT:
    """The static model of a canonical `arch` of `space` (random weights), in eval mode."""
    return StaticViT(**space.model_args(arch, num_classes)).eval()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide an exporter's chatter (progress lines on stdout, deprecation warnings) while it runs."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _onnx_runner(model: nn.Module, x: torch.Tensor, setting: LatencySetting,
                 workdir: str) -> Callable[[], Any]:
    """Export `model` to ONNX and return a call that runs it once through onnxruntime."""
    import onnxruntime as ort

    path = os.path.join(workdir, "model.onnx")
    with _quiet():
        torch.onnx.export(model, (x,), path, dynamo=True, external_data=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = setting.threads
    options.inter_op_num_threads = 1
    providers = ["CUDAExecutionProvider"] if setting.device == "cuda" else ["CPUExecutionProvider"]
    if providers[0] not in ort.get_available_providers():
        raise UserError(f"this onnxruntime has no {providers[0]} (for CUDA: pip install onnxruntime-gpu)")
    session = ort.InferenceSession(path, options, providers=providers)
    name = session.get_inputs()[0].name
    feed = {name: x.cpu().numpy()}
    return lambda: session.run(None, feed)


def _runner(model: nn.Module, x: torch.Tensor, setting: LatencySetting, workdir: str) -> Callable[[], Any]:
    """One forward pass of `model` on `x` through the setting's backend."""
    if setting.backend == "onnx":
        return _onnx_runner(model, x, setting, workdir)
    if setting.backend == "compile":
        model = torch.compile(model)
    if setting.device == "cuda":
        def run() -> Any:
            out = model(x)
            torch.cuda.synchronize()
            return out
        return run
    return lambda: model(x)


# A model factory: builds (module, input shape) when its turn comes, so that a long list of
# models need not be in memory at once.
ModelFactory = Callable[[], tuple[nn.Module, tuple[int, ...]]]
MEMORY_BUDGET = 2 << 30  # bytes of weights held at once while models are timed in turn


def _prepare(factory: ModelFactory, setting: LatencySetting, workdir: str) -> tuple[Callable[[], Any], int]:
    """(a call running the model once, its weight bytes); the first call, never timed, is made."""
    model, shape = factory()
    dtype = DTYPES[setting.precision]
    model = model.eval().to(device=setting.device, dtype=dtype)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    x = torch.randn(*shape, device=setting.device, dtype=dtype)
    try:
        run = _runner(model, x, setting, workdir)
        run()  # compiles / allocates
    except Exception as exc:  # a backend or precision this device cannot run
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot run latency.backend={setting.backend} with "
                        f"latency.precision={setting.precision} on {setting.device}: {first}") from None
    return run, size


def measure_modules(factories: Sequence[ModelFactory], setting: LatencySetting,
                    memory_budget: int = MEMORY_BUDGET,
                    on_done: Optional[Callable[[int, Timing], None]] = None) -> list[Timing]:
    """Latency of several models, timed in turn: `rounds` rounds, in each every model runs
    `warmup` untimed calls (its weights back in cache) then `repeats` timed ones.

    Interleaving spreads every model's timed calls over the whole measurement, so that load from
    other processes (a shared machine) shifts all models alike instead of whichever ran during a
    busy spell. Models whose weights exceed `memory_budget` together are timed in groups.
    `on_done(index, timing)` is called for each model as its group is done."""
    setting.check()
    timings: list[Optional[Timing]] = [None] * len(factories)
    with torch_threads(setting.threads), torch.inference_mode(), tempfile.TemporaryDirectory() as tmp:
        pending = list(range(len(factories)))
        while pending:
            group, held = [], 0
            while pending and (not group or held < memory_budget):
                i = pending.pop(0)
                run, size = _prepare(factories[i], setting, tmp)
                group.append((i, run))
                held += size
            wall: dict[int, list[float]] = {i: [] for i, _ in group}
            cpu: dict[int, list[float]] = {i: [] for i, _ in group}
            for _ in range(setting.rounds):
                for i, run in group:
                    for _ in range(setting.warmup):
                        run()
                    for _ in range(setting.repeats):
                        c0, w0 = time.process_time(), time.perf_counter()
                        run()
                        w1, c1 = time.perf_counter(), time.process_time()
                        wall[i].append((w1 - w0) * 1e3)
                        cpu[i].append((c1 - c0) * 1e3)
            del group
            for i in wall:
                timings[i] = _timing(cpu[i] if setting.clock == "cpu" else wall[i], wall[i])
                if on_done is not None:
                    on_done(i, timings[i])
    return timings  # type: ignore[return-value]


def measure_module(model: nn.Module, input_shape: tuple[int, ...], setting: LatencySetting) -> Timing:
    """Latency of `model` on a random input of `input_shape` (batch first) under `setting`."""
    return measure_modules([lambda: (model, input_shape)], setting)[0]


def _timing(samples: list[float], wall: list[float]) -> Timing:
    if len(samples) == 1:
        q1 = q3 = samples[0]
    else:
        q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return Timing(median_ms=statistics.median(samples), q1_ms=q1, q3_ms=q3, min_ms=min(samples),
                  wall_median_ms=statistics.median(wall), samples_ms=samples)


def arch_factory(arch: dict, space: SearchSpace, num_classes: int, batch_size: int) -> ModelFactory:
    """A factory of the static model of a canonical `arch` and its input shape."""
    c = space.cfg
    return lambda: (static_model(arch, space, num_classes), (batch_size, c.in_chans, c.img_size, c.img_size))


def measure_arch(arch: dict, space: SearchSpace, num_classes: int, setting: LatencySetting) -> Timing:
    """End-to-end latency of a canonical `arch` of `space` (its static model) under `setting`."""
    return measure_modules([arch_factory(arch, space, num_classes, setting.batch_size)], setting)[0]
