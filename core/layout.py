"""One run layout: the path of every artifact a stage writes or reads, named in one place.

Producers and consumers both take their paths from `RunLayout`, so a stage never rebuilds another
stage's path from string literals. Every stage folder holds `config.yaml` (the resolved config of
its latest run), `summary.json` (what the stage returned), `log.jsonl` and TensorBoard events, and
`.lock` while a run holds it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Stage folders under output_dir (DESIGN 5): the only place their names are spelled.
SUPERNET, SEARCH, RANK, SCALE, RETRAIN, EVALUATE = "supernet", "search", "rank", "scale", "retrain", "evaluate"
FOLDERS = (SUPERNET, SEARCH, RANK, SCALE, RETRAIN, EVALUATE)

LAST = "last.pth"
CONFIG = "config.yaml"
SUMMARY = "summary.json"
LOCK = ".lock"


@dataclass(frozen=True)
class RunLayout:
    """The files of one run, under `root` (the config's `output_dir`)."""

    root: Path

    def stage(self, folder: str) -> Path:
        """`<output_dir>/<folder>`, the folder a stage writes into."""
        return self.root / folder

    # ------------------------------------------------------------------ superformer
    @property
    def supernet_checkpoint(self) -> Path:
        """The superformer's training state (and weights) `supernet/last.pth`."""
        return self.stage(SUPERNET) / LAST

    # ------------------------------------------------------------------ search
    @property
    def search_state(self) -> Path:
        """The resumable search state `search/last.pth`."""
        return self.stage(SEARCH) / LAST

    @property
    def search_result(self) -> Path:
        """Every evaluated architecture, the Pareto front and the choice: `search/result.json`."""
        return self.stage(SEARCH) / "result.json"

    @property
    def search_arch(self) -> Path:
        """The chosen architecture `search/arch.json`, which retrain reads."""
        return self.stage(SEARCH) / "arch.json"

    @property
    def search_pareto(self) -> Path:
        """Score against cost: `search/pareto.png`."""
        return self.stage(SEARCH) / "pareto.png"

    @property
    def search_retrain_config(self) -> Path:
        """The config with `retrain.arch` set to the choice: `search/retrain.yaml`."""
        return self.stage(SEARCH) / "retrain.yaml"

    # ------------------------------------------------------------------ rank
    @property
    def rank_table(self) -> Path:
        """Per-architecture scores and targets: `rank/ranking.csv`."""
        return self.stage(RANK) / "ranking.csv"

    @property
    def rank_correlations(self) -> Path:
        """Rank correlations with intervals: `rank/correlations.json`."""
        return self.stage(RANK) / "correlations.json"

    @property
    def rank_ground_truth(self) -> Path:
        """One folder per architecture (and seed) trained for ground truth: `rank/ground_truth/`."""
        return self.stage(RANK) / "ground_truth"

    # ------------------------------------------------------------------ scale
    @property
    def scale_trajectory(self) -> Path:
        """Every grown architecture with its proxies and cost: `scale/trajectory.json`."""
        return self.stage(SCALE) / "trajectory.json"

    @property
    def scale_archs(self) -> Path:
        """One architecture file per grown step: `scale/archs/step<k>-<params>M.json`."""
        return self.stage(SCALE) / "archs"

    # ------------------------------------------------------------------ retrain, evaluate
    @property
    def retrain_checkpoint(self) -> Path:
        """The retrained model and its training state `retrain/last.pth`."""
        return self.stage(RETRAIN) / LAST

    @property
    def evaluate_result(self) -> Path:
        """`{"top1", "top5", "images", ...}` of a submitted evaluation: `evaluate/result.json`."""
        return self.stage(EVALUATE) / "result.json"


def run_layout(output_dir: str | Path) -> RunLayout:
    """The layout of the run in `output_dir`."""
    return RunLayout(Path(output_dir))
