"""Progressive elastic re-tokenization of an As-ViT model (As-ViT section 4 and its footnote 3).

Only the first projection (the tokenizing conv, kernel K1, stride 4 at full resolution) changes:
a schedule row `[start_epoch, factor]` (the format of `retrain.retokenize`, validated by
`retrain.retokenize.build_schedule`) trains from `start_epoch` on with stride 4 x factor and the
footnote's dilation round((stride / 4 - 1) * K1 / (K1 - 1)) + 1 (rounding halves up), so K1 = 4
goes through (16, 5) -> (8, 2) -> (4, 1) for factors 4, 2, 1. Every weight keeps its shape; the
model has no position embedding, and its SAME paddings and windows follow the smaller grids
(ceil(size / stride) tokens per side in stage 1, halved per later stage). Factor f divides the
stage-1 tokens per side by f (Table 6 counts it as "f x"). The MACs of each phase are the model's
exact count at that stride (`AsVitSpace.cost(..., stem_stride=)`).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

from vitas.retrain.retokenize import build_schedule
from vitas.supernet.asvit import STEM_STRIDE, AsViT, stage_grids
from vitas.supernet.asvit_space import AsVitSpace


class StemStage(NamedTuple):
    """The tokenizing conv's setting from `start_epoch` on (until the next stage)."""

    start_epoch: int
    factor: int
    stride: int
    dilation: int
    grids: tuple[int, int, int, int]  # tokens per side of the four stages

    @property
    def tokens(self) -> int:
        """Stage-1 tokens per image."""
        return self.grids[0] ** 2


def footnote_dilation(stride: int, kernel: int, base_stride: int = STEM_STRIDE) -> int:
    """As-ViT's footnote 3: dilation = round((stride / base_stride - 1) * K / (K - 1)) + 1, halves
    rounded up; 1 for a 1x1 kernel (nothing to dilate)."""
    if kernel == 1:
        return 1
    return math.floor((stride / base_stride - 1) * kernel / (kernel - 1) + 0.5) + 1


def make_stem_stage(start_epoch: int, factor: int, kernel: int, img_size: int) -> StemStage:
    """The stem setting of one schedule row for a `kernel`-wide first projection."""
    stride = factor * STEM_STRIDE
    return StemStage(start_epoch, factor, stride, footnote_dilation(stride, kernel),
                     tuple(stage_grids(img_size, stride)))


def build_stem_schedule(rows: Sequence[Sequence[int]], kernel: int, img_size: int, epochs: int) -> list[StemStage]:
    """Validated stem stages for `epochs` epochs from `retrain.retokenize` rows (UserError naming
    the row; epochs before the first row and the last stage run at full resolution)."""
    return [make_stem_stage(s.start_epoch, s.factor, kernel, img_size)
            for s in build_schedule(rows, STEM_STRIDE, img_size, epochs)]


def apply_stem_stage(model: AsViT, stage: StemStage) -> None:
    """Set the tokenizing conv's stride and dilation for `stage` (weights untouched)."""
    model.set_tokenization(stage.stride, stage.dilation)


def stem_training_macs(arch: dict, space: AsVitSpace, num_classes: int, schedule: Sequence[StemStage],
                       epochs: int, images_per_epoch: int) -> dict:
    """Forward MACs of the whole training under `schedule` against full-resolution training (the
    report `retrain/summary.json` holds as "retokenize")."""
    full = space.cost(arch, num_classes).macs
    stages, total = [], 0
    for i, stage in enumerate(schedule):
        end = schedule[i + 1].start_epoch if i + 1 < len(schedule) else epochs
        macs = space.cost(arch, num_classes, stem_stride=stage.stride).macs
        total += macs * (end - stage.start_epoch) * images_per_epoch
        stages.append({"epochs": [stage.start_epoch, end], "factor": stage.factor, "stride": stage.stride,
                       "dilation": stage.dilation, "grids": list(stage.grids), "tokens": stage.tokens,
                       "macs_per_image": macs})
    full_total = full * epochs * images_per_epoch
    return {"stages": stages, "train_macs": total, "full_train_macs": full_total,
            "saved_fraction": 1.0 - total / full_total if full_total else 0.0}
