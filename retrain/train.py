"""Retraining: train the chosen architecture's static model with the DeiT recipe through timm.

The architecture comes from `retrain.arch` (a JSON file or inline JSON; `vitas retrain --arch`),
else from `<output_dir>/search/arch.json`, and is validated against the config's space. Weights
start from scratch (`retrain.init: scratch`) or from the superformer (`supernet`: the subnet
extracted with copied weights from the superformer the search scored with: the same file and
the same weights, read by `vitas.supernet.checkpoint`). It trains on all of `train/`
(the hold-out only serves the search) and reports on `val/`. The loop is `core.engine`'s
(AdamW, warm-up + cosine, Mixup/CutMix, label smoothing, EMA, AMP on GPU, DDP, auto-resume from
`<stage_dir>/last.pth`); val top-1/top-5 are measured after every epoch; progressive
re-tokenization (`retrain.retokenize`, see `retrain.retokenize`) lowers the token count early on.
An As-ViT architecture (`space.kind: asvit`) trains its `AsViT` from scratch (it has no
superformer), re-tokenized on its first projection (`retrain.asvit_retokenize`).
The checkpoint holds "model" (the StaticViT's or AsViT's state dict), "arch", "model_args",
"config", "space", "class_names" and the training state; the final metrics go to
`<stage_dir>/summary.json`.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from torch import nn

from vitas.core import dist
from vitas.core.checkpoint import load_checkpoint, write_json
from vitas.core.config import Config, RetrainConfig
from vitas.core.data import (build_dataset, check_data_source, check_mixup_batch, class_names,
                             create_loader, create_loss, create_mixup, num_classes)
from vitas.core.engine import (Trainer, check_recipe, check_resume, configure_determinism,
                               create_train_loader)
from vitas.core.errors import UserError
from vitas.core.layout import RETRAIN, run_layout
from vitas.core.logs import RunLogger
from vitas.core.metrics import evaluate_accuracy
from vitas.core.stage import Option, Stage, StageContext
from vitas.retrain.asvit_retokenize import StemStage, apply_stem_stage, build_stem_schedule, stem_training_macs
from vitas.retrain.retokenize import ElasticTokenViT, apply_stage, build_schedule, stage_at, training_macs
from vitas.supernet.asvit import AsViT
from vitas.supernet.checkpoint import inspect_superformer, read_superformer
from vitas.supernet.models import complete_model_args
from vitas.supernet.space import SearchSpace, load_arch, space_from_config

log = logging.getLogger("vitas.retrain")


def read_arch(cfg: Config) -> dict:
    """The architecture to train (retrain.arch, else <output_dir>/search/arch.json), validated."""
    source = cfg.retrain.arch
    if source is None:
        source = str(run_layout(cfg.output_dir).search_arch)
        if not Path(source).is_file():
            raise UserError(f"architecture file not found: {source} (run the search first, or "
                            "pass --arch FILE)")
    return space_from_config(cfg).validate(load_arch(source, "retrain.arch"))


# ---------------------------------------------------------------- tokenization by kind of space
class Tokenization(NamedTuple):
    """How one kind of model is (re-)tokenized: the validated schedule of `retrain.retokenize`
    rows, the model class that trains under it, how a stage is applied (weights untouched) and
    the training MACs the schedule costs against full resolution."""

    schedule: Callable[[dict, Sequence[Sequence[int]], int, int], list]  # (arch, rows, img_size, epochs)
    model: type[nn.Module]
    apply: Callable[[nn.Module, Any], None]
    training_macs: Callable[..., dict]  # (arch, space, classes, schedule, epochs, images_per_epoch)


TOKENIZATION = {  # by space.kind
    # Flat ViT: the patch conv; the position embedding follows the grid (ElasticTokenViT).
    "vit": Tokenization(lambda arch, rows, img, epochs: build_schedule(rows, arch["patch_size"], img, epochs),
                        ElasticTokenViT, apply_stage, training_macs),
    # As-ViT: its first projection (kernel K1, stride 4 at full resolution); no position embedding.
    "asvit": Tokenization(lambda arch, rows, img, epochs: build_stem_schedule(rows, arch["stages"][0]["kernel"],
                                                                              img, epochs),
                          AsViT, apply_stem_stage, stem_training_macs),
}


def describe_stage(stage: Any) -> str:
    """One log line's description of a schedule stage."""
    if isinstance(stage, StemStage):
        return (f"first projection stride {stage.stride} dilation {stage.dilation} -> stage grids "
                f"{list(stage.grids)}, {stage.tokens} stage-1 tokens")
    return (f"patch conv stride {stage.stride} dilation {stage.dilation} padding {stage.padding} -> "
            f"{stage.tokens} tokens")


