"""Training-free auto-scaling, As-ViT Algorithm 2, adapted to the flat ViTs of this project.

From a seed architecture, each step tries 4 depth moves x 4 width ratios {1.05, 1.1, 1.15, 1.2}:
the depth move adds one layer to one of 4 stages (the seed's layers split into quarters; the new
layer copies the stage's last layer, or its nearest neighbour when the stage is empty), and the
ratio widens embed_dim and every attn_dim and mlp_dim, each rounded up to a multiple of the head
count (of every layer for embed_dim; of the fixed head_dim, adding heads, in spaces that fix it).
Candidates are ranked by L^E (descending) plus kappa (ascending); the best rank sum (first on ties)
is kept, until the parameter count reaches `scale.param_limit`. Grown architectures leave
the space's choices, so they are built as StaticViTs. Every grown architecture, its proxies,
params and MACs go to `<output_dir>/scale/trajectory.json`, rewritten after each step; a rerun
with the same seed and settings continues from it, and one with other settings is refused.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from scipy.stats import rankdata

from vitas.core.checkpoint import write_json
from vitas.core.config import Config
from vitas.core.data import check_data_source, num_classes
from vitas.core.errors import UserError
from vitas.core.layout import SCALE, run_layout
from vitas.core.stage import Option, Stage, StageContext
from vitas.search.proxies.measures import check_proxy_config, ntk_batch, proxy_scores
from vitas.supernet.complexity import arch_cost
from vitas.supernet.space import SearchSpace, load_arch, space_from_config
from vitas.supernet.static import StaticViT, check_arch

log = logging.getLogger("vitas.scale")

RATIOS = (1.05, 1.1, 1.15, 1.2)
STAGES = 4


def seed_stages(depth: int) -> list[int]:
    """Stage (0..3) of each of the seed's layers: its depth split into quarters."""
    return [i * STAGES // depth for i in range(depth)]


def _round_up(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple - 1e-9)) * multiple


def deepen(arch: dict, stages: list[int], stage: int) -> tuple[dict, list[int]]:
    """`arch` with one more layer in `stage`: a copy of that stage's last layer (or, for an empty
    stage, of the nearest layer before it, else after it), placed at the stage's end."""
    members = [i for i, s in enumerate(stages) if s == stage]
    before = [i for i, s in enumerate(stages) if s < stage]
    src = members[-1] if members else (before[-1] if before else 0)
    at = (members[-1] if members else (before[-1] if before else -1)) + 1
    out = dict(arch, depth=arch["depth"] + 1)
    for f in ("num_heads", "attn_dim", "mlp_dim"):
        out[f] = arch[f][:at] + [arch[f][src]] + arch[f][at:]
    return out, stages[:at] + [stage] + stages[at:]


