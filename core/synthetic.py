"""`vitas data counting DIR`: a synthetic image-classification task whose label needs the whole image.

Task: how many green objects does the picture show? Classes `green-1` ... `green-6`. Every image
holds 7 to 9 small objects (circle, square, triangle or plus, randomly rotated, 4 to 7.6 px across
at 32 px) on a random dark background crossed by grey clutter lines; the objects that are not
green take the seven other colours of the palette (red, blue, yellow, magenta, cyan, white,
orange), so the total number of objects says nothing about the class.

Why architecture matters on it (digits, by contrast, is solved by a tiny net, so every
architecture ends within seed noise of the others):
- the label is global: one patch holds at most one or two objects, so no patch and no local
  feature reveals the count; the network has to gather evidence from every token;
- object sizes vary 3.6x in area, so the green *area* (what a mean over patch features measures)
  only approximates the count; counting exactly means finding objects, which straddle patch
  borders (4 and 8 px patches), i.e. grouping tokens, which takes attention depth and width;
- colour is the only cue, and it must be separated from yellow and cyan neighbours and from the
  clutter: a width question for the patch embedding.

Generation is deterministic: the scene of image `index` of class `label` in `split` is drawn from
`numpy.random.default_rng([seed, split, label, index])` alone, so the files do not depend on the
number of worker processes and the same seed gives byte-identical PNGs. Scenes are sampled for
their class (balanced classes by construction); `label_of` recomputes the class from a scene and
`render` draws it (at 4x the size, box-filtered down) at any image size: lengths are fractions of
the image side.
"""
from __future__ import annotations

import math
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vitas.core.data import replace_tree
from vitas.core.errors import UserError

NAME = "counting"
SPLITS = ("train", "val")
SHAPES = ("circle", "square", "triangle", "plus")
# Object colours (RGB before a per-object jitter of +-JITTER per channel); TARGET is counted.
PALETTE = {"green": (40, 180, 60), "red": (220, 40, 40), "blue": (40, 80, 230),
           "yellow": (230, 210, 40), "magenta": (200, 50, 200), "cyan": (40, 200, 210),
           "white": (235, 235, 235), "orange": (240, 140, 30)}
TARGET = "green"
JITTER = 20
MAX_COUNT = 6  # classes: 1 .. MAX_COUNT green objects
OBJECTS = (7, 9)  # objects per image (inclusive range), whatever the class
RADIUS = (2.0 / 32, 3.8 / 32)  # object radius, fraction of the image side
GAP = 1.0 / 32  # smallest distance between two objects' outlines
STROKES = 10  # clutter lines per image
SUPERSAMPLE = 4  # drawn at 4x the image side, then box-filtered down (anti-aliasing)
MIN_SIZE = 16
CHUNK = 250  # images per job of the worker pool
CLASSES = tuple(f"{TARGET}-{count}" for count in range(1, MAX_COUNT + 1))


@dataclass(frozen=True)
class Item:
    """One object; lengths are fractions of the image side, y grows downwards."""

    shape: str
    color: str
    rgb: tuple[int, int, int]
    x: float
    y: float
    radius: float
    angle: float


@dataclass(frozen=True)
class Stroke:
    """One clutter line under the objects (width a fraction of the image side)."""

    x0: float
    y0: float
    x1: float
    y1: float
    width: float
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    """Everything an image shows: `render` draws it, `label_of` reads its class from it."""

    background: tuple[int, int, int]
    strokes: tuple[Stroke, ...]
    items: tuple[Item, ...]


def label_of(scene: Scene) -> int:
    """The class index of a scene: its number of green objects, minus one."""
    return sum(item.color == TARGET for item in scene.items) - 1


def scene_rng(seed: int, split: str, label: int, index: int) -> np.random.Generator:
    """The generator that draws image `index` of class `label` in `split` (and nothing else)."""
    return np.random.default_rng([seed, SPLITS.index(split), label, index])


def sample_scene(rng: np.random.Generator, label: int) -> Scene:
    """A random scene of class `label` (label + 1 green objects among 7 to 9)."""
    count = label + 1
    if not 1 <= count <= MAX_COUNT:
        raise ValueError(f"label must be in 0..{MAX_COUNT - 1}, got {label}")
    total = int(rng.integers(OBJECTS[0], OBJECTS[1] + 1))
    others = [name for name in PALETTE if name != TARGET]
    colors = [TARGET] * count + [others[i] for i in rng.integers(len(others), size=total - count)]
    background = tuple(int(v) for v in rng.integers(30, 111, size=3))
    # clutter: greyish lines, slightly tinted, across random parts of the image
    grey = rng.integers(40, 161, size=(STROKES, 1)) + rng.integers(-25, 26, size=(STROKES, 3))
    ends = rng.uniform(0.0, 1.0, size=(STROKES, 4))
    widths = rng.uniform(0.5, 1.0, size=STROKES) / 32
    strokes = tuple(Stroke(*(float(v) for v in ends[i]), width=float(widths[i]),
                           rgb=_color(grey[i])) for i in range(STROKES))
    shapes = rng.integers(len(SHAPES), size=total)
    shifts = rng.integers(-JITTER, JITTER + 1, size=(total, 3))
    angles = rng.uniform(0.0, 2.0 * math.pi, size=total)
    items = tuple(Item(shape=SHAPES[shapes[i]], color=color,
                       rgb=_color(np.asarray(PALETTE[color]) + shifts[i]), x=x, y=y, radius=r,
                       angle=float(angles[i]))
                  for i, (color, (x, y, r)) in enumerate(zip(colors, _place(rng, total))))
    return Scene(background=background, strokes=strokes, items=items)


