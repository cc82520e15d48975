"""Step-time cost of each superformer training option against plain `supernet.sampling=uniform`.

Every option is one config: yamls/fidelity-counting.yaml (32 px, 6 classes, batch 64, cyclic embed
widths) with its overrides. Each gets the superformer, `SubnetSampler`, `Trainer` and step
function that `vitas train-supernet` builds (`supernet.train.make_train_step`), and runs the body
of `Trainer.fit`'s loop (seed the step's RNGs, the step's passes, `Trainer.step()`: clip, AdamW,
schedule, EMA) on random 3x32x32 images and labels; no data set, no checkpoint writes, no logging.

The options run interleaved step by step: `--rounds` rounds of `--steps` steps, each step one step
of every option in turn (the order rotated every round), after `--warmup` untimed steps of each, so
load drift hits every option alike. Step k of every option draws the same random subnet (one
seed). Reported: seconds per step over all timed steps and their ratio to uniform's (a ratio of
means: the random subnets' costs spread widely, so a ratio per round varies with the draws; its
range over rounds is in the JSON). Wall and CPU seconds are both kept: on a loaded machine the CPU
ratio (one thread; it leaves out the time other processes take) is the steadier one. The time the
sampler itself takes (part of the step) is reported apart, with the forward/backward passes per
step as the sampler gives them and their summed MACs per image, averaged over the timed steps
(what the drawn subnets cost: `macs_bins` draws other subnets than `genes`). `max warm-up step` is
a step of the first `supernet.max_warmup_epochs` epochs.

Run: `nice -n 5 .venv/bin/python bench/supernet_options.py` (about 4 minutes on one loaded thread;
BENCH_THREADS sets torch's threads, default 1; `--option NAME`, repeated, measures only those
options beside uniform, e.g. a new one with `--out` elsewhere). Writes bench/results/supernet_options.json and
prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from vitas.core.checkpoint import write_json
from vitas.core.config import Config, load_config
from vitas.core.data import create_loss, create_mixup, num_classes
from vitas.core.engine import Trainer, derive_seed, seed_all
from vitas.supernet.model import Superformer
from vitas.supernet.sampling import Pass, SubnetSampler
from vitas.supernet.space import SearchSpace
from vitas.supernet.train import make_train_step

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "yamls" / "fidelity-counting.yaml"
BILATERAL = "space.channels.embed=bilateral"
REFERENCE = "uniform"
OPTIONS: dict[str, list[str]] = {  # name: overrides of the fidelity-counting config
    REFERENCE: ["supernet.sampling=uniform"],
    "uniform, bilateral space": ["supernet.sampling=uniform", BILATERAL],
    "autoslim, bilateral space": ["supernet.sampling=autoslim", BILATERAL],
    "bcnet, bilateral space": ["supernet.sampling=bcnet", BILATERAL],
    "sandwich": ["supernet.sampling=sandwich"],
    "sandwich + distill kl": ["supernet.sampling=sandwich", "supernet.distill=true",
                              "supernet.distill_loss=kl"],
    "sandwich + distill alpha": ["supernet.sampling=sandwich", "supernet.distill=true",
                                 "supernet.distill_loss=alpha"],
    "uniform + distill kl": ["supernet.sampling=uniform", "supernet.distill=true",
                             "supernet.distill_loss=kl"],
    "uniform + macs_bins": ["supernet.sampling=uniform", "supernet.cost_sampling=macs_bins"],
    "sandwich, 2 random subnets": ["supernet.sampling=sandwich", "supernet.random_subnets=2"],
    "sandwich + macs_bins": ["supernet.sampling=sandwich", "supernet.cost_sampling=macs_bins"],
    "sandwich + grad_projection": ["supernet.sampling=sandwich", "supernet.grad_projection=true"],
    "sandwich + distill kl + grad_projection": ["supernet.sampling=sandwich", "supernet.distill=true",
                                                "supernet.grad_projection=true"],
    "sandwich + per-patch norms": ["supernet.sampling=sandwich", "space.norms=per_patch"],
    "sandwich + patch cycle": ["supernet.sampling=sandwich", "supernet.patch_cycle=true"],
    "sandwich + per-patch blocks + patch cycle": ["supernet.sampling=sandwich", "space.blocks=per_patch",
                                                  "supernet.patch_cycle=true"],
    "sandwich, identity shifting off": ["supernet.sampling=sandwich", "supernet.identity_shift=false"],
    # epoch 0 of progressive shrinking: only the depth released, the widths held at their max
    "sandwich + progressive, first stage": ["supernet.sampling=sandwich",
                                            "supernet.progressive=[depth,mlp_dim,num_heads+attn_dim,embed_dim]"],
    "uniform + ema": ["supernet.sampling=uniform", "supernet.ema=true"],
    "max warm-up step": ["supernet.sampling=uniform", "supernet.max_warmup_epochs=1"],
}


class TimedSampler:
    """The run's `SubnetSampler`, with the seconds its `passes` takes and the passes it gives."""

    def __init__(self, sampler: SubnetSampler) -> None:
        self.sampler, self.seconds, self.counts = sampler, 0.0, []
        self.drawn: list[list[Pass]] = []  # every step's passes (their MACs are counted after the run)

    def passes(self, step: int, epoch: int) -> list[Pass]:
        start = time.perf_counter()
        out = self.sampler.passes(step, epoch)
        self.seconds += time.perf_counter() - start
        self.counts.append(len(out))
        self.drawn.append(out)
        return out


