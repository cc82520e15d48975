"""The `vitas search` stage (also the submitit entry `search.runner:run`).

Runs the GA, NSGA-II or RL search over the configured scorer in one process, under torchrun or as
Slurm tasks: every rank runs the same search (same seeds, rank 0's scores broadcast) and shares the
scoring work; rank 0 writes. The state is saved to `<output_dir>/search/last.pth` after every
generation or RL step, and a search started again with the same output_dir continues
from it to the same result. With `search.array_jobs > 0` the candidates of each round are split
into that many chunks, scored as a Slurm job array (`core.launch.submit_array`; submitit's local
executor without sbatch) and merged.

Outputs in `<output_dir>/search/`: config.yaml, last.pth, result.json, arch.json, pareto.png,
retrain.yaml, log.jsonl and TensorBoard events.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np

from vitas.core import dist
from vitas.core.checkpoint import load_checkpoint, save_checkpoint
from vitas.core.config import Config, save_config
from vitas.core.data import num_classes
from vitas.core.errors import UserError
from vitas.core.launch import submit_array, wait_result
from vitas.core.logs import RunLogger, progress, setup_logging
from vitas.search.archive import Archive, Budget
from vitas.search.algorithms.evolution import Evolution
from vitas.search.report import entry, write_outputs
from vitas.search.algorithms.rl import Reinforce
from vitas.search.scoring.base import Scorer, create_scorer, scorer_class
from vitas.supernet.complexity import arch_cost
from vitas.supernet.space import space_from_config

STAGE = "search"
ENTRY = "vitas.search.runner:run"
ALGORITHMS = ("ga", "nsga2", "rl")
# Settings that shape the search path: a saved state made under others is not continued.
PATH_KEYS = ("algorithm", "scorer", "seed", "population", "constraint", "macs_min", "macs_max",
             "params_min", "params_max", "mutation_prob", "crossover_prob", "rl_lr",
             "rl_baseline_momentum", "rl_window", "proxy_combine", "proxy_weights")

log = logging.getLogger(__name__)
Searcher = Union[Evolution, Reinforce]


def score_chunk(cfg: Config, archs: list[dict]) -> list[dict]:
    """Array-job entry: the metrics of one chunk of candidates, computed by a fresh scorer."""
    return scorer_class(cfg.search.scorer)(cfg).compute(archs)


class ArrayScoring:
    """A scorer `compute_fn` that scores candidates as a job array of `search.array_jobs` chunks."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def __call__(self, archs: list[dict]) -> list[dict]:
        if not dist.is_main():
            return []  # rank 0 submits; Scorer.score broadcasts its merged results
        chunks = [list(c) for c in np.array_split(np.array(archs, dtype=object),
                                                  min(self.cfg.search.array_jobs, len(archs)))]
        jobs = submit_array(self.cfg, "vitas.search.runner:score_chunk", chunks, stage=STAGE)
        return [metrics for job in jobs for metrics in wait_result(job)]


def signature(cfg: Config, scorer: Scorer) -> dict:
    """What a saved state must agree on to be continued: search-path settings, the scorer's own
    settings (what its cached numbers depend on) and the space."""
    return {**{f"search.{k}": getattr(cfg.search, k) for k in PATH_KEYS}, **scorer.settings(),
            "space": scorer.space.spec()}


def check_config(cfg: Config) -> None:
    """UserErrors for search settings no algorithm can run with."""
    s = cfg.search
    if s.algorithm not in ALGORITHMS:
        raise UserError(f"search.algorithm must be one of {list(ALGORITHMS)}, got {s.algorithm!r}")
    if s.array_jobs < 0:
        raise UserError(f"search.array_jobs must be >= 0, got {s.array_jobs}")
    if s.top_k < 1:
        raise UserError(f"search.top_k must be >= 1, got {s.top_k}")


def build_searcher(cfg: Config, archive: Archive) -> Searcher:
    """Evolution (ga, nsga2) or Reinforce (rl) with the config's settings."""
    s = cfg.search
    if s.algorithm == "rl":
        return Reinforce(archive, s.steps, s.rl_lr, s.rl_baseline_momentum, s.rl_window, s.seed)
    return Evolution(s.algorithm, archive, s.population, s.generations, s.mutation_prob,
                     s.crossover_prob, s.seed)


def search(cfg: Config, scorer: Scorer, cost_fn: Callable[[dict], Any]) -> dict:
    """Run (or continue) the configured search with `scorer`; rank 0 writes the outputs.

    Returns the result (as written to result.json) on every rank.
    """
    check_config(cfg)
    space = scorer.space
    budget = Budget.from_config(cfg.search)
    archive = Archive(space, scorer, cost_fn, budget)
    searcher = build_searcher(cfg, archive)
    out = cfg.stage_dir(STAGE)
    state_path = out / "last.pth"
    sig = signature(cfg, scorer)
    if dist.broadcast_object(state_path.is_file()):  # rank 0 decides: all ranks take one path
        _resume(searcher, load_checkpoint(state_path), sig, state_path)
        log.info("search: continuing from %s (%s)", state_path, _position(searcher))
    elif isinstance(searcher, Evolution):
        searcher.initialize(lambda rng: space.sample_in_range(rng, cost_fn, macs=budget.macs, params=budget.params))
        _save(searcher, sig, state_path)
    if dist.is_main():  # only now: a bad budget or a missing checkpoint leaves no output folder
        save_config(cfg, out / "config.yaml")

    total = cfg.search.steps if isinstance(searcher, Reinforce) else cfg.search.generations
    done = searcher.step_count if isinstance(searcher, Reinforce) else searcher.generation
    with RunLogger(out) as logger:
        bar = progress(range(done, max(total, done)), desc=f"search ({cfg.search.algorithm})")
        for _ in bar:
            if searcher.done:
                break
            _advance(searcher, sig, state_path, logger)
            best = archive.best()
            if best is not None:
                bar.set_postfix(best=float(archive.fitness([best["key"]])[0]), archs=len(archive))
        _save(searcher, sig, state_path)
    result = build_result(cfg, searcher, archive, scorer)
    if dist.is_main():
        metric = scorer.reward_terms[0][0] if len(scorer.reward_terms) == 1 else "fitness"
        write_outputs(out, cfg, result, metric)
    dist.barrier()
    return result


