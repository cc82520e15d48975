"""vitas: one-shot supernet architecture search for Vision Transformers.

The public API, importable from `vitas` (loaded on first use, so `import vitas` stays light):

    from vitas import load_config, space_from_config, Superformer, execute, get_stage
    cfg = load_config("yamls/demo-digits.yaml", ["output_dir=runs/x"])
    summary = execute(get_stage("search"), cfg)
"""
from __future__ import annotations

import importlib
from typing import Any

_API = {
    # configuration and the stage contract
    "Config": "vitas.core.config", "load_config": "vitas.core.config",
    "UserError": "vitas.core.errors",
    "Stage": "vitas.core.stage", "execute": "vitas.core.stage", "preflight": "vitas.core.stage",
    "RunLayout": "vitas.core.layout", "run_layout": "vitas.core.layout",
    "STAGES": "vitas.stages", "get_stage": "vitas.stages",
    # spaces, models, cost
    "SearchSpace": "vitas.supernet.space", "space_from_config": "vitas.supernet.space",
    "load_arch": "vitas.supernet.space",
    "Superformer": "vitas.supernet.model", "StaticViT": "vitas.supernet.static",
    "AsViT": "vitas.supernet.asvit", "arch_cost": "vitas.supernet.complexity",
    "read_superformer": "vitas.supernet.checkpoint", "export": "vitas.supernet.export",
    # search, proxies, ranking
    "create_scorer": "vitas.search.scoring", "create_algorithm": "vitas.search.algorithms",
    "compute_proxies": "vitas.search.proxies.zoo", "fidelity": "vitas.search.ranking.stats",
    "read_ground_truth": "vitas.search.ranking.tables",
    # training and inference
    "train_arch": "vitas.retrain.train", "load_model": "vitas.inference.evaluate",
    "evaluate_checkpoint": "vitas.inference.evaluate", "predict": "vitas.inference.predict",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'vitas' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
