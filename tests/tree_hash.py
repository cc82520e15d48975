"""One digest of a folder tree (relative paths and bytes): byte-identical outputs compare equal."""
from __future__ import annotations

import hashlib
from pathlib import Path


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
