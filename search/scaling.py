"""Training-free auto-scaling, As-ViT Algorithm 2: on As-ViT's own hierarchical models
(`space.kind: asvit`) and adapted to the flat ViTs of this project.

As-ViT (`supernet.asvit_scaling`): the seed's topology (kernels, splits, expansions, heads) starts
at C = 32 with one block per stage; each step tries one more block in one of the 4 stages x 4
width ratios of C (rounded up to whole multiples of lcm(4, H/8), duplicates offered once), until
the parameter count reaches `scale.param_limit`.

Flat ViTs: from a seed architecture, each step tries 4 depth moves x 4 width ratios {1.05, 1.1, 1.15, 1.2}:
the depth move adds one layer to one of 4 stages (the seed's layers split into quarters; the new
layer copies the stage's last layer, or its nearest neighbour when the stage is empty), and the
ratio widens embed_dim and every attn_dim and mlp_dim, each rounded up to a multiple of the head
count (of every layer for embed_dim; of the fixed head_dim, adding heads, in spaces that fix it).
Candidates are ranked by L^E (descending) plus kappa (ascending); the best rank sum (first on ties)
is kept, until the parameter count reaches `scale.param_limit`. Grown architectures leave
the space's choices, so they are built as static models.

Both: every grown architecture, its proxies, params and MACs go to
`<output_dir>/scale/trajectory.json`, rewritten after each step, and each step's architecture to
its own file `<output_dir>/scale/archs/step<k>-<params>M.json` (a record whose "arch" `--arch`
reads); a rerun with the same seed and settings continues from the trajectory, and one with other
settings is refused.
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

from vitas.core.checkpoint import write_json
from vitas.core.config import Config
from vitas.core.data import check_data_source, num_classes
from vitas.core.errors import UserError
from vitas.core.layout import SCALE, run_layout
from vitas.core.stage import Option, Stage, StageContext
from vitas.search.proxies.measures import check_proxy_config, proxy_batch
from vitas.search.proxies.zoo import PROXIES, compute_proxies
from vitas.search.scoring.proxy import ProxyScorer
from vitas.supernet import asvit_scaling
from vitas.supernet.asvit import is_asvit_arch
from vitas.supernet.asvit_space import to_genotype
from vitas.supernet.models import create_model
from vitas.supernet.space import load_arch, space_from_config
from vitas.supernet.static import check_arch

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


def best_choice(records: list[dict], scorer: ProxyScorer) -> int:
    """Index of the valid record of highest `scorer` fitness (`proxy.combine`; As-ViT's default:
    the smallest rank of L^E descending plus rank of kappa ascending), the first on ties; -1 when
    none is valid. Each valid record gains its "fitness"."""
    valid = [i for i, r in enumerate(records) if r["valid"]]
    if not valid:
        return -1
    fitness = scorer.fitness([records[i] for i in valid])
    for i, f in zip(valid, fitness):
        records[i]["fitness"] = float(f)
    return valid[int(np.argmax(fitness))]


class Scaler:
    """Runs Algorithm 2 for one config: builds static models (StaticViT or AsViT) and scores them
    with the configured proxies (`proxy.names`, combined as `proxy.combine`)."""

    def __init__(self, cfg: Config, batch: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        check_proxy_config(cfg.proxy)
        self.cfg = cfg
        self.space = space_from_config(cfg)
        self.classes = num_classes(cfg.data)
        self.scorer = ProxyScorer(cfg, device="cpu")
        self.images, self.labels = proxy_batch(cfg) if batch is None else batch

    def measure(self, arch: dict) -> dict:
        """The proxies (and validity), params and MACs of `arch`'s static model."""
        with torch.random.fork_rng(devices=[]):  # the constructor's own init is re-drawn anyway
            model = create_model(self.space, arch, self.classes)
        scores = compute_proxies(self.scorer.names, model, None, self.images, self.cfg.proxy, self.labels)
        cost = self.space.cost(arch, self.classes)
        return scores | {"params": cost.params, "macs": cost.macs}

    def choose(self, records: list[dict]) -> int:
        """The candidate to keep (`best_choice` with this config's scorer)."""
        return best_choice(records, self.scorer)

    def step(self, arch: dict, stages: list[int]) -> dict:
        """One scaling step from `arch`: every candidate measured, the best one chosen."""
        cands = candidates(arch, stages, self.space.cfg.head_dim)
        for c in cands:
            c.update(self.measure(c["arch"]))
        best = self.choose(cands)
        if best < 0:
            raise UserError(f"every scaling candidate of {json.dumps(arch)} has an invalid NTK; "
                            "try other proxy settings (proxy.ntk_images, proxy.seed)")
        chosen = cands[best]
        return {"arch": chosen["arch"], "stages": chosen["stages"],
                "choice": {"stage": chosen["stage"], "ratio": chosen["ratio"]},
                **{k: chosen[k] for k in (*self.scorer.names, "valid", "params", "macs")},
                "candidates": [{k: v for k, v in c.items() if k != "stages"} for c in cands]}


