"""`make demo`: the whole pipeline on the embedded default (digits, local executor, CPU).

Each stage runs through the real `vitas` command line, exactly as a user would type it, and the
run ends with a table of the numbers and the paths of the plots. Rerunning continues or reuses
what is already in the output directory (every stage auto-resumes).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "yamls" / "demo-digits.yaml"


def vitas(*args: str, capture: bool = False) -> str:
    """Run `python -m vitas ARGS`, streaming its output (or returning it when `capture`)."""
    cmd = [sys.executable, "-m", "vitas", *args]
    print("\n$ vitas " + " ".join(args), flush=True)
    res = subprocess.run(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE if capture else None)
    if res.returncode != 0:
        sys.exit(f"demo: step failed (exit {res.returncode}): vitas {' '.join(args)}")
    if capture:
        print(res.stdout, end="")
        return res.stdout
    return ""


def last_json(text: str) -> dict:
    """The JSON object a reporting command prints as its last stdout line."""
    return json.loads(text.strip().splitlines()[-1])


def latency_midpoint(model_file: Path) -> float:
    """A latency limit in the middle of the demo space's range on this machine: midway between the
    fastest and slowest architectures the latency build measured end to end (ms per batch)."""
    measured = [s["median_ms"] for s in json.loads(model_file.read_text())["samples"]]
    return round((min(measured) + max(measured)) / 2, 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(ROOT / "data" / "digits"))
    parser.add_argument("--output", default=str(ROOT / "runs" / "demo"))
    args = parser.parse_args()
    out, data = Path(args.output), Path(args.data)
    # The YAML keeps the tests' tiny schedules; the demo runs a little longer so that its numbers
    # mean something (about 10 minutes on 2 cores).
    common = [f"output_dir={out}", f"data.root={data}", "data.holdout_per_class=20",
              "supernet.epochs=60", "search.population=24", "search.generations=10",
              "search.steps=100", "rank.archs=10", "retrain.epochs=60"]
    cfg = ["-c", str(CONFIG)]
    times: dict[str, float] = {}

    def timed(name: str, *cmd: str, capture: bool = False) -> str:
        start = time.time()
        text = vitas(*cmd, capture=capture)
        times[name] = time.time() - start
        return text

    timed("data", "data", "digits", str(data))
    timed("supernet", "submit", "train-supernet", *cfg, *common, "--wait")
    timed("search", "search", *cfg, *common)
    proxy_out = out / "proxy-search"
    timed("proxy search", "search", *cfg, *common, f"output_dir={proxy_out}",
          "search.scorer=proxy", "search.algorithm=rl")
    latency_model = out / "latency" / "latency.json"
    if not latency_model.is_file():  # a rebuilt model would refuse to continue the search below
        timed("latency build", "latency", "build", *cfg, *common)
    limit = latency_midpoint(latency_model)
    latency_out = out / "latency-search"
    latency_search = last_json(timed(
        "latency search", "search", *cfg, *common, f"output_dir={latency_out}",
        f"supernet.checkpoint={out / 'supernet' / 'last.pth'}", f"latency.model={latency_model}",
        "search.macs_max=null", f"search.latency_max={limit}", "search.generations=5", capture=True))
    timed("rank", "rank", *cfg, *common, "--ground-truth-epochs", "12")
    timed("retrain", "retrain", *cfg, *common)
    ckpt = out / "retrain" / "last.pth"
    evaluation = last_json(timed("evaluate", "evaluate", "--checkpoint", str(ckpt), "--data", str(data), capture=True))
    images = sorted((data / "val" / "3").glob("*.png"))[:1] + sorted((data / "val" / "7").glob("*.png"))[:1]
    timed("predict", "predict", "--checkpoint", str(ckpt), "--data", str(data), *map(str, images))
    timed("export", "export", "--checkpoint", str(ckpt), str(out / "export"))

    result = json.loads((out / "search" / "result.json").read_text())
    arch = json.loads((out / "search" / "arch.json").read_text())
    cost = last_json(vitas("arch", "cost", *cfg, *common, "--arch", json.dumps(arch), capture=True))
    supernet = json.loads((out / "supernet" / "summary.json").read_text())
    proxy_arch = json.loads((proxy_out / "search" / "arch.json").read_text())
    correlations = json.loads((out / "rank" / "correlations.json").read_text())
    chosen = result.get("chosen", {})
    rows = [
        ("supernet val top-1, largest subnet", f"{supernet.get('max_top1', float('nan')):.2f}%"),
        ("supernet val top-1, smallest subnet", f"{supernet.get('min_top1', float('nan')):.2f}%"),
        ("search: archs evaluated", str(len(result.get("evaluated", [])))),
        ("search: chosen arch hold-out top-1", f"{chosen.get('scores', {}).get('top1', float('nan')):.2f}%"),
        ("search: chosen arch MACs / params", f"{cost['macs']:,} / {cost['params']:,}"),
        ("proxy search: chosen arch", json.dumps(proxy_arch)),
        ("latency search: limit / chosen arch predicted", f"{limit:.3f} ms / {latency_search['latency_ms']:.3f} ms"
         + (f" (re-measured {latency_search['latency_measured_ms']:.3f} ms)" if "latency_measured_ms" in latency_search
            else "")),
        ("latency search: chosen arch hold-out top-1 / MACs",
         f"{latency_search['scores']['top1']:.2f}% / {latency_search['macs']:,}"),
        ("retrained val top-1 / top-5", f"{evaluation['top1']:.2f}% / {evaluation['top5']:.2f}%"),
    ]
    for target, per_score in correlations["results"].items():
        for score, entry in per_score.items():
            k = entry["kendall"]
            if k["estimate"] is not None:
                ci = f" [{k['low']:+.2f}, {k['high']:+.2f}]" if k["low"] is not None else ""
                rows.append((f"rank: Kendall tau({score}, {target})", f"{k['estimate']:+.2f}{ci}"))
    rows += [(f"time: {k}", f"{v:.0f} s") for k, v in times.items()]
    plots = sorted(str(p) for p in list((out / "search").glob("*.png")) + list((out / "rank").glob("*.png")))
    width = max(len(n) for n, _ in rows)
    print("\n" + "=" * 72 + "\nvitas demo summary\n" + "=" * 72)
    print(f"chosen architecture: {json.dumps(arch)}")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    print("plots:\n  " + "\n  ".join(plots))
    print(f"outputs: {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
