"""What a search leaves behind: result.json, arch.json, the Pareto plot and the retrain YAML.

Every file is written atomically (temporary file, rename), so a killed search never leaves half a
file; non-finite metric values (an invalid proxy score) become JSON `null`.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from vitas.core.checkpoint import atomic_write, write_json
from vitas.core.config import Config

RECORD_KEYS = ("key", "arch", "macs", "params", "latency_ms", "latency_measured_ms", "latency_shift", "feasible",
               "found", "fitness")
AXIS_LABELS = {"macs": "MACs", "params": "params", "latency_ms": "predicted latency (ms per batch)"}


def json_safe(obj: Any) -> Any:
    """`obj` with NaN/inf floats replaced by None (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def entry(record: dict) -> dict:
    """A result.json entry: arch, cost (with `latency_ms`, and `latency_measured_ms` and
    `latency_shift` when re-measured), feasibility, origin, fitness and the scorer's `scores`."""
    out = {k: record[k] for k in RECORD_KEYS if k in record and k != "key"}
    out["scores"] = {k: v for k, v in record.items() if k not in RECORD_KEYS}
    return out


def retrain_config(cfg: Config, arch_path: Path) -> dict:
    """The resolved config with `retrain.arch` pointing at the chosen architecture."""
    tree = cfg.to_dict()
    tree["retrain"]["arch"] = str(Path(arch_path).absolute())
    return tree


def plot_pareto(records: Sequence[dict], front: Sequence[dict], chosen: Optional[dict],
                cost: str, metric: str, path: Path, bounds: Sequence[Optional[float]] = ()) -> None:
    """Score vs cost (`macs`, `params` or `latency_ms`) of every scored architecture, the Pareto
    front as a line, the choice starred, the budget's bounds on the cost as dashed lines; a
    re-measured choice's measured latency as a hollow marker beside its prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    ax.scatter([r[cost] for r in records], [r[metric] for r in records], s=12, c="tab:gray",
               alpha=0.6, label=f"evaluated ({len(records)})")
    ax.plot([r[cost] for r in front], [r[metric] for r in front], "o-", c="tab:blue", ms=5,
            label=f"Pareto front ({len(front)})")
    if chosen is not None:
        ax.scatter([chosen[cost]], [chosen[metric]], marker="*", s=220, c="tab:red", zorder=5,
                   label="chosen")
        if cost == "latency_ms" and chosen.get("latency_measured_ms") is not None:
            ax.scatter([chosen["latency_measured_ms"]], [chosen[metric]], marker="*", s=220, zorder=5,
                       facecolors="none", edgecolors="tab:red", label="chosen, re-measured")
    for bound in bounds:
        if bound is not None:
            ax.axvline(bound, ls="--", c="tab:green", lw=1)
    ax.set_xlabel(AXIS_LABELS.get(cost, cost))
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def write_outputs(out_dir: Path, cfg: Config, result: dict, plot_metric: str) -> None:
    """result.json, arch.json, pareto.png and retrain.yaml of a finished search (rank 0 only)."""
    out_dir = Path(out_dir)
    chosen = result["chosen"]
    arch_path = write_json(chosen["arch"], out_dir / "arch.json")
    scored = [r for r in result["evaluated"] if r["feasible"] and "fitness" in r]

    def flat(r: dict) -> dict:
        return {**r, **r["scores"], "fitness": r.get("fitness")}

    primary = result["budget"]["primary"]
    plot_pareto([flat(r) for r in scored], [flat(r) for r in result["pareto_front"]], flat(chosen),
                primary, plot_metric, out_dir / "pareto.png", result["budget"][primary])
    atomic_write(out_dir / "retrain.yaml",
                 lambda f: yaml.safe_dump(retrain_config(cfg, arch_path), f, sort_keys=False), mode="w")
    write_json(json_safe(result), out_dir / "result.json")