def widen(arch: dict, ratio: float, head_dim: Optional[int] = None) -> dict:
    """`arch` with every width times `ratio`, rounded up to a multiple of the head count (embed:
    of all layers' counts); with a fixed `head_dim`, attn widths grow by whole heads instead."""
    heads = arch["num_heads"]
    out = dict(arch, embed_dim=_round_up(arch["embed_dim"] * ratio, math.lcm(*heads)))
    if head_dim:
        out["num_heads"] = [_round_up(a * ratio, head_dim) // head_dim for a in arch["attn_dim"]]
        out["attn_dim"] = [h * head_dim for h in out["num_heads"]]
    else:
        out["attn_dim"] = [_round_up(a * ratio, h) for a, h in zip(arch["attn_dim"], heads)]
    out["mlp_dim"] = [_round_up(m * ratio, h) for m, h in zip(arch["mlp_dim"], heads)]
    return out


def candidates(arch: dict, stages: list[int], head_dim: Optional[int] = None) -> list[dict]:
    """The 16 scaling choices of one step: {"stage", "ratio", "arch", "stages"} (stage-major)."""
    out = []
    for stage in range(STAGES):
        deeper, new_stages = deepen(arch, stages, stage)
        for ratio in RATIOS:
            out.append({"stage": stage, "ratio": ratio, "arch": widen(deeper, ratio, head_dim),
                        "stages": new_stages})
    return out


def best_choice(records: list[dict]) -> int:
    """Index of the smallest rank(L^E descending) + rank(kappa ascending) among valid records
    (the first on ties); -1 when none is valid."""
    valid = [i for i, r in enumerate(records) if r["valid"]]
    if not valid:
        return -1
    total = rankdata([-records[i]["length_distortion"] for i in valid]) + rankdata(
        [records[i]["ntk_condition"] for i in valid])
    for i, t in zip(valid, total):
        records[i]["rank_sum"] = float(t)
    return valid[int(np.argmin(total))]


class Scaler:
    """Runs Algorithm 2 for one config: builds static models and scores them with the proxies."""

    def __init__(self, cfg: Config, images: Optional[torch.Tensor] = None):
        check_proxy_config(cfg.proxy)
        self.cfg = cfg
        self.space: SearchSpace = space_from_config(cfg)
        self.classes = num_classes(cfg.data)
        self.images = ntk_batch(cfg) if images is None else images

    def measure(self, arch: dict) -> dict:
        """Proxies (L^E, kappa, valid), params and MACs of a static `arch`."""
        with torch.random.fork_rng(devices=[]):  # the constructor's own init is re-drawn anyway
            model = StaticViT(**self.space.model_args(arch, self.classes))
        scores = proxy_scores(model, None, self.images, self.cfg.proxy, curvature=False)
        cost = arch_cost(arch, self.space, self.classes)
        return {k: v for k, v in scores.items() if k != "curvature"} | {"params": cost.params, "macs": cost.macs}

    def step(self, arch: dict, stages: list[int]) -> dict:
        """One scaling step from `arch`: every candidate measured, the best one chosen."""
        cands = candidates(arch, stages, self.space.cfg.head_dim)
        for c in cands:
            c.update(self.measure(c["arch"]))
        best = best_choice(cands)
        if best < 0:
            raise UserError(f"every scaling candidate of {json.dumps(arch)} has an invalid NTK; "
                            "try other proxy settings (proxy.ntk_images, proxy.seed)")
        chosen = cands[best]
        return {"arch": chosen["arch"], "stages": chosen["stages"],
                "choice": {"stage": chosen["stage"], "ratio": chosen["ratio"]},
                **{k: chosen[k] for k in ("length_distortion", "ntk_condition", "valid", "params", "macs")},
                "candidates": [{k: v for k, v in c.items() if k != "stages"} for c in cands]}


def seed_arch(cfg: Config) -> dict:
    """`scale.seed_arch` read and checked: whole positive sizes, consistent layer lists, a patch
    that divides the image (UserErrors naming the field)."""
    if not cfg.scale.seed_arch:
        raise UserError("scale.seed_arch is not set (pass --seed-arch FILE_OR_JSON)")
    try:
        arch = check_arch(load_arch(cfg.scale.seed_arch, "--seed-arch"))
    except ValueError as exc:
        raise UserError(f"--seed-arch: {exc}") from None
    if cfg.space.img_size % arch["patch_size"]:
        raise UserError(f"--seed-arch: patch_size {arch['patch_size']} does not divide "
                        f"space.img_size {cfg.space.img_size}")
    return arch


def _header(cfg: Config, seed: dict) -> dict:
    """What a trajectory depends on: seed, limit, proxy options, space, the moves."""
    return json.loads(json.dumps({"seed_arch": seed, "param_limit": cfg.scale.param_limit,
                                  "proxy": dataclasses.asdict(cfg.proxy), "space": cfg.space.name,
                                  "ratios": list(RATIOS), "stages": STAGES}))


def check(cfg: Config) -> None:
    """The seed, the proxy options, the data, and a trajectory this run could not continue."""
    check_proxy_config(cfg.proxy)
    check_data_source(cfg.data, holdout=False)
    header = _header(cfg, seed_arch(cfg))
    path = run_layout(cfg.output_dir).scale_trajectory
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path} is not a trajectory (not JSON); delete it to start over") from None
        changed = [k for k, v in header.items() if not isinstance(old, dict) or old.get(k) != v]
        if changed:
            raise UserError(f"{path} was grown with other settings ({changed[0]} differs); use "
                            "another output_dir or delete it to start over")