def supernet_weights(cfg: Config, space: SearchSpace, arch: dict, classes: int) -> dict:
    """`arch`'s weights extracted from the superformer the search used (the same file and
    weights policy: `vitas.supernet.checkpoint`)."""
    supernet, _ = read_superformer(cfg, space, classes)
    return supernet.extract(arch).state_dict()


def check_training(cfg: Config, arch: dict, sec: RetrainConfig, out_dir: Path) -> None:
    """Every user error findable before training `arch` into `out_dir`: recipe, data, the
    re-tokenization schedule, the superformer to start from, and a last.pth it cannot continue."""
    space = space_from_config(cfg)
    if sec.init == "supernet" and cfg.space.kind == "asvit":
        raise UserError("retrain.init=supernet needs a superformer, and an As-ViT space (space.kind: "
                        "asvit) has none: retrain it with retrain.init=scratch")
    check_recipe(sec, "retrain")
    check_data_source(cfg.data, holdout=False)
    TOKENIZATION[cfg.space.kind].schedule(arch, sec.retokenize, cfg.space.img_size, sec.epochs)
    if sec.init == "supernet":
        inspect_superformer(cfg, space, num_classes(cfg.data))
    path = out_dir / "last.pth"
    if path.is_file():
        state = load_checkpoint(path, mmap=True)
        check_resume(state, sec, path, "retrain")
        space.check_spec(state.get("space", {}) if isinstance(state.get("space"), dict) else {}, str(path))
        if state.get("arch") != arch:
            raise UserError(f"{path} was trained for another architecture; use a new output_dir")