def seed_arch(cfg: Config) -> dict:
    """`scale.seed_arch` read and checked: for As-ViT, a topology of the space, started at C = 32
    with one block per stage (Algorithm 2; its own width and depths are not used); for a flat ViT,
    whole positive sizes, consistent layer lists, a patch that divides the image (UserErrors
    naming the field)."""
    if not cfg.scale.seed_arch:
        raise UserError("scale.seed_arch is not set (pass --seed-arch FILE_OR_JSON)")
    raw = load_arch(cfg.scale.seed_arch, "--seed-arch")
    if cfg.space.kind == "asvit":
        try:
            topology = space_from_config(cfg).validate(raw)
        except UserError as exc:
            raise UserError(f"--seed-arch: {exc}") from None
        return asvit_scaling.scaling_seed(topology)
    try:
        arch = check_arch(raw)
    except ValueError as exc:
        raise UserError(f"--seed-arch: {exc}") from None
    if cfg.space.img_size % arch["patch_size"]:
        raise UserError(f"--seed-arch: patch_size {arch['patch_size']} does not divide "
                        f"space.img_size {cfg.space.img_size}")
    return arch


def _header(cfg: Config, seed: dict) -> dict:
    """What a trajectory depends on: seed, limit, proxy options, space, the moves."""
    ratios = asvit_scaling.RATIOS if cfg.space.kind == "asvit" else RATIOS
    return json.loads(json.dumps({"seed_arch": seed, "param_limit": cfg.scale.param_limit,
                                  "proxy": dataclasses.asdict(cfg.proxy), "space": cfg.space.name,
                                  "ratios": list(ratios), "stages": STAGES}))


def arch_file(folder: Path, step: dict) -> Path:
    """`<folder>/step<k>-<params>M.json`: the file of one trajectory step's architecture."""
    return folder / f"step{step['step']:03d}-{step['params'] / 1e6:.2f}M.json"


def proxies_of(step: dict) -> dict:
    """The proxy values a trajectory step holds (the configured ones)."""
    return {k: step[k] for k in PROXIES if k in step and k not in ("params", "macs")}


def _shown(step: dict) -> str:
    return " ".join(f"{k} {v:.4g}" if v is not None else f"{k} -" for k, v in proxies_of(step).items())


def write_arch_files(traj: dict, folder: Path) -> None:
    """One file per step of `traj` (those not yet written): the architecture with its step,
    params, MACs and proxies (and As-ViT's genotype string), written atomically."""
    for step in traj["steps"]:
        path = arch_file(folder, step)
        if not path.is_file():
            record = {"arch": step["arch"], "step": step["step"], "params": step["params"], "macs": step["macs"],
                      **proxies_of(step)}
            if is_asvit_arch(step["arch"]):
                record["genotype"] = to_genotype(step["arch"])
            write_json(record, path)


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


