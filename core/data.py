"""Folder data sets (ImageNet layout) with timm's transforms, the hold-out split, and the digits
data set.

`root/train/<class>/*` and `root/val/<class>/*`; class indices come from the sorted class folders of
`train/` so every split agrees. Architectures are scored on a hold-out of `data.holdout_per_class`
images per class taken from (and removed from) `train/`; `val/` is kept for final accuracy.

Images are read strictly (`FolderDataset`): a file that does not decode, or one over Pillow's
decompression-bomb limit, is a UserError naming it (timm's reader would skip it and return a
neighbour in its place, counting that one twice); with `data.broken_images: skip` such files are
left out when the data set is built, and counted. 16-bit images are scaled to 8 bits (Pillow's
RGB conversion would clip them to 0/255). Class folders are walked following symbolic links, each
real folder once, so a link loop neither multiplies the data set nor hangs.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup, create_transform
from timm.data.readers.img_extensions import get_img_extensions
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils.misc import natural_key
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from vitas.core import dist
from vitas.core.config import DataConfig, FieldRule, check_fields
from vitas.core.errors import UserError

log = logging.getLogger("vitas.data")
SPLITS = ("train", "val")

# Value relations of DataConfig fields the schema cannot state per field: (field, rule, test).
_DATA_RULES: tuple[FieldRule, ...] = (
    ("mean", "3 numbers (one per RGB channel)",
     lambda v: len(v) == 3 and all(math.isfinite(x) for x in v)),
    ("std", "3 numbers > 0 (one per RGB channel)",
     lambda v: len(v) == 3 and all(0 < x < math.inf for x in v)),
    ("scale", "[min, max] with 0 < min <= max <= 1",
     lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1),
)


def replace_tree(root: Path, tmp: Path) -> None:
    """Move a finished data set `tmp` to `root`, replacing an earlier output as late as possible
    (a sibling `.old` copy until the rename, so a killed writer never leaves `root` half-written)."""
    if root.exists():
        old = root.parent / f".{root.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        root.rename(old)
        tmp.rename(root)
        shutil.rmtree(old)
    else:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(root)


def write_digits(root: Path, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write scikit-learn's digits as 32x32 RGB PNGs in `root/{train,val}/<class>/` (atomically).

    The split is stratified and fixed by `seed`; a second run writes byte-identical files.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val fraction must be between 0 and 1, got {val_fraction}")
    root = Path(root).expanduser().absolute()
    if root.exists() and not (root.is_dir() and _is_digits_tree(root)):
        raise UserError(f"{root} exists and is not a digits data set; choose a new folder")
    digits = load_digits()
    _check_val_fraction(val_fraction, digits.target)
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    index = np.arange(len(pixels))
    train_idx, val_idx = train_test_split(index, test_size=val_fraction, random_state=seed,
                                          stratify=digits.target)
    tmp = root.parent / f".{root.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
    try:
        for split, ids in (("train", train_idx), ("val", val_idx)):
            for i in sorted(ids):
                folder = tmp / split / str(digits.target[i])
                folder.mkdir(parents=True, exist_ok=True)
                big = np.kron(pixels[i], np.ones((4, 4), dtype=np.uint8))  # nearest 8 -> 32
                Image.fromarray(np.stack([big] * 3, axis=-1)).save(folder / f"{i:04d}.png")
        replace_tree(root, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"train": len(train_idx), "val": len(val_idx)}


def _check_val_fraction(val_fraction: float, labels: np.ndarray) -> None:
    """UserError unless the stratified split can give every class an image in train/ and val/."""
    total, classes = len(labels), len(np.unique(labels))
    n_val = math.ceil(val_fraction * total)  # how scikit-learn rounds test_size
    if not classes <= n_val <= total - classes:
        raise UserError(f"val fraction {val_fraction} puts {n_val} of {total} images in val/; each "
                        f"split needs an image of each of the {classes} classes, so val/ needs "
                        f"{classes} to {total - classes} images")


def _is_digits_tree(root: Path) -> bool:
    """An empty folder or an earlier `write_digits` output (which may safely be replaced)."""
    for path in root.rglob("*"):
        parts = path.relative_to(root).parts
        if parts[0] not in SPLITS or (len(parts) > 1 and not parts[1].isdigit()):
            return False
        if len(parts) > 3 or (len(parts) == 3 and path.suffix != ".png"):
            return False
    return True


def split_dir(data_cfg: DataConfig, split: str) -> Path:
    """`data.root/<split>`, or a UserError naming `data.root` when it is missing."""
    if not data_cfg.root:
        raise UserError("config key 'data.root' is not set")
    root = Path(data_cfg.root).expanduser()
    if not root.is_dir():
        raise UserError(f"data.root: directory not found: {root}")
    path = root / split
    if not path.is_dir():
        raise UserError(f"data.root: {root} has no '{split}/' folder (expected train/ and val/)")
    return path


def class_names(data_cfg: DataConfig) -> list[str]:
    """Class folder names of `data.root/train`, in timm's (natural) order."""
    train = split_dir(data_cfg, "train")
    names = sorted((p.name for p in train.iterdir() if p.is_dir()), key=natural_key)
    if not names:
        raise UserError(f"data.root: {train} holds no class folders")
    return names