def scale(cfg: Config, seed: dict, path: Path, images: Optional[torch.Tensor] = None) -> dict:
    """Grow `seed` until `scale.param_limit`, continuing the trajectory in `path` (written after
    every step); returns it."""
    limit = cfg.scale.param_limit
    scaler = Scaler(cfg, images)
    header = _header(cfg, seed)
    traj = json.loads(path.read_text()) if path.is_file() else None
    if not traj or not traj.get("steps"):
        measured = scaler.measure(seed)
        first = {"step": 0, "arch": seed, "stages": seed_stages(seed["depth"]), "choice": None,
                 **measured}
        traj = dict(header, steps=[first])
        write_json(traj, path)
    while traj["steps"][-1]["params"] < limit:
        last = traj["steps"][-1]
        grown = {"step": last["step"] + 1, **scaler.step(last["arch"], last["stages"])}
        traj["steps"].append(grown)
        write_json(traj, path)
        log.info("scale step %d: stage %d x%.2f -> params %d macs %d L^E %.4g kappa %.4g",
                 grown["step"], grown["choice"]["stage"], grown["choice"]["ratio"], grown["params"],
                 grown["macs"], grown["length_distortion"], grown["ntk_condition"])
    return traj


def run(cfg: Config, ctx: StageContext) -> dict:
    """Stage entry (`vitas scale`, `vitas submit scale`): grow `scale.seed_arch`."""
    traj = scale(cfg, seed_arch(cfg), run_layout(cfg.output_dir).scale_trajectory)
    last = traj["steps"][-1]
    return {"arch": last["arch"], "params": last["params"], "macs": last["macs"],
            "steps": len(traj["steps"]) - 1, "trajectory": traj["steps"],
            "output": str(run_layout(cfg.output_dir).scale_trajectory)}


def _report(summary: dict) -> list[str]:
    lines = [f"{'step':>4} {'depth':>5} {'embed':>5} {'params':>12} {'macs':>14} {'L^E':>10} {'kappa':>10}"]
    for s in summary["trajectory"]:
        a = s["arch"]
        lines.append(f"{s['step']:>4} {a['depth']:>5} {a['embed_dim']:>5} {s['params']:>12,} "
                     f"{s['macs']:>14,} {s['length_distortion']:>10.4g} "
                     f"{s['ntk_condition'] or float('nan'):>10.4g}")
    return lines


STAGE = Stage(
    name="scale", folder=SCALE, check=check, run=run, report=_report,
    options=(Option("--seed-arch", "scale.seed_arch", "seed architecture: arch.json or inline JSON "
                    "(may lie outside the space); default scale.seed_arch", metavar="FILE_OR_JSON"),),
    help="grow a seed architecture by L^E and NTK condition (As-ViT Algorithm 2)",
    description="Training-free auto-scaling: from the seed architecture, each step tries 4 depth "
    "moves (one more layer in one quarter of the network) x 4 width ratios {1.05, 1.1, 1.15, 1.2} "
    "and keeps the best rank sum of L^E (descending) and NTK condition (ascending), until "
    "scale.param_limit parameters. Writes OUTPUT_DIR/scale/trajectory.json (every grown "
    "architecture with proxies, params, MACs); a rerun continues it. The last line of stdout is "
    "a JSON object {arch, params, macs, steps, output}.",
    last_line=("arch", "params", "macs", "steps", "output"))
