"""Progressive elastic re-tokenization (As-ViT, section 4): fewer tokens early in training.

The patch-embedding conv keeps its kernel (K = patch_size) and every weight keeps its shape; only
its stride, dilation and padding change, so the token grid shrinks. A schedule row
`[start_epoch, factor]` (0-based epochs) trains from `start_epoch` on with stride `factor * K` and
As-ViT's footnote dilation `round((stride / S1 - 1) * K / (K - 1)) + 1` with S1 = K, the stride at
full resolution: factor 4 divides the tokens per side by 4 (Table 6's "4x"), factor 1 is full
resolution (a stride that does not divide the image drops the border remainder, as a plain conv
does). Epochs before the first row run at full resolution; the last epoch must too. The
absolute position embedding is interpolated (bicubic) to the smaller grid in the forward pass; the
parameter itself is never resized. As-ViT Table 6 at 300 epochs, 4x/2x/full for 1-80/81-140/
141-300, is `retokenize: [[0, 4], [80, 2], [140, 1]]`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from vitas.core.errors import UserError
from vitas.supernet.complexity import arch_cost
from vitas.supernet.space import SearchSpace
from vitas.supernet.static import StaticViT


class Stage(NamedTuple):
    """One tokenization of the patch conv from `start_epoch` on (until the next stage)."""

    start_epoch: int
    factor: int
    stride: int
    dilation: int
    padding: int
    grid: int

    @property
    def tokens(self) -> int:
        """Tokens per image, class token included."""
        return self.grid * self.grid + 1


def footnote_dilation(stride: int, kernel: int) -> int:
    """As-ViT's dilation for a coarser `stride` of a `kernel`-wide conv (full-res stride = kernel)."""
    if kernel == 1:
        return 1  # a 1x1 kernel has no span to dilate
    return round((stride / kernel - 1) * kernel / (kernel - 1)) + 1


def make_stage(start_epoch: int, factor: int, patch_size: int, img_size: int) -> Stage:
    """The conv settings of one row; padding keeps the dilated kernel's span inside the grid."""
    stride = factor * patch_size
    dilation = footnote_dilation(stride, patch_size)
    span = dilation * (patch_size - 1) + 1
    padding = max(0, math.ceil((span - stride) / 2))
    grid = (img_size + 2 * padding - span) // stride + 1  # the conv's output size
    if grid < 1:
        raise UserError(f"retrain.retokenize: factor {factor} (stride {stride}, dilation {dilation}) "
                        f"leaves no token of a {img_size}px image")
    return Stage(start_epoch, factor, stride, dilation, padding, grid)


def build_schedule(rows: Sequence[Sequence[int]], patch_size: int, img_size: int,
                   epochs: int) -> list[Stage]:
    """Validated stages for `epochs` epochs from `retrain.retokenize` rows (UserError naming the row)."""
    stages = [] if rows and rows[0] and int(rows[0][0]) == 0 else [make_stage(0, 1, patch_size, img_size)]
    for i, row in enumerate(rows):
        if len(row) != 2:
            raise UserError(f"retrain.retokenize[{i}] must be [start_epoch, factor], got {list(row)}")
        start, factor = int(row[0]), int(row[1])
        if factor < 1:
            raise UserError(f"retrain.retokenize[{i}]: factor must be >= 1, got {factor}")
        if start < 0 or start >= epochs:
            raise UserError(f"retrain.retokenize[{i}]: start epoch {start} is outside 0..{epochs - 1} "
                            f"(retrain.epochs is {epochs})")
        if i and start <= rows[i - 1][0]:
            raise UserError(f"retrain.retokenize[{i}]: start epochs must increase, got {start} after "
                            f"{rows[i - 1][0]}")
        stages.append(make_stage(start, factor, patch_size, img_size))
    if stages[-1].factor != 1:
        raise UserError(f"retrain.retokenize: the last stage (from epoch {stages[-1].start_epoch}) has "
                        f"factor {stages[-1].factor}; training must end at full resolution (factor 1)")
    return stages


def stage_at(schedule: Sequence[Stage], epoch: int) -> Stage:
    """The stage that trains `epoch`."""
    return [s for s in schedule if s.start_epoch <= epoch][-1]


def apply_stage(model: nn.Module, stage: Stage) -> None:
    """Set the patch conv's stride, dilation and padding (weights untouched) for `stage`."""
    conv = model.patch_embed.proj
    conv.stride = (stage.stride, stage.stride)
    conv.dilation = (stage.dilation, stage.dilation)
    conv.padding = (stage.padding, stage.padding)


class ElasticTokenViT(StaticViT):
    """A StaticViT whose position embedding follows the patch conv's token grid.

    Same parameters and state-dict keys as StaticViT (its checkpoints load into one); at full
    resolution it computes exactly what StaticViT computes.
    """

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the final norm, the position embedding resampled to a reduced grid."""
        x = self.patch_embed(x)
        pos = self.pos_embed
        if x.shape[1] + 1 != pos.shape[1]:
            side = math.isqrt(x.shape[1])
            pos = resample_abs_pos_embed(pos, new_size=[side, side], num_prefix_tokens=1)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def stage_macs(arch: dict, space: SearchSpace, num_classes: int, stage: Stage) -> int:
    """Forward MACs of one image at `stage` (DESIGN 4's count on the stage's token grid)."""
    patch = space.canonical(arch)["patch_size"]
    grid_space = SearchSpace(dataclasses.replace(space.cfg, img_size=stage.grid * patch,
                                                 patch_size=[patch]))
    return arch_cost(arch, grid_space, num_classes).macs


def training_macs(arch: dict, space: SearchSpace, num_classes: int, schedule: Sequence[Stage],
                  epochs: int, images_per_epoch: int) -> dict:
    """Forward MACs of the whole training under `schedule` against full-resolution training."""
    full = arch_cost(arch, space, num_classes).macs
    stages, total = [], 0
    for i, stage in enumerate(schedule):
        end = schedule[i + 1].start_epoch if i + 1 < len(schedule) else epochs
        macs = stage_macs(arch, space, num_classes, stage)
        total += macs * (end - stage.start_epoch) * images_per_epoch
        stages.append({"epochs": [stage.start_epoch, end], "factor": stage.factor, "stride": stage.stride,
                       "dilation": stage.dilation, "padding": stage.padding, "tokens": stage.tokens,
                       "macs_per_image": macs})
    full_total = full * epochs * images_per_epoch
    return {"stages": stages, "train_macs": total, "full_train_macs": full_total,
            "saved_fraction": 1.0 - total / full_total if full_total else 0.0}
