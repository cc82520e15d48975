"""Data: digits writer (complete, deterministic, atomic), hold-out split, timm loaders, errors."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from vitas.core.config import DataConfig, config_from_dict
from vitas.core.data import (build_dataset, build_splits, create_loader, create_loss, create_mixup,
                       num_classes, split_train_holdout, targets, write_digits)
from vitas.core.errors import UserError
from vitas.cli import main

from tree_hash import tree_hash

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "digits"
    write_digits(root)
    return root


def cfg_for(root, **kw) -> DataConfig:
    """A data section checked as a config file's would be (the value rules apply at load)."""
    return config_from_dict({"data": {"root": str(root), **kw}}).data


def test_digits_complete(digits):
    files = sorted(digits.rglob("*.png"))
    assert len(files) == 1797
    assert {p.name for p in files} == {f"{i:04d}.png" for i in range(1797)}  # no image twice
    for split in ("train", "val"):
        assert sorted(p.name for p in (digits / split).iterdir()) == [str(c) for c in range(10)]
    n_val = len(list((digits / "val").rglob("*.png")))
    assert n_val == 360  # 20 % of 1797, stratified
    img = Image.open(files[0])
    assert img.size == (32, 32) and img.mode == "RGB"
    pixels = np.stack([np.asarray(Image.open(p)) for p in files[:50]])
    assert pixels.min() == 0 and pixels.max() == 255


