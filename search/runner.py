"""The `vitas search` stage (`vitas.search.runner:STAGE`).

Runs the configured algorithm (GA, NSGA-II, RL or random; `vitas.search.algorithms`) over the
configured scorer (`vitas.search.scoring`) in one process, under torchrun or as Slurm tasks: every
rank runs the same search (same seeds, rank 0's scores broadcast) and shares the scoring work;
rank 0 writes. The state is saved to `<output_dir>/search/last.pth` after every round, and a search
started again with the same output_dir continues from it to the same result; `check` refuses a
saved state made under settings the algorithm, the budget or the scorer's numbers depend on. With
`search.array_jobs > 0` the candidates of each round are split into that many chunks, scored as a
Slurm job array (`core.launch.submit_array`; submitit's local executor without sbatch) and merged.

Latency (`search.latency_min/max`, `search.constraint=latency`) comes from the config's latency
model (`vitas.inference.latency`), which then joins the resume signature (its path, build time
and content). After the last round, while the choice's predicted latency is within the model's margin of
a limit it is re-measured on rank 0 (only on the machine the model was built on) and stored in the
state; one measured past the limit gives way to the next best (docs/LATENCY.md "Search with it").

Outputs in `<output_dir>/search/`: config.yaml, summary.json, last.pth, result.json, arch.json,
pareto.png, retrain.yaml, log.jsonl and TensorBoard events.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from vitas.core import dist
from vitas.core.checkpoint import load_checkpoint, save_checkpoint
from vitas.core.config import Config
from vitas.core.data import num_classes
from vitas.core.errors import UserError
from vitas.core.launch import submit_array, wait_result
from vitas.core.layout import SEARCH, run_layout
from vitas.core.logs import RunLogger, progress
from vitas.core.stage import Stage, StageContext
from vitas.inference.latency import LatencyModel, load_for_config, model_path
from vitas.inference.latency.model import latency_search_space
from vitas.search.algorithms import SearchAlgorithm, algorithm_class, create_algorithm
from vitas.search.archive import LATENCY, Archive, Budget
from vitas.search.report import entry, write_outputs
from vitas.search.scoring import Scorer, create_scorer
from vitas.supernet.space import SearchSpace, space_from_config

log = logging.getLogger(__name__)


def score_chunk(cfg: Config, archs: list[dict]) -> list[dict]:
    """Array-job entry: the metrics of one chunk of candidates, computed by a fresh scorer."""
    return create_scorer(cfg).compute(archs)


class ArrayScoring:
    """A scorer `compute_fn` that scores candidates as a job array of `search.array_jobs` chunks."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def __call__(self, archs: list[dict]) -> list[dict]:
        if not dist.is_main():
            return []  # rank 0 submits; Scorer.score broadcasts its merged results
        chunks = [list(c) for c in np.array_split(np.array(archs, dtype=object),
                                                  min(self.cfg.search.array_jobs, len(archs)))]
        jobs = submit_array(self.cfg, "vitas.search.runner:score_chunk", chunks, stage=SEARCH)
        return [metrics for job in jobs for metrics in wait_result(job)]


def search_latency(cfg: Config) -> Optional[tuple[LatencyModel, Path]]:
    """The latency model and its path when the search uses latency (a bound or the primary cost),
    else None; a one-line UserError when it is missing, unreadable or made for another setting."""
    used = [f"search.{k}" for k in ("latency_min", "latency_max") if getattr(cfg.search, k) is not None]
    used += ["search.constraint=latency"] if cfg.search.constraint == "latency" else []
    if not used:
        return None
    latency_search_space(cfg.space)  # a space kind latency models do not cover
    path = model_path(cfg)
    if not path.is_file():
        raise UserError(f"{used[0]} needs a latency model, and {path} does not exist: build it with "
                        "`vitas latency build -c CONFIG` (or point latency.model at one)")
    return load_for_config(cfg, num_classes(cfg.data))