def train_arch(cfg: Config, arch: dict, out_dir: str | Path, epochs: Optional[int] = None,
               device: Optional[torch.device] = None) -> dict:
    """Train `arch` per `cfg.retrain` (epochs overridable) into `out_dir` in the current process
    group (joined by the caller); returns the final metrics.

    Resumes from `out_dir/last.pth` when present. The result (also `out_dir/summary.json`) holds
    val "top1", "top5", "images" of the final weights, "best_top1", "ema_top1" with EMA on, cost
    and the re-tokenization report.
    """
    sec = cfg.retrain if epochs is None else dataclasses.replace(cfg.retrain, epochs=epochs)
    out_dir = Path(out_dir)
    info = dist.DistInfo(dist.get_rank(), dist.get_world_size(), 0, device or dist.default_device())
    space = space_from_config(cfg)
    arch = space.validate(arch)
    classes, names = num_classes(cfg.data), class_names(cfg.data)
    tokenization = TOKENIZATION[cfg.space.kind]
    schedule = tokenization.schedule(arch, sec.retokenize, cfg.space.img_size, sec.epochs)
    configure_determinism(sec.seed, sec.deterministic)

    train_set = build_dataset(cfg.data, "train", cfg.space.img_size, is_training=True)
    val_set = build_dataset(cfg.data, "val", cfg.space.img_size, is_training=False)
    loader = create_train_loader(train_set, sec.batch_size, sec.seed, cfg.data.workers)
    val_loader = create_loader(val_set, max(1, sec.batch_size // info.world_size), shuffle=False,
                               workers=cfg.data.workers)
    steps = loader.batch_sampler.steps_per_epoch
    mixup = create_mixup(cfg.data, classes)
    check_mixup_batch(mixup, "retrain.batch_size", sec.batch_size, info.world_size)

    model = tokenization.model(**space.model_args(arch, classes), drop_path=sec.drop_path)
    if sec.init == "supernet":
        model.load_state_dict(supernet_weights(cfg, space, arch, classes))
    extra = {"arch": arch, "model_args": model.model_args, "config": cfg.to_dict(),
             "space": space.spec(), "class_names": names}
    trainer = Trainer(model, sec, steps, out_dir, info.device, extra_state=extra,
                      find_unused_parameters=False)

    last: dict[str, Any] = {}  # val metrics of the latest epoch end
    best = {"top1": 0.0}

    def check(state: dict) -> None:
        """Refuse another space or architecture; take over the saved val metrics."""
        space.check_spec(state.get("space", {}), str(trainer.path))
        saved = state.get("model_args")
        if not isinstance(saved, dict) or complete_model_args(saved) != model.model_args:
            raise UserError(f"{trainer.path} was trained for another architecture or data set; "
                            "use a new output directory")
        last.update(state.get("val") or {})
        best["top1"] = state.get("best_top1", 0.0)

    if trainer.resume(check):
        log.info("resumed from %s at epoch %d (step %d)", trainer.path, *trainer.resumed_from)
    macs = tokenization.training_macs(arch, space, classes, schedule, sec.epochs, steps * sec.batch_size)
    if len(schedule) > 1:
        log.info("re-tokenization %s saves %.1f%% of the training MACs (%.3g vs %.3g)",
                 [(s["epochs"], s["tokens"]) for s in macs["stages"]], 100 * macs["saved_fraction"],
                 macs["train_macs"], macs["full_train_macs"])

    criterion = create_loss(cfg.data, mixup is not None).to(info.device)
    current: dict[str, Any] = {}

    def on_epoch_start(epoch: int) -> None:
        stage = stage_at(schedule, epoch)
        for module in [model] + ([trainer.ema.module] if trainer.ema is not None else []):
            tokenization.apply(module, stage)
        if len(schedule) > 1 and current.get("stage") != stage:
            current["stage"] = stage
            log.info("epoch %d: %s", epoch + 1, describe_stage(stage))

    def train_step(batch: tuple[torch.Tensor, torch.Tensor]) -> dict:
        images, target = (t.to(info.device, non_blocking=True) for t in batch)
        if mixup is not None:
            images, target = mixup(images, target)
        with trainer.accumulate(last=True):
            with trainer.autocast():
                loss = criterion(trainer.wrapped(images), target)
            trainer.backward(loss)
        return {"loss": loss.detach()}  # read only when logged: no device sync per step

    def on_epoch_end(epoch: int) -> dict:
        metrics = evaluate_accuracy(model, val_loader, info.device)
        scalars = {"val/top1": metrics["top1"], "val/top5": metrics["top5"],
                   "tokens": stage_at(schedule, epoch).tokens}
        if trainer.ema is not None:
            ema = evaluate_accuracy(trainer.ema.module, val_loader, info.device)
            scalars.update({"val/ema_top1": ema["top1"], "val/ema_top5": ema["top5"]})
            metrics["ema_top1"], metrics["ema_top5"] = ema["top1"], ema["top5"]
        last.clear()
        last.update(metrics)
        best["top1"] = max(best["top1"], metrics["top1"])
        trainer.extra_state["val"] = dict(metrics)
        trainer.extra_state["best_top1"] = best["top1"]
        if dist.is_main():
            print(f"epoch {epoch + 1}/{sec.epochs}: val top1 {metrics['top1']:.2f}% "
                  f"top5 {metrics['top5']:.2f}% ({stage_at(schedule, epoch).tokens} tokens)", flush=True)
        return scalars

    with RunLogger(out_dir) as logger:
        trainer.fit(loader, train_step, logger, on_epoch_end=on_epoch_end,
                    on_epoch_start=on_epoch_start, desc="retrain")
    cost = space.cost(arch, classes)
    summary = {"top1": last["top1"], "top5": last["top5"], "images": last["images"],
               **{k: last[k] for k in ("ema_top1", "ema_top5") if k in last},
               "best_top1": best["top1"], "epochs": sec.epochs, "arch": arch,
               "init": sec.init, "params": cost.params, "macs": cost.macs,
               "train_seconds": round(trainer.train_seconds, 1), "retokenize": macs,
               "checkpoint": str(trainer.path)}
    if dist.is_main():
        write_json(summary, out_dir / "summary.json")
    dist.barrier()
    return summary


def check(cfg: Config) -> None:
    """The architecture (retrain.arch or the search's arch.json) and everything training it needs."""
    check_training(cfg, read_arch(cfg), cfg.retrain, run_layout(cfg.output_dir).stage(RETRAIN))


def run(cfg: Config, ctx: StageContext) -> dict:
    """Stage entry (`vitas retrain`, `vitas submit retrain`): train into `<output_dir>/retrain`."""
    return train_arch(cfg, read_arch(cfg), ctx.dir, device=ctx.dist.device)


def _report(summary: dict) -> list[str]:
    return [f"retrained: val top1 {summary['top1']:.2f}% top5 {summary['top5']:.2f}% "
            f"({summary['images']} images); checkpoint {summary['checkpoint']}"]


STAGE = Stage(
    name="retrain", folder=RETRAIN, check=check, run=run, report=_report,
    options=(Option("--arch", "retrain.arch", "architecture to train: an arch.json file or inline "
                    "JSON", metavar="FILE_OR_JSON"),),
    help="train the chosen architecture (from scratch or superformer weights)",
    description="Train the static ViT of an architecture with the DeiT recipe (all settings in "
    "the config's retrain/data sections): from scratch or from the superformer's weights "
    "(retrain.init=supernet), EMA, AMP on GPU, progressive re-tokenization (retrain.retokenize), "
    "val accuracy after every epoch, auto-resume from OUTPUT_DIR/retrain/last.pth. The "
    "architecture is --arch, else retrain.arch, else OUTPUT_DIR/search/arch.json. The last line "
    'of stdout is {"top1", "top5", "images"}; OUTPUT_DIR/retrain/summary.json has the rest.',
    last_line=("top1", "top5", "images"))