def test_digits_byte_identical(digits, tmp_path):
    other = tmp_path / "again"
    assert write_digits(other) == {"train": 1437, "val": 360}
    assert tree_hash(other) == tree_hash(digits)
    write_digits(other)  # rewriting an existing digits folder replaces it with the same bytes
    assert tree_hash(other) == tree_hash(digits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temporary siblings left
    assert tree_hash(write_digits(tmp_path / "s1", seed=1) and tmp_path / "s1") != tree_hash(digits)


def test_digits_interrupted_write(tmp_path, digits, monkeypatch):
    """Interrupted half-way through a rewrite: the old data set is untouched at that moment (as
    after a kill), and the partial copy is removed; a stale one from a killed run is cleared."""
    root = tmp_path / "digits"
    write_digits(root, seed=5)
    before = tree_hash(root)
    seen = {}
    real_save = Image.Image.save

    def failing_save(self, *args, **kwargs):
        seen["n"] = seen.get("n", 0) + 1
        if seen["n"] == 300:
            seen["root_then"] = tree_hash(root)
            seen["siblings_then"] = sorted(p.name for p in tmp_path.iterdir())
            raise OSError("disk full")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_digits(root)
    assert seen["root_then"] == before and seen["siblings_then"] == [".digits.partial", "digits"]
    assert tree_hash(root) == before and sorted(p.name for p in tmp_path.iterdir()) == ["digits"]
    seen["n"] = 0
    with pytest.raises(OSError):
        write_digits(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    monkeypatch.setattr(Image.Image, "save", real_save)
    (tmp_path / ".digits.partial" / "train").mkdir(parents=True)  # as a SIGKILL would leave it
    write_digits(root)
    assert tree_hash(root) == tree_hash(digits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]


def test_digits_refuses_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a digits data set"):
        write_digits(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="between 0 and 1"):
        write_digits(tmp_path / "x", val_fraction=1.5)


def test_holdout_split(digits):
    ds = build_dataset(cfg_for(digits), "train", 32, is_training=False)
    labels = np.asarray(targets(ds))
    train_idx, holdout_idx = split_train_holdout(ds, 7, seed=0)
    assert np.bincount(labels[holdout_idx]).tolist() == [7] * 10
    assert not set(train_idx) & set(holdout_idx)
    assert sorted(train_idx + holdout_idx) == list(range(len(ds)))
    assert split_train_holdout(ds, 7, seed=0) == (train_idx, holdout_idx)
    assert split_train_holdout(ds, 7, seed=1)[1] != holdout_idx
    with pytest.raises(UserError, match="holdout_per_class"):
        split_train_holdout(ds, 1000, seed=0)


def test_build_splits(digits):
    cfg = cfg_for(digits, holdout_per_class=5)
    splits = build_splits(cfg, 32)
    assert (len(splits.train), len(splits.holdout), len(splits.val)) == (1387, 50, 360)
    assert num_classes(cfg) == 10 and num_classes(cfg_for(digits, num_classes=12)) == 12
    # train and val agree on class indices (both from train/'s folders)
    val_paths = splits.val.samples
    assert all(Path(p).parent.name == str(t) for p, t in val_paths)
    # hold-out images are not augmented: the same tensor every time
    x1, y1 = splits.holdout[3]
    x2, _ = splits.holdout[3]
    assert torch.equal(x1, x2) and isinstance(y1, int)


def test_loaders_shapes_and_mixup(digits):
    cfg = cfg_for(digits, mixup=0.8, cutmix=1.0)
    splits = build_splits(cfg, 32)
    loader = create_loader(splits.train, 16, shuffle=True, seed=0, drop_last=True, workers=0)
    x, y = next(iter(loader))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (16,)
    assert len(loader) == len(splits.train) // 16
    mixup = create_mixup(cfg, 10)
    xm, ym = mixup(x, y)
    assert xm.shape == x.shape and ym.shape == (16, 10)
    assert torch.allclose(ym.sum(1), torch.ones(16))
    assert isinstance(create_loss(cfg, mixup_active=True), SoftTargetCrossEntropy)
    assert isinstance(create_loss(cfg, mixup_active=False), LabelSmoothingCrossEntropy)
    plain = cfg_for(digits, mixup=0.0, cutmix=0.0, smoothing=0.0)
    assert create_mixup(plain, 10) is None
    assert isinstance(create_loss(plain, mixup_active=False), torch.nn.CrossEntropyLoss)
    val = create_loader(splits.val, 100, shuffle=False, workers=2)
    batches = list(val)
    assert sum(len(b[1]) for b in batches) == 360 and batches[0][0].shape == (100, 3, 32, 32)
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.tensor(targets(splits.val)))


def test_loader_order_reproducible(digits):
    ds = build_splits(cfg_for(digits), 32).holdout

    def labels(seed, epoch):
        loader = create_loader(ds, 10, shuffle=True, seed=seed, workers=0)
        loader.sampler.set_epoch(epoch)
        return torch.cat([y for _, y in loader]).tolist()

    assert labels(0, 0) == labels(0, 0)
    assert labels(0, 0) != labels(0, 1) and labels(0, 0) != labels(1, 0)
    assert sorted(labels(0, 0)) == sorted(targets(ds.dataset)[i] for i in ds.indices)


def test_missing_data_root(tmp_path, digits):
    with pytest.raises(UserError, match="data.root.*not found"):
        build_dataset(cfg_for(tmp_path / "absent"), "train", 32, is_training=True)
    (tmp_path / "half" / "train" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="data.root.*no 'val/' folder"):
        build_dataset(cfg_for(tmp_path / "half"), "val", 32, is_training=False)
    with pytest.raises(UserError, match="data.root"):
        num_classes(DataConfig())


def test_cli(tmp_path, digits, capsys):
    assert main(["data", "digits", str(tmp_path / "d"), "--seed", "0"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["train"] == 1437
    assert tree_hash(tmp_path / "d") == tree_hash(digits)
    assert main(["data", "check", str(digits)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {
        "root": str(digits), "classes": 10, "train": 1437, "val": 360}
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "x.txt").write_text("x")
    assert main(["data", "digits", str(tmp_path / "mine")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"vitas: error: {tmp_path / 'mine'} "
                                                           "exists and is not a digits data set; "
                                                           "choose a new folder"]


def test_cli_missing_root_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vitas", "data", "check", str(tmp_path / "no")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"vitas: error: data.root: directory not found: {tmp_path / 'no'}"]


BAD_DATA = [  # (DataConfig field, value, text the error must contain)
    ("workers", -1, "data.workers must be >= 0"),
    ("interpolation", "foo", "data.interpolation must be one of nearest, bilinear, bicubic"),
    ("interpolation", "random", "data.interpolation"),  # timm's eval transform has no 'random'
    ("auto_augment", "bogus", "data.auto_augment: 'bogus' is not a timm augmentation policy"),
    ("auto_augment", "randbogus", "data.auto_augment"),
    ("scale", [1.0], "data.scale must be [min, max]"),
    ("scale", [0.9, 0.5], "data.scale"),
    ("scale", [0.0, 1.0], "data.scale"),
    ("mean", [0.5, 0.5], "data.mean must be 3 numbers"),
    ("std", [0.5, 0.0, 0.5], "data.std must be 3 numbers > 0"),
    ("crop_pct", 0.0, "data.crop_pct"),
    ("hflip", 1.5, "data.hflip must be in [0, 1]"),
    ("reprob", -0.1, "data.reprob"),
    ("color_jitter", -1.0, "data.color_jitter"),
    ("mixup", float("nan"), "data.mixup must be a number >= 0, got nan"),
    ("cutmix", -1.0, "data.cutmix"),
    ("mixup_prob", 2.0, "data.mixup_prob"),
    ("mixup_switch_prob", -0.5, "data.mixup_switch_prob"),
    ("smoothing", 1.0, "data.smoothing must be in [0, 1)"),
    ("holdout_per_class", -1, "data.holdout_per_class"),
    ("split_seed", -1, "data.split_seed"),
    ("num_classes", 0, "data.num_classes must be null or >= 1"),
    ("num_classes", 5, "data.num_classes=5 is fewer than the 10 class folders"),
]


@pytest.mark.parametrize("key, value, needle", BAD_DATA, ids=[f"{k}={v}" for k, v, _ in BAD_DATA])
def test_bad_data_settings_are_user_errors(tiny_digits, key, value, needle):
    with pytest.raises(UserError) as info:
        build_dataset(cfg_for(tiny_digits, **{key: value}), "train", 32, is_training=True)
    assert needle in str(info.value)


@pytest.mark.parametrize("changes", [{}, {"interpolation": "box"}, {"auto_augment": None},
                                     {"auto_augment": ""}, {"auto_augment": "augmix-m5-w4-d2"},
                                     {"auto_augment": "v0"}, {"num_classes": 12},
                                     {"scale": [1.0, 1.0]}, {"holdout_per_class": 0}])
def test_good_data_settings_pass(tiny_digits, changes):
    assert len(build_dataset(cfg_for(tiny_digits, **changes), "train", 32, is_training=True)) == 120


@pytest.mark.parametrize("val_classes", [["0"], []], ids=["empty class folder", "no class folder"])
def test_split_without_images(tmp_path, tiny_digits, capsys, val_classes):
    root = tmp_path / "data"
    shutil.copytree(tiny_digits / "train", root / "train")
    for name in val_classes:
        (root / "val" / name).mkdir(parents=True)
    (root / "val").mkdir(exist_ok=True)
    with pytest.raises(UserError, match=f"data.root: no images found in {root / 'val'}"):
        build_dataset(cfg_for(root), "val", 32, is_training=False)
    assert main(["data", "check", str(root)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"vitas: error: data.root: no images found in {root / 'val'} (expected "
        f"{root / 'val'}/<class>/<image> for the class folders of train/)"]


def test_val_class_missing_from_train_is_refused(tmp_path, tiny_digits):
    root = tmp_path / "data"
    shutil.copytree(tiny_digits, root)
    (root / "val" / "9").rename(root / "val" / "x")
    with pytest.raises(UserError, match=r"class folders that train/ lacks: x$"):
        build_dataset(cfg_for(root), "val", 32, is_training=False)


@pytest.mark.parametrize("fraction, n_val", [(0.001, 2), (0.005, 9), (0.995, 1789), (0.999, 1796)])
def test_val_fraction_leaving_a_class_out(tmp_path, capsys, fraction, n_val):
    assert main(["data", "digits", str(tmp_path / "d"), "--val-fraction", str(fraction)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"vitas: error: val fraction {fraction} puts {n_val} of 1797 images in val/; each split "
        "needs an image of each of the 10 classes, so val/ needs 10 to 1787 images"]
    assert list(tmp_path.iterdir()) == []  # nothing written, no partial copy


def test_val_fraction_at_the_bound(tmp_path):
    """The smallest val/ the check lets through still holds every class (one image each)."""
    assert write_digits(tmp_path / "d", val_fraction=0.00556) == {"train": 1787, "val": 10}
    assert sorted(len(list(c.iterdir())) for c in (tmp_path / "d" / "val").iterdir()) == [1] * 10