def signature(cfg: Config, scorer: Scorer, latency: Optional[tuple[LatencyModel, Path]] = None) -> dict:
    """What a saved state must agree on to be continued: the chosen algorithm's own settings (not
    its number of rounds, which may grow), the budget, the scorer's settings, the space, and the
    latency model the costs came from (its path, build time and content: a rebuilt or edited
    model is another)."""
    settings = algorithm_class(cfg.search.algorithm).settings_from(cfg.search)
    sig = {"search.algorithm": cfg.search.algorithm, "search.scorer": cfg.search.scorer,
           **{f"search.{k}": v for k, v in dataclasses.asdict(settings).items()},
           **Budget.config_keys(cfg.search),
           **scorer.settings(), "space": scorer.space.spec()}
    if latency is not None:
        model, path = latency
        sig.update({"latency.model": str(path.resolve()), "latency.built": model.built.get("time"),
                    "latency.sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    return sig


def _cost_fn(cfg: Config, space: SearchSpace) -> Callable[[dict], Any]:
    classes = num_classes(cfg.data)
    return lambda arch: space.cost(arch, classes)


def check(cfg: Config) -> None:
    """Every user error findable before searching: budget and its feasibility, the scorer's
    inputs (superformer, hold-out, proxy options), and a saved state made under other settings."""
    if cfg.space.kind == "asvit" and cfg.search.scorer == "accuracy":
        raise UserError("search.scorer=accuracy needs a superformer, and an As-ViT space (space.kind: "
                        "asvit) has none: search it training-free with search.scorer=proxy")
    budget = Budget.from_config(cfg.search)
    latency = search_latency(cfg)
    space = space_from_config(cfg)
    scorer = create_scorer(cfg)
    scorer.check()
    archive = Archive(space, scorer, _cost_fn(cfg, space), budget, latency[0] if latency else None)
    archive.sample_in_budget(np.random.default_rng(0))  # UserError when nothing fits the budget
    create_algorithm(archive, cfg.search)  # the algorithm's own value checks
    state_path = run_layout(cfg.output_dir).search_state
    if state_path.is_file():
        check_resumable(load_checkpoint(state_path, mmap=True), signature(cfg, scorer, latency), state_path)


def check_resumable(state: Any, sig: dict, path: Path) -> None:
    """A saved search state that was made under the same signature, else a UserError naming the
    first key that differs."""
    saved = state.get("signature") if isinstance(state, dict) else None
    if not isinstance(saved, dict) or not isinstance(state.get("search"), dict):
        raise UserError(f"{path} is not a search state (no 'signature'/'search' entries)")
    for key, value in sig.items():
        if saved.get(key) != value:
            what = ("the search space" if key == "space" else
                    f"the latency model {saved.get('latency.model')} as built at {saved.get('latency.built')} "
                    "(it was rebuilt or changed since)" if key in ("latency.built", "latency.sha256")
                    else f"{key}={saved.get(key)!r}")
            raise UserError(f"{path} was made with {what}, which this config changes; "
                            "use another output_dir or delete the file to start over")


def search(cfg: Config, scorer: Scorer, out: Path) -> dict:
    """Run (or continue) the configured search with `scorer` into `out`; rank 0 writes the outputs.

    Returns the result (as written to result.json) on every rank.
    """
    space = scorer.space
    latency = search_latency(cfg)
    archive = Archive(space, scorer, _cost_fn(cfg, space), Budget.from_config(cfg.search),
                      latency[0] if latency else None)
    algo = create_algorithm(archive, cfg.search)
    state_path = out / "last.pth"
    sig = signature(cfg, scorer, latency)
    if dist.broadcast_object(state_path.is_file()):  # rank 0 decides: all ranks take one path
        state = load_checkpoint(state_path)
        check_resumable(state, sig, state_path)
        algo.load(state["search"])
        log.info("search: continuing from %s (%s %d)", state_path, algo.round_name, algo.position)
    else:
        algo.start()
        _save(algo, sig, state_path)

    with RunLogger(out) as logger:
        bar = progress(range(algo.position, max(algo.rounds, algo.position)),
                       desc=f"search ({cfg.search.algorithm})")
        for _ in bar:
            if algo.done:
                break
            logger.log(algo.position + 1, **algo.step())
            _save(algo, sig, state_path)
            best = archive.best()
            if best is not None:
                bar.set_postfix(best=float(archive.fitness([best["key"]])[0]), archs=len(archive))
    measured_before = sum("latency_measured_ms" in r for r in archive.records)
    skipped = remeasure_choice(algo)
    if sum("latency_measured_ms" in r for r in archive.records) > measured_before:
        _save(algo, sig, state_path)  # a continued search reuses the measurements
    result = build_result(cfg, algo, scorer, latency, skipped)
    if dist.is_main():
        metric = scorer.reward_terms[0][0] if len(scorer.reward_terms) == 1 else "fitness"
        write_outputs(out, cfg, result, metric)
    dist.barrier()
    return result


def _save(algo: SearchAlgorithm, sig: dict, path: Path) -> None:
    """Atomic save of the search state by rank 0."""
    if dist.is_main():
        save_checkpoint({"search": algo.state(), "signature": sig}, path)


def remeasure_choice(algo: SearchAlgorithm) -> Optional[str]:
    """While the algorithm's choice is feasible by predicted latency but within the latency
    model's margin of a limit, re-measure it on the build's scale (`LatencyModel.remeasure`, rank
    0's number everywhere) and record it; one measured past the limit is no longer choosable, so
    the next choice is examined. Returns why re-measuring was skipped (the model was built on
    another machine), else None."""
    archive = algo.archive
    while archive.latency is not None:
        chosen, _ = algo.choose()
        limit = None if chosen is None else archive.limit_to_check(chosen)
        if limit is None:
            return None
        difference = archive.latency.machine_difference()
        if difference is not None:
            log.warning("search: the chosen architecture's predicted latency %.4g ms is within the latency "
                        "model's margin (%.1f%%) of a limit, but it cannot be re-measured here (%s); "
                        "it is chosen on its prediction", chosen[LATENCY], 100 * archive.latency.margin, difference)
            return difference
        again = dist.broadcast_object(archive.latency.remeasure(chosen["arch"], near_ms=limit) if dist.is_main() else None)
        archive.set_measured(chosen["key"], again.median_ms, again.shift)
        log.info("search: re-measured a candidate near the latency limit %.4g ms: predicted %.4g ms, measured %.4g ms "
                 "(%.4g ms now x %.3g, the shift of %d reference architectures since the build)%s",
                 limit, chosen[LATENCY], again.median_ms, again.raw_ms, again.shift,
                 again.references, "" if archive.choosable(archive.get(chosen["key"])) else " (past the limit: not chosen)")
    return None


def latency_report(archive: Archive, path: Path, skipped: Optional[str]) -> dict:
    """result.json's `latency_model`: the file, its description and margin, and every re-measured
    candidate with its prediction, measurement and whether it stayed inside the limits."""
    return {"path": str(path.resolve()), "margin": archive.latency.margin, **archive.latency.describe(),
            "remeasure_skipped": skipped,
            "remeasured": [{"arch": r["arch"], LATENCY: r[LATENCY], "latency_measured_ms": r["latency_measured_ms"],
                            "latency_shift": r["latency_shift"], "within_limits": archive.choosable(r)}
                           for r in archive.records if "latency_measured_ms" in r]}


def build_result(cfg: Config, algo: SearchAlgorithm, scorer: Scorer,
                 latency: Optional[tuple[LatencyModel, Path]] = None, skipped: Optional[str] = None) -> dict:
    """result.json: config, seed, budget, every architecture met, the Pareto front, top-k, choice,
    and with latency the model used and the re-measured candidates."""
    archive = algo.archive
    chosen, extra = algo.choose()
    fit = dict(zip((r["key"] for r in archive.records), archive.fitness().tolist()))

    def with_fitness(record: dict) -> dict:
        return entry({**record, "fitness": fit[record["key"]]} if record["feasible"] else record)

    if chosen is None:
        raise UserError("no architecture inside the budget was scored as valid (and within a latency "
                        "limit when re-measured); widen search.macs_min/max, params_min/max or latency_min/max")
    if "rl" in extra:
        extra["rl"]["argmax"] = with_fitness(extra["rl"]["argmax"])
    return {
        "config": cfg.to_dict(),
        "seed": cfg.search.seed,
        "algorithm": cfg.search.algorithm,
        "scorer": {"name": scorer.name, "fields": list(scorer.fields),
                   "reward_terms": [list(t) for t in scorer.reward_terms]},
        "budget": {"primary": archive.budget.primary, "macs": list(archive.budget.macs),
                   "params": list(archive.budget.params), LATENCY: list(archive.budget.latency_ms)},
        **({"latency_model": latency_report(archive, latency[1], skipped)} if latency else {}),
        "progress": {algo.round_name + "s": algo.position},
        "chosen": with_fitness(chosen),
        "pareto_front": [entry(r) for r in archive.pareto_front()],
        "top_k": [entry(r) for r in archive.top_k(cfg.search.top_k)],
        "evaluated": [with_fitness(r) for r in archive.records],
        **extra,
    }


def run(cfg: Config, ctx: StageContext) -> dict:
    """`vitas search`: build the scorer and search; the summary has the chosen arch, its cost and
    scores, and the output folder (on every rank)."""
    scorer = create_scorer(cfg)
    if cfg.search.array_jobs > 0:
        scorer.compute_fn = ArrayScoring(cfg)
    chosen = search(cfg, scorer, ctx.dir)["chosen"]
    latency = {k: chosen[k] for k in (LATENCY, "latency_measured_ms") if k in chosen}
    return {"arch": chosen["arch"], "macs": chosen["macs"], "params": chosen["params"], **latency,
            "scores": chosen["scores"], "fitness": chosen["fitness"], "output": str(ctx.dir)}


def _report(summary: dict) -> list[str]:
    scores = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in summary["scores"].items())
    latency = f"  latency {summary[LATENCY]:.4g} ms (predicted)" if LATENCY in summary else ""
    if "latency_measured_ms" in summary:
        latency += f", {summary['latency_measured_ms']:.4g} ms (re-measured)"
    return [f"chosen architecture: {json.dumps(summary['arch'])}",
            f"  macs {summary['macs']:,}  params {summary['params']:,}{latency}  {scores}",
            f"  outputs in {summary['output']}"]


STAGE = Stage(
    name="search", folder=SEARCH, check=check, run=run, report=_report,
    help="search architectures (GA, NSGA-II, RL or random; inherited accuracy or proxies)",
    description="Search the config's space with search.algorithm (ga: constrained GA, nsga2: "
    "score vs search.constraint Pareto front, rl: As-ViT REINFORCE, random: uniform inside the "
    "budget) scored by search.scorer (accuracy: hold-out top-1 with weights inherited from the "
    "superformer; proxy: training-free). Budgets: search.macs_min/max, search.params_min/max, "
    "search.latency_min/max (ms per batch, from the latency model: vitas latency build). Writes "
    "OUTPUT_DIR/search/{config.yaml,last.pth,result.json,arch.json,pareto.png,retrain.yaml}; a "
    "second run with the same OUTPUT_DIR continues from last.pth. The last line of stdout is a "
    "JSON object {arch, macs, params, [latency_ms, latency_measured_ms,] scores, output}.",
    last_line=("arch", "macs", "params", LATENCY, "latency_measured_ms", "scores", "output"))