def scale(cfg: Config, seed: dict, path: Path,
          batch: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> dict:
    """Grow `seed` until `scale.param_limit`, continuing the trajectory in `path` (written after
    every step, with each step's architecture file in `path.parent / "archs"`); returns it."""
    limit = cfg.scale.param_limit
    scaler = Scaler(cfg, batch)
    header = _header(cfg, seed)
    traj = json.loads(path.read_text()) if path.is_file() else None
    archs = path.parent / "archs"
    if cfg.space.kind == "asvit":
        return _scale_asvit(scaler, header, traj, path, archs)
    if not traj or not traj.get("steps"):
        measured = scaler.measure(seed)
        first = {"step": 0, "arch": seed, "stages": seed_stages(seed["depth"]), "choice": None,
                 **measured}
        traj = dict(header, steps=[first])
        write_json(traj, path)
    write_arch_files(traj, archs)
    while traj["steps"][-1]["params"] < limit:
        last = traj["steps"][-1]
        grown = {"step": last["step"] + 1, **scaler.step(last["arch"], last["stages"])}
        traj["steps"].append(grown)
        write_json(traj, path)
        write_arch_files(traj, archs)
        log.info("scale step %d: stage %d x%.2f -> params %d macs %d %s", grown["step"],
                 grown["choice"]["stage"], grown["choice"]["ratio"], grown["params"], grown["macs"],
                 _shown(grown))
    return traj


def _scale_asvit(scaler: Scaler, header: dict, traj: Optional[dict], path: Path, archs: Path) -> dict:
    """As-ViT's Algorithm 2 (`supernet.asvit_scaling.grow`) from `header`'s seed, continuing
    `traj` after its last step; the trajectory and the step's architecture file are written after
    every step."""
    limit = header["param_limit"]
    start = traj["steps"][-1] if traj and traj.get("steps") else None
    if start is None:
        traj = dict(header, steps=[])
    write_arch_files(traj, archs)
    for record in asvit_scaling.grow(header["seed_arch"], scaler.measure, scaler.choose, limit, start=start):
        traj["steps"].append(record)
        write_json(traj, path)
        write_arch_files(traj, archs)
        if record["choice"] is not None:
            log.info("scale step %d: stage %d x%.2f -> %s params %d macs %d %s",
                     record["step"], record["choice"]["stage"] + 1, record["choice"]["ratio"],
                     to_genotype(record["arch"]), record["params"], record["macs"], _shown(record))
    if traj["steps"][-1]["params"] < limit:
        raise UserError(f"every scaling candidate of {json.dumps(traj['steps'][-1]['arch'])} has an "
                        "invalid NTK; try other proxy settings (proxy.ntk_images, proxy.seed)")
    return traj


def run(cfg: Config, ctx: StageContext) -> dict:
    """Stage entry (`vitas scale`, `vitas submit scale`): grow `scale.seed_arch`."""
    path = run_layout(cfg.output_dir).scale_trajectory
    traj = scale(cfg, seed_arch(cfg), path)
    last = traj["steps"][-1]
    return {"arch": last["arch"], "params": last["params"], "macs": last["macs"],
            "steps": len(traj["steps"]) - 1, "trajectory": traj["steps"], "output": str(path),
            "archs": str(run_layout(cfg.output_dir).scale_archs)}


def _depth(arch: dict) -> str:
    """The depth column: a flat ViT's layer count, As-ViT's blocks per stage (e.g. 3-1-4-2)."""
    if "stages" in arch:
        return "-".join(str(s["depth"]) for s in arch["stages"])
    return str(arch["depth"])


def _report(summary: dict) -> list[str]:
    names = list(proxies_of(summary["trajectory"][0]))
    lines = [f"{'step':>4} {'depth':>9} {'embed':>5} {'params':>12} {'macs':>14} "
             + " ".join(f"{n[:12]:>12}" for n in names)]
    for s in summary["trajectory"]:
        a = s["arch"]
        values = " ".join(f"{s[n]:>12.4g}" if s.get(n) is not None else f"{'-':>12}" for n in names)
        lines.append(f"{s['step']:>4} {_depth(a):>9} {a['embed_dim']:>5} {s['params']:>12,} "
                     f"{s['macs']:>14,} {values}")
    return lines


STAGE = Stage(
    name="scale", folder=SCALE, check=check, run=run, report=_report,
    options=(Option("--seed-arch", "scale.seed_arch", "seed architecture: arch.json or inline JSON "
                    "(may lie outside the space); default scale.seed_arch", metavar="FILE_OR_JSON"),),
    help="grow a seed architecture by L^E and NTK condition (As-ViT Algorithm 2)",
    description="Training-free auto-scaling: from the seed architecture, each step tries 4 depth "
    "moves (one more layer in one quarter of the network; for As-ViT, space.kind: asvit, one more "
    "block in one of its 4 stages, starting from the seed topology at C = 32 with one block per "
    "stage) x 4 width ratios {1.05, 1.1, 1.15, 1.2} and keeps the best rank sum of L^E "
    "(descending) and NTK condition (ascending), until scale.param_limit parameters. Writes "
    "OUTPUT_DIR/scale/trajectory.json (every grown architecture with proxies, params, MACs) and "
    "one architecture file per step, OUTPUT_DIR/scale/archs/step<k>-<params>M.json; a rerun "
    "continues it. The last line of stdout is a JSON object {arch, params, macs, steps, output}.",
    last_line=("arch", "params", "macs", "steps", "output"))