class Option:
    """One option's superformer, trainer and step function, built as `vitas train-supernet` does."""

    def __init__(self, cfg: Config, stage_dir: Path, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        start = time.perf_counter()
        sec = cfg.supernet
        seed_all(sec.seed)
        space = SearchSpace(cfg.space)
        n_classes = num_classes(cfg.data)
        mixup = create_mixup(cfg.data, n_classes)
        model = Superformer(space, n_classes, drop_path=sec.drop_path)
        self.trainer = Trainer(model, sec, steps_per_epoch=1000, stage_dir=stage_dir,
                               device=torch.device("cpu"))
        self.sampler = TimedSampler(SubnetSampler(space, sec, lambda arch: space.cost(arch, n_classes)))
        criterion = create_loss(cfg.data, mixup is not None)
        self.step_fn: Callable[[Any], dict] = make_train_step(
            self.trainer, self.sampler, space, cfg, mixup, criterion)  # type: ignore[arg-type]
        self.batches, self.seed = batches, sec.seed
        self.macs = lambda arch: space.cost(arch, n_classes).macs
        self.setup_seconds = time.perf_counter() - start
        self.wall: list[float] = []  # per round: seconds per step
        self.cpu: list[float] = []
        self.sampler_seconds: list[float] = []

    def run(self, steps: int) -> tuple[float, float, float]:
        """`steps` steps (the body of `Trainer.fit`'s loop); wall, CPU and sampler seconds per step."""
        self.sampler.seconds = 0.0
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            t = self.trainer
            seed_all(derive_seed(self.seed, t.global_step, 0))
            self.step_fn(self.batches[t.global_step % len(self.batches)])
            t.step()
        return ((time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps,
                self.sampler.seconds / steps)


def summarize(options: dict[str, Option], ref: str) -> list[dict]:
    """Per option: seconds per step over all timed steps, its ratio to `ref`'s (same steps, same
    subnets), and the spread of the per-round ratios."""
    rows = []
    base = options[ref]
    for name, o in options.items():
        counts = sorted(set(o.sampler.counts))
        round_ratios = [a / b for a, b in zip(o.wall, base.wall)]
        rows.append({
            "option": name, "overrides": OPTIONS[name],
            "passes_per_step": counts[0] if len(counts) == 1 else counts,
            "mean_mmacs_per_step": statistics.mean(
                sum(o.macs(p.arch) for p in step) for step in o.sampler.drawn) / 1e6,
            "sec_per_step": statistics.mean(o.wall),
            "cpu_sec_per_step": statistics.mean(o.cpu),
            "ratio_to_uniform": sum(o.wall) / sum(base.wall),
            "cpu_ratio_to_uniform": sum(o.cpu) / sum(base.cpu),
            "round_ratio_range": [min(round_ratios), max(round_ratios)],
            "sampler_ms_per_step": 1e3 * statistics.mean(o.sampler_seconds),
            "setup_seconds": o.setup_seconds,
            "rounds_sec_per_step": o.wall, "rounds_cpu_sec_per_step": o.cpu,
        })
    return rows


def table(rows: list[dict]) -> str:
    """The markdown table of `rows`."""
    lines = ["| option | passes/step | MMACs/image/step | sec/step | ratio to uniform | CPU ratio | "
             "sampler ms/step |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['option']} | {r['passes_per_step']} | {r['mean_mmacs_per_step']:.2f} | "
                     f"{r['sec_per_step']:.3f} | "
                     f"{r['ratio_to_uniform']:.2f} | {r['cpu_ratio_to_uniform']:.2f} | "
                     f"{r['sampler_ms_per_step']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12, help="steps of each option per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each option first")
    parser.add_argument("--batches", type=int, default=4, help="distinct random batches cycled through")
    parser.add_argument("--option", action="append", choices=list(OPTIONS), metavar="NAME",
                        help=f"measure only these options beside {REFERENCE!r} (repeatable; default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "supernet_options.json")
    args = parser.parse_args()
    chosen = {n: o for n, o in OPTIONS.items() if not args.option or n == REFERENCE or n in args.option}
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    load_start = os.getloadavg()
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        base = load_config(CONFIG, [f"output_dir={tmp}"])
        sec = base.supernet
        gen = torch.Generator().manual_seed(0)
        batches = [(torch.randn(sec.batch_size, 3, base.space.img_size, base.space.img_size, generator=gen),
                    torch.randint(num_classes(base.data), (sec.batch_size,), generator=gen))
                   for _ in range(args.batches)]
        options = {name: Option(load_config(CONFIG, [f"output_dir={tmp}", *overrides]),
                                Path(tmp) / str(i), batches)
                   for i, (name, overrides) in enumerate(chosen.items())}
        for o in options.values():
            o.run(args.warmup)
            o.sampler.counts.clear()
            o.sampler.drawn.clear()
        names = list(options)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            sums = {name: [0.0, 0.0, 0.0] for name in names}  # wall, CPU, sampler seconds
            for _ in range(args.steps):  # one step of every option in turn
                for name in order:
                    for i, value in enumerate(options[name].run(1)):
                        sums[name][i] += value
            for name, (wall, cpu, sampler) in sums.items():
                options[name].wall.append(wall / args.steps)
                options[name].cpu.append(cpu / args.steps)
                options[name].sampler_seconds.append(sampler / args.steps)
            print(f"round {r + 1}/{args.rounds}: uniform {options[REFERENCE].wall[-1]:.3f} s/step, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    rows = summarize(options, REFERENCE)
    payload = {
        "what": "seconds per optimizer step of superformer training under each option over all timed "
                "steps, and its ratio to supernet.sampling=uniform's (interleaved rounds, same subnets)",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "config": str(CONFIG.relative_to(ROOT)), "batch_size": sec.batch_size,
        "img_size": base.space.img_size, "num_classes": num_classes(base.data),
        "rounds": args.rounds, "steps_per_round": args.steps, "warmup_steps": args.warmup,
        "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
        "total_seconds": round(time.perf_counter() - tic, 1), "results": rows,
    }
    write_json(payload, args.out)
    print(table(rows))
    print(f"load average {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}; "
          f"{payload['total_seconds']} s in all; wrote {args.out}")


if __name__ == "__main__":
    main()
