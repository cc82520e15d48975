"""`vitas latency measure|build|predict`: time a subnet, build a space's latency model, predict."""
from __future__ import annotations

import argparse
import json

from vitas.commands._common import add_config_args, config_from_args
from vitas.commands.arch import num_classes


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `vitas latency measure|build|predict`."""
    parser = subparsers.add_parser(
        "latency", help="measure or predict the latency of architectures (latency.*)",
        description="Latency on the setting of the config's latency section (device, batch_size, "
        "precision, threads, backend, clock; see docs/LATENCY.md).")
    sub = parser.add_subparsers(dest="latency_command", metavar="ACTION", required=True)
    measure = sub.add_parser(
        "measure", help="time one architecture's static model",
        description="Time the static model of an architecture: latency.rounds rounds of "
        "latency.warmup untimed and latency.repeats timed calls. The last line of stdout is "
        '{"median_ms", "iqr_ms", ..., "device", "torch", "threads", "batch_size", "precision", ...}.')
    add_config_args(measure)
    measure.add_argument("--arch", required=True, metavar="FILE_OR_JSON", help="arch.json or inline JSON")
    measure.set_defaults(func=_measure)
    build = sub.add_parser(
        "build", help="measure this machine and build the space's latency model",
        description="Time the space's parts (latency.predictor=lut) and latency.samples "
        "architectures, fit the predictor, report its error on latency.holdout more, and save it to "
        "latency.model (default <output_dir>/latency/latency.json). An interrupted build resumes "
        "from <output_dir>/latency/measurements.jsonl.")
    add_config_args(build)
    build.set_defaults(func=_build)
    predict = sub.add_parser(
        "predict", help="predict an architecture's latency from the latency model",
        description='Predict from latency.model; the last line of stdout is {"latency_ms", "margin", "model"}.')
    add_config_args(predict)
    predict.add_argument("--arch", required=True, metavar="FILE_OR_JSON", help="arch.json or inline JSON")
    predict.set_defaults(func=_predict)


def _measure(args: argparse.Namespace) -> None:
    from vitas.inference.latency import LatencySetting, describe_machine, measure_arch
    from vitas.inference.latency.measure import load_average
    from vitas.supernet.complexity import arch_cost
    from vitas.inference.latency.model import latency_search_space
    from vitas.supernet.space import load_arch

    cfg = config_from_args(args)
    space = latency_search_space(cfg.space)
    arch = space.validate(load_arch(args.arch))
    classes = num_classes(cfg)
    setting = LatencySetting.from_config(cfg.latency)
    timing = measure_arch(arch, space, classes, setting)
    cost = arch_cost(arch, space, classes)
    report = {**timing.summary(), **vars(setting), **describe_machine(setting.device),
              "loadavg": load_average(), "params": cost.params, "macs": cost.macs}
    print(f"architecture: {json.dumps(arch)}")
    print(f"  {timing.median_ms:.4g} ms per batch of {setting.batch_size} (IQR {timing.iqr_ms:.3g} ms, "
          f"{setting.clock} clock) on {report['device']['name']}, {setting.precision}, "
          f"{setting.threads} thread(s), {setting.backend}")
    print(json.dumps(report))


def _build(args: argparse.Namespace) -> None:
    from vitas.core.config import save_config
    from vitas.inference.latency import LatencySetting, build_latency_model, model_path
    from vitas.inference.latency.model import latency_search_space

    cfg = config_from_args(args)
    lc = cfg.latency
    setting = LatencySetting.from_config(lc)
    setting.check()
    space = latency_search_space(cfg.space)
    out = cfg.stage_dir("latency")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    model = build_latency_model(space, num_classes(cfg), setting, lc.predictor,
                                samples=lc.samples, holdout=lc.holdout, seed=lc.seed,
                                cache=out / "measurements.jsonl")
    path = model.save(model_path(cfg))
    summary = {"model": str(path), "predictor": model.predictor, "parts": len(model.table),
               "samples": len(model.samples), "fit": model.fit, "holdout": model.holdout, **model.built}
    held = model.holdout or {}
    print(f"latency model: {path} ({model.predictor}; in-sample median error {model.fit['median_ape']:.2f}%"
          + (f", held-out median {held['median_ape']:.2f}% / p90 {held['p90_ape']:.2f}%" if held else "") + ")")
    print(json.dumps(summary))


def _predict(args: argparse.Namespace) -> None:
    from vitas.inference.latency import load_for_config
    from vitas.inference.latency.model import latency_search_space
    from vitas.supernet.space import load_arch

    cfg = config_from_args(args)
    arch = latency_search_space(cfg.space).validate(load_arch(args.arch))
    model, path = load_for_config(cfg, num_classes(cfg))
    print(json.dumps({"latency_ms": model.predict(arch), "margin": model.margin, "model": str(path)}))
