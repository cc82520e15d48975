"""The synthetic counting data set: deterministic, balanced, labels that follow from the pictures,
readable by `vitas data check`, and bad arguments refused before anything is written."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from vitas.cli import main
from vitas.core import synthetic
from vitas.core.synthetic import (CLASSES, label_of, render, sample_scene, scene_rng,
                                  write_counting)

from tree_hash import tree_hash

SMALL = dict(train_per_class=4, val_per_class=2)


@pytest.fixture(scope="module")
def counting(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "counting"
    write_counting(root, seed=3, workers=1, **SMALL)
    return root


def green_objects(image: np.ndarray) -> int:
    """Connected regions of the target colour in a rendered image (read from pixels alone), not
    counting specks of a few anti-aliased pixels at a sharp corner."""
    r, g, b = (image[..., i].astype(int) for i in range(3))
    regions, n = ndimage.label((g > 140) & (g - r > 80) & (g - b > 60))
    return int((np.bincount(regions.ravel(), minlength=n + 1)[1:] >= 20).sum())


def test_same_seed_same_bytes(counting, tmp_path):
    again = tmp_path / "again"
    assert write_counting(again, seed=3, workers=2, **SMALL) == {"train": 24, "val": 12,
                                                                  "classes": 6}
    assert tree_hash(again) == tree_hash(counting)  # and the worker count does not matter
    write_counting(again, seed=3, workers=1, **SMALL)  # an earlier output is replaced
    assert tree_hash(again) == tree_hash(counting)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temporary siblings
    write_counting(tmp_path / "other", seed=4, workers=1, **SMALL)
    assert tree_hash(tmp_path / "other") != tree_hash(counting)


def test_balanced_layout_readable_by_check(counting, capsys):
    for split, per_class in (("train", 4), ("val", 2)):
        assert sorted(p.name for p in (counting / split).iterdir()) == sorted(CLASSES)
        for name in CLASSES:
            files = sorted(p.name for p in (counting / split / name).iterdir())
            assert files == [f"{i:05d}.png" for i in range(per_class)]
    image = Image.open(counting / "train" / "green-3" / "00001.png")
    assert image.size == (32, 32) and image.mode == "RGB"
    assert main(["data", "check", str(counting)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {
        "root": str(counting), "classes": 6, "train": 24, "val": 12}


def test_labels_follow_from_the_rendered_scene(counting):
    """Every file is its scene re-drawn; the scene's rule gives the folder's class; and the count
    read off the pixels (drawn at 128 px, where the gaps between objects are 4 px) agrees."""
    for path in sorted(counting.rglob("*.png")):
        split, name, index = path.parts[-3], path.parts[-2], int(path.stem)
        label = CLASSES.index(name)
        scene = sample_scene(scene_rng(3, split, label, index), label)
        assert np.array_equal(np.asarray(Image.open(path)), render(scene, 32))
        assert label_of(scene) == label
        assert green_objects(render(scene, 128)) == label + 1
    for label in range(len(CLASSES)):
        for index in range(20):  # more scenes than files: the rule on the pixels, class by class
            scene = sample_scene(scene_rng(0, "train", label, index), label)
            assert green_objects(render(scene, 128)) == label + 1 == label_of(scene) + 1
            assert 7 <= len(scene.items) <= 9  # the total count carries no hint of the class


def test_other_sizes_draw_the_same_scene(tmp_path):
    write_counting(tmp_path / "big", seed=1, size=48, workers=1, train_per_class=1,
                   val_per_class=1)
    image = np.asarray(Image.open(tmp_path / "big" / "val" / "green-5" / "00000.png"))
    assert image.shape == (48, 48, 3)
    assert np.array_equal(image, render(sample_scene(scene_rng(1, "val", 4, 0), 4), 48))


@pytest.mark.parametrize("option, value, message", [
    ("--size", "8", "--size must be at least 16, got 8"),
    ("--train-per-class", "0", "--train-per-class must be at least 1, got 0"),
    ("--val-per-class", "-2", "--val-per-class must be at least 1, got -2"),
    ("--seed", "-1", "--seed must be at least 0, got -1"),
    ("--workers", "0", "--workers must be at least 1, got 0"),
])
def test_bad_arguments_exit_2_and_write_nothing(tmp_path, capsys, option, value, message):
    assert main(["data", "counting", str(tmp_path / "d"), option, value]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"vitas: error: {message}"]
    assert list(tmp_path.iterdir()) == []


def test_foreign_folder_refused(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["data", "counting", str(tmp_path / "mine"), "--train-per-class", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"vitas: error: {tmp_path / 'mine'} exists and is not a counting data set; "
        "choose a new folder"]
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_interrupted_write_leaves_the_old_tree(tmp_path, monkeypatch):
    root = tmp_path / "counting"
    write_counting(root, seed=5, workers=1, **SMALL)
    before = tree_hash(root)
    real_save, calls = Image.Image.save, []

    def failing_save(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 10:
            raise OSError("disk full")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_counting(root, seed=6, workers=1, **SMALL)
    assert tree_hash(root) == before and sorted(p.name for p in tmp_path.iterdir()) == ["counting"]
    calls.clear()
    with pytest.raises(OSError):
        write_counting(tmp_path / "fresh", workers=1, **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counting"]


def test_cli_writes_and_reports(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["data", "counting", str(out), "--seed", "2", "--train-per-class", "2",
                 "--val-per-class", "1", "--workers", "1"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {
        "root": str(out), "train": 12, "val": 6, "classes": 6}
    assert len(list(out.rglob("*.png"))) == 18


def test_label_range_checked():
    with pytest.raises(ValueError, match="label"):
        sample_scene(np.random.default_rng(0), synthetic.MAX_COUNT)