def num_classes(data_cfg: DataConfig) -> int:
    """`data.num_classes` if set, else the number of class folders in `data.root/train`."""
    return data_cfg.num_classes or len(class_names(data_cfg))


def check_data(data_cfg: DataConfig) -> None:
    """UserError naming `data.<key>` for a value timm or torch would reject (or take as
    nonsense) only later, while it builds the transforms, loaders and loss or mid-run."""
    check_fields(data_cfg, _DATA_RULES, "data")
    if data_cfg.auto_augment:
        _check_auto_augment(data_cfg.auto_augment)


def _check_auto_augment(policy: str) -> None:
    """timm parses the policy only with asserts, inside the train transform: build one with it."""
    try:
        create_transform(32, is_training=True, auto_augment=policy)
    except (AssertionError, KeyError, ValueError, IndexError):
        raise UserError(f"data.auto_augment: {policy!r} is not a timm augmentation policy (e.g. "
                        "'rand-m9-mstd0.5-inc1', 'augmix-m5-w4-d2', 'v0', 'original', '3a'; "
                        "null for none)") from None


def transform_settings(data_cfg: DataConfig, img_size: int, is_training: bool) -> dict[str, Any]:
    """The keyword arguments of timm's `create_transform` for a split: the one description of
    how images are turned into tensors (resumed searches compare it, so a change of any of them
    is noticed)."""
    common = dict(input_size=img_size, interpolation=data_cfg.interpolation,
                  mean=tuple(data_cfg.mean), std=tuple(data_cfg.std))
    if not is_training:
        return dict(common, is_training=False, crop_pct=data_cfg.crop_pct)
    return dict(common, is_training=True, auto_augment=data_cfg.auto_augment or None,
                re_prob=data_cfg.reprob, color_jitter=data_cfg.color_jitter,
                scale=tuple(data_cfg.scale), hflip=data_cfg.hflip)


def build_transform(data_cfg: DataConfig, img_size: int, is_training: bool) -> Callable:
    """timm's train (RandAugment, random erasing, ...) or eval (resize + center crop) pipeline."""
    return create_transform(**transform_settings(data_cfg, img_size, is_training))