def _advance(searcher: Searcher, sig: dict, state_path: Path, logger: RunLogger) -> None:
    """One generation (or RL step), logged and saved."""
    archive = searcher.archive
    if isinstance(searcher, Reinforce):
        info = searcher.step()
        logger.log(info["step"], reward=info["reward"], baseline=info["baseline"],
                   entropy=info["entropy"], archs=len(archive))
        _save(searcher, sig, state_path)
        return
    bred = searcher.step()
    best = archive.best()
    logger.log(searcher.generation, offspring=bred, archs=len(archive),
               feasible=sum(r["feasible"] for r in archive.records),
               best_fitness=float(archive.fitness([best["key"]])[0]) if best else float("nan"))
    log.info("search: generation %d/%d, %d archs", searcher.generation, searcher.generations, len(archive))
    _save(searcher, sig, state_path)


def _position(searcher: Searcher) -> str:
    if isinstance(searcher, Reinforce):
        return f"step {searcher.step_count}"
    return f"generation {searcher.generation}"


def _save(searcher: Searcher, sig: dict, path: Path) -> None:
    """Atomic save of the search state by rank 0."""
    if dist.is_main():
        save_checkpoint({"search": searcher.state(), "signature": sig}, path)


def _resume(searcher: Searcher, state: dict, sig: dict, path: Path) -> None:
    """Load a saved state after checking it was made with the same search-path settings."""
    saved = state.get("signature", {})
    for key in sig:
        if saved.get(key) != sig[key]:
            what = "the search space" if key == "space" else f"{key}={saved.get(key)!r}"
            raise UserError(f"{path} was made with {what}, which this config changes; "
                            "use another output_dir or delete the file to start over")
    searcher.load(state["search"])


def build_result(cfg: Config, searcher: Searcher, archive: Archive, scorer: Scorer) -> dict:
    """result.json: config, seed, budget, every architecture met, the Pareto front, top-k, choice.

    RL's choice is the policy's argmax (As-ViT), taken when it fits the budget and is valid;
    otherwise, and for evolution, the best-fitness architecture inside the budget.
    """
    argmax = None
    if isinstance(searcher, Reinforce):
        argmax = archive.evaluate([searcher.argmax_arch()], found=searcher.step_count)[0]
    fit = dict(zip((r["key"] for r in archive.records), archive.fitness().tolist()))

    def with_fitness(record: dict) -> dict:
        return entry({**record, "fitness": fit[record["key"]]} if record["feasible"] else record)

    best = archive.best()
    extra: dict[str, Any] = {}
    if argmax is not None:
        extra["rl"] = {"argmax": with_fitness(argmax), "argmax_chosen": archive.scored(argmax),
                       "final_entropy": searcher.entropy(), "trace": searcher.trace}
        if archive.scored(argmax):
            best = argmax
    if best is None:
        raise UserError("no architecture inside the budget was scored as valid; "
                        "widen search.macs_min/max or search.params_min/max")
    return {
        "config": cfg.to_dict(),
        "seed": cfg.search.seed,
        "algorithm": cfg.search.algorithm,
        "scorer": {"name": scorer.name, "fields": list(scorer.fields),
                   "reward_terms": [list(t) for t in scorer.reward_terms]},
        "budget": {"primary": archive.budget.primary, "macs": list(archive.budget.macs),
                   "params": list(archive.budget.params)},
        "progress": {"generations": getattr(searcher, "generation", None),
                     "steps": getattr(searcher, "step_count", None)},
        "chosen": with_fitness(best),
        "pareto_front": [entry(r) for r in archive.pareto_front()],
        "top_k": [entry(r) for r in archive.top_k(cfg.search.top_k)],
        "evaluated": [with_fitness(r) for r in archive.records],
        **extra,
    }


def run(cfg: Config) -> dict:
    """`vitas search`: join the process group, build the scorer and cost model, search.

    Returns a summary on every rank: the chosen arch, its cost and scores, and the output folder.
    """
    dist.init_distributed()
    setup_logging()
    check_config(cfg)
    space = space_from_config(cfg)
    classes = num_classes(cfg.data)
    scorer = create_scorer(cfg)
    if cfg.search.array_jobs > 0:
        scorer.compute_fn = ArrayScoring(cfg)
    result = search(cfg, scorer, lambda arch: arch_cost(arch, space, classes))
    chosen = result["chosen"]
    return {"arch": chosen["arch"], "macs": chosen["macs"], "params": chosen["params"],
            "scores": chosen["scores"], "fitness": chosen["fitness"], "output": str(cfg.stage_dir(STAGE))}
