"""Ground-truth tables for `vitas rank --ground-truth FILE`: architectures with accuracies.

A table holds one row per architecture: its `arch` (the project's JSON dict, or an encoding the
space canonicalises) and one or more accuracy columns, from the user's own trained runs or from a
published benchmark.
- CSV: a header row; the `arch` column holds the JSON dict; every other column is a target (an
  empty cell is a missing value).
- JSON: a list of objects, or a JSON-lines file (one object per line), each `{"arch": {...},
  <target>: number, ...}`; accuracies may also sit in a nested `"acc": {<target>: number}`
  (ViT-Bench-101's layout). Keys named in `IGNORED` are carried along, not targets.

Every problem is a UserError naming the row and column, found before anything is computed:
unknown target columns, architectures outside the space, duplicated architectures (after
canonicalisation), non-numeric accuracies, fewer than 2 rows.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from vitas.core.errors import UserError

IGNORED = ("name", "id", "index", "autoprox_arch", "notes")


@dataclass(frozen=True)
class GroundTruth:
    """Architectures (canonical) and their accuracy per target column (None where missing)."""

    archs: list[dict]
    targets: dict[str, list[Optional[float]]]
    names: list[Optional[str]]


def _rows(path: Path) -> list[dict]:
    """The table's rows as dicts (values still as written)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        for i, row in enumerate(rows, 2):
            if None in row:
                raise UserError(f"{path}: row {i} has more cells than the header")
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is neither a CSV (by its suffix), JSON nor JSON lines: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("rows"), list):
        data = data["rows"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{path}: expected a list of objects, one per architecture")
    return [{**{k: v for k, v in r.items() if k != "acc"}, **r["acc"]} if isinstance(r.get("acc"), dict)
            else r for r in data]


def _number(value: Any, where: str) -> Optional[float]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise UserError(f"{where}: {value!r} is not an accuracy")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise UserError(f"{where}: {value!r} is not a finite number")
    return number


def read_ground_truth(path: str | Path, space: Any, targets: Sequence[str] = ()) -> GroundTruth:
    """Read and check a ground-truth table against `space`; `targets` picks columns (all by
    default)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"rank.ground_truth: table not found: {path}")
    rows = _rows(path)
    if len(rows) < 2:
        raise UserError(f"{path}: a ranking needs at least 2 architectures, the table has {len(rows)}")
    columns: list[str] = []
    for i, row in enumerate(rows):
        if "arch" not in row:
            raise UserError(f"{path}: row {i + 1} has no 'arch'")
        columns += [c for c in row if c not in columns and c not in ("arch", *IGNORED)]
    wanted = list(targets) or columns
    for name in wanted:
        if name not in columns:
            raise UserError(f"rank.targets: {path} has no column {name!r}; its columns are {columns}")
    if not wanted:
        raise UserError(f"{path} has no accuracy column besides 'arch'")
    archs, seen, names = [], {}, []
    values: dict[str, list[Optional[float]]] = {t: [] for t in wanted}
    for i, row in enumerate(rows, 1):
        where = f"{path}, row {i}"
        raw = row["arch"]
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError:
                raise UserError(f"{where}: 'arch' is not a JSON object") from None
        try:
            arch = space.validate(raw)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        key = space.key(arch)
        if key in seen:
            raise UserError(f"{where}: the same architecture as row {seen[key]}")
        seen[key] = i
        archs.append(arch)
        names.append(str(row.get("name", row.get("id", ""))) or None)
        for t in wanted:
            values[t].append(_number(row.get(t), f"{where}, column {t!r}"))
    for t, column in values.items():
        if sum(v is not None for v in column) < 2:
            raise UserError(f"{path}: column {t!r} has fewer than 2 numbers")
    return GroundTruth(archs, values, names)