def _color(values: np.ndarray) -> tuple[int, int, int]:
    """Three ints clipped to 0..255."""
    return tuple(min(255, max(0, int(v))) for v in values)


def _place(rng: np.random.Generator, n: int) -> list[tuple[float, float, float]]:
    """`n` non-overlapping discs (x, y, radius) inside the unit square, GAP apart; restarts
    the layout when a disc finds no room (rare at these sizes)."""
    while True:
        discs: list[tuple[float, float, float]] = []
        for _ in range(n):
            for _attempt in range(100):
                r = float(rng.uniform(*RADIUS))
                x, y = (float(v) for v in rng.uniform(r, 1.0 - r, size=2))
                if all(math.hypot(x - u, y - v) >= r + s + GAP for u, v, s in discs):
                    discs.append((x, y, r))
                    break
            else:
                break
        if len(discs) == n:
            return discs


def _outline(item: Item, scale: float) -> list[tuple[float, float]]:
    """Polygon corners of a square, triangle or plus, rotated by the item's angle, in pixels."""
    r = item.radius
    if item.shape == "square":
        corners = [(-0.8 * r, -0.8 * r), (0.8 * r, -0.8 * r), (0.8 * r, 0.8 * r), (-0.8 * r, 0.8 * r)]
    elif item.shape == "triangle":
        corners = [(r * math.cos(a), r * math.sin(a))
                   for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    else:  # plus: arms 0.76 r wide
        w = 0.38 * r
        corners = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w),
                   (-r, w), (-r, -w), (-w, -w)]
    c, s = math.cos(item.angle), math.sin(item.angle)
    return [((item.x + px * c - py * s) * scale, (item.y + px * s + py * c) * scale)
            for px, py in corners]


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """The scene as a `size` x `size` RGB uint8 array (drawn at SUPERSAMPLE x, box-filtered)."""
    side = size * SUPERSAMPLE
    image = Image.new("RGB", (side, side), scene.background)
    draw = ImageDraw.Draw(image)
    for st in scene.strokes:
        draw.line([st.x0 * side, st.y0 * side, st.x1 * side, st.y1 * side], fill=st.rgb,
                  width=max(1, round(st.width * side)))
    for item in scene.items:
        if item.shape == "circle":
            box = [(item.x - item.radius) * side, (item.y - item.radius) * side,
                   (item.x + item.radius) * side, (item.y + item.radius) * side]
            draw.ellipse(box, fill=item.rgb)
        else:
            draw.polygon(_outline(item, side), fill=item.rgb)
    return np.asarray(image.resize((size, size), Image.BOX))


def write_counting(root: Path, seed: int = 0, size: int = 32, train_per_class: int = 3500,
                   val_per_class: int = 500, workers: int = 2) -> dict:
    """Write the data set as PNGs in `root/{train,val}/green-<n>/<index>.png` (atomically).

    Balanced classes; byte-identical for the same seed and size whatever `workers` is. An
    existing `root` must be empty or an earlier output of this generator (it is replaced).
    """
    _check_args(seed=seed, size=size, train_per_class=train_per_class,
                val_per_class=val_per_class, workers=workers)
    root = Path(root).expanduser().absolute()
    if root.exists() and not (root.is_dir() and _is_counting_tree(root)):
        raise UserError(f"{root} exists and is not a {NAME} data set; choose a new folder")
    tmp = root.parent / f".{root.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
    per_split = {"train": train_per_class, "val": val_per_class}
    jobs = [(tmp, seed, size, split, label, start, min(start + CHUNK, per_split[split]))
            for split in SPLITS for label in range(len(CLASSES))
            for start in range(0, per_split[split], CHUNK)]
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        if workers == 1:
            for job in jobs:
                _write_chunk(*job)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                list(pool.map(_write_chunk, *zip(*jobs)))
        replace_tree(root, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"train": train_per_class * len(CLASSES), "val": val_per_class * len(CLASSES),
            "classes": len(CLASSES)}



def _check_args(seed: int, size: int, train_per_class: int, val_per_class: int,
                workers: int) -> None:
    """UserError naming the option, before anything is written."""
    for option, value, low in (("--seed", seed, 0), ("--size", size, MIN_SIZE),
                               ("--train-per-class", train_per_class, 1),
                               ("--val-per-class", val_per_class, 1), ("--workers", workers, 1)):
        if value < low:
            raise UserError(f"{option} must be at least {low}, got {value}")


def _write_chunk(tmp: Path, seed: int, size: int, split: str, label: int, start: int,
                 stop: int) -> None:
    """Render and save images start..stop-1 of one class and split."""
    folder = tmp / split / CLASSES[label]
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(start, stop):
        scene = sample_scene(scene_rng(seed, split, label, index), label)
        Image.fromarray(render(scene, size)).save(folder / f"{index:05d}.png")


def _is_counting_tree(root: Path) -> bool:
    """An empty folder or an earlier `write_counting` output (which may safely be replaced)."""
    for path in root.rglob("*"):
        parts = path.relative_to(root).parts
        if parts[0] not in SPLITS or (len(parts) > 1 and parts[1] not in CLASSES):
            return False
        if len(parts) > 3 or (len(parts) == 3 and path.suffix != ".png"):
            return False
    return True