def _class_map(data_cfg: DataConfig, path: Path) -> dict[str, int]:
    """Class name -> index from train/, refusing a split with class folders train/ lacks."""
    class_map = {name: i for i, name in enumerate(class_names(data_cfg))}
    if data_cfg.num_classes is not None and data_cfg.num_classes < len(class_map):
        raise UserError(f"data.num_classes={data_cfg.num_classes} is fewer than the "
                        f"{len(class_map)} class folders of {path.parent / 'train'}")
    foreign = sorted(p.name for p in path.iterdir() if p.is_dir() and p.name not in class_map)
    if foreign:  # their images would be skipped silently: accuracy over a part of the split
        raise UserError(f"data.root: {path} has class folders that train/ lacks: "
                        f"{', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}")
    return class_map


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder` in natural order, following symbolic links but entering each
    real folder once (a link loop neither repeats files nor hangs)."""
    extensions = {e.lower() for e in get_img_extensions()}
    seen: set[tuple[int, int]] = set()
    found: list[Path] = []
    for top, dirs, files in os.walk(folder, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort(key=natural_key)
        found.extend(Path(top) / f for f in files if os.path.splitext(f)[1].lower() in extensions)
    return sorted(found, key=lambda p: natural_key(str(p.relative_to(folder))))


def list_samples(path: Path, class_map: dict[str, int]) -> list[tuple[Path, int]]:
    """(file, class index) of every image in the class folders of a split."""
    return [(f, index) for name, index in class_map.items() if (path / name).is_dir()
            for f in list_images(path / name)]


def open_image(path: Path) -> Image.Image:
    """The decoded RGB image at `path`; UserError naming the file when it cannot be decoded or
    exceeds Pillow's decompression-bomb limit. 16-bit images are scaled down, not clipped."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.float64)
                top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
                img = Image.fromarray(np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8))
            return img.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise UserError(f"image {path} is too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"image {path} cannot be decoded ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                        "fix or remove it, or set data.broken_images=skip") from None


def _decodes(path: Path) -> bool:
    try:
        open_image(path)
    except UserError:
        return False
    return True


class FolderDataset(Dataset):
    """`(transform(image), class index)` for every image of a split, decoded strictly."""

    def __init__(self, samples: list[tuple[Path, int]], transform: Optional[Callable],
                 skipped: Optional[list[Path]] = None) -> None:
        self.samples = samples
        self.transform = transform
        self.skipped = list(skipped or [])  # broken files left out (data.broken_images=skip)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        img = open_image(path)
        return (self.transform(img) if self.transform is not None else img), target

    def __len__(self) -> int:
        return len(self.samples)


def build_dataset(data_cfg: DataConfig, split: str, img_size: int, is_training: bool) -> Dataset:
    """The folder data set of `data.root/<split>` with the train or eval transform (the data
    settings checked first)."""
    check_data(data_cfg)
    path = split_dir(data_cfg, split)
    samples = list_samples(path, _class_map(data_cfg, path))
    if not samples:
        raise UserError(f"data.root: no images found in {path} (expected {path}/<class>/<image> "
                        "for the class folders of train/)")
    skipped: list[Path] = []
    if data_cfg.broken_images == "skip":
        skipped = [p for p, _ in samples if not _decodes(p)]
        if skipped:
            bad = set(skipped)
            samples = [s for s in samples if s[0] not in bad]
            log.warning("data: left out %d image(s) of %s that do not decode (first: %s)",
                        len(skipped), path, skipped[0])
    return FolderDataset(samples, build_transform(data_cfg, img_size, is_training), skipped)


def targets(dataset: Dataset) -> list[int]:
    """Class index of every sample of a folder data set, without decoding images."""
    return [int(t) for _, t in dataset.samples]


def split_settings(data_cfg: DataConfig) -> dict[str, Any]:
    """Which images the train/hold-out split puts where: a superformer records it, and scores
    computed on a hold-out depend on it."""
    return {"data.root": str(Path(data_cfg.root).expanduser().absolute()),
            "data.holdout_per_class": data_cfg.holdout_per_class, "data.split_seed": data_cfg.split_seed}


def check_data_source(data_cfg: DataConfig, holdout: bool) -> None:
    """Refuse, before anything runs, data settings and folders no stage can use: bad values, a
    missing root or split, class folders val/ has and train/ lacks and, with `holdout`, a
    hold-out split that would take every image of a class (files are listed, not decoded)."""
    check_data(data_cfg)
    for split in SPLITS:
        path = split_dir(data_cfg, split)
        _class_map(data_cfg, path)
    if holdout and data_cfg.holdout_per_class:
        train = split_dir(data_cfg, "train")
        for name in class_names(data_cfg):
            count = len(list_images(train / name))
            if count <= data_cfg.holdout_per_class:
                raise UserError(f"data.holdout_per_class={data_cfg.holdout_per_class} leaves no "
                                f"training images of class {name} ({count} images)")


def split_train_holdout(dataset: Dataset, per_class: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, hold-out) indices: `per_class` random images of every class go to the hold-out."""
    labels = np.asarray(targets(dataset))
    rng = np.random.default_rng(seed)
    holdout: list[int] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if len(members) <= per_class:
            raise UserError(f"data.holdout_per_class={per_class} leaves no training images of "
                            f"class {cls} ({len(members)} images)")
        holdout.extend(rng.choice(members, size=per_class, replace=False).tolist())
    held = set(holdout)
    return [i for i in range(len(labels)) if i not in held], sorted(holdout)


class Splits(NamedTuple):
    """Training set (augmented, hold-out removed), hold-out and val (both non-augmented)."""

    train: Dataset
    holdout: Dataset
    val: Dataset


def build_splits(data_cfg: DataConfig, img_size: int) -> Splits:
    """The three data sets every stage uses, with the hold-out fixed by `data.split_seed`."""
    train_aug = build_dataset(data_cfg, "train", img_size, is_training=True)
    train_plain = build_dataset(data_cfg, "train", img_size, is_training=False)
    train_idx, holdout_idx = split_train_holdout(train_plain, data_cfg.holdout_per_class,
                                                 data_cfg.split_seed)
    return Splits(Subset(train_aug, train_idx), Subset(train_plain, holdout_idx),
                  build_dataset(data_cfg, "val", img_size, is_training=False))


class ShardSampler(Sampler[int]):
    """Every `world`-th index from `rank`, without padding, so evaluation counts each image once."""

    def __init__(self, length: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, length, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        """Same order every epoch (for the same interface as DistributedSampler)."""


def create_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0,
                  drop_last: bool = False, workers: int = 2,
                  distributed: bool = True) -> DataLoader:
    """DataLoader over `dataset` with `batch_size` images per process.

    Shuffling goes through a DistributedSampler (seed + `loader.sampler.set_epoch(e)`, also for a
    single process) so an epoch's order is reproducible. Across processes without shuffling and
    without drop_last (evaluation), each process reads a disjoint, unpadded shard.
    """
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    if shuffle or drop_last:
        sampler: Sampler = DistributedSampler(dataset, num_replicas=world, rank=rank,
                                              shuffle=shuffle, seed=seed, drop_last=drop_last)
    else:
        sampler = ShardSampler(len(dataset), rank, world)
    generator = torch.Generator().manual_seed(seed + rank)  # seeds the workers' RNGs
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=drop_last, generator=generator,
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)


def create_mixup(data_cfg: DataConfig, num_classes: int) -> Optional[Mixup]:
    """timm's Mixup/CutMix (with label smoothing) or None when both alphas are 0."""
    if data_cfg.mixup <= 0 and data_cfg.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=data_cfg.mixup, cutmix_alpha=data_cfg.cutmix,
                 prob=data_cfg.mixup_prob, switch_prob=data_cfg.mixup_switch_prob, mode="batch",
                 label_smoothing=data_cfg.smoothing, num_classes=num_classes)


def check_mixup_batch(mixup: Optional[Mixup], batch_key: str, batch_size: int, world_size: int) -> None:
    """timm's batch-mode Mixup/CutMix needs an even batch in each process: refuse an odd one
    before training starts, naming the global batch key."""
    local = batch_size // world_size
    if mixup is not None and local % 2:
        raise UserError(f"Mixup/CutMix needs an even batch per process; {batch_key}={batch_size} "
                        f"over {world_size} process(es) gives {local}")


def create_loss(data_cfg: DataConfig, mixup_active: bool) -> torch.nn.Module:
    """Soft-target CE after Mixup (smoothing is in its targets), else label-smoothing/plain CE."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    if data_cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=data_cfg.smoothing)
    return torch.nn.CrossEntropyLoss()
