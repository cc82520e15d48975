"""Checkpoints from a URL: downloaded into a cache, sha256-verified, loaded with `weights_only`.

A download needs its expected sha256, given outright (`--sha256`, `inference.sha256`) or as
torch.hub's convention of a hash prefix in the file name (`NAME-<8+ hex digits>.pth`). The file
is written to a temporary name and only renamed into the cache once its hash matches
(`torch.hub.download_url_to_file`); on a mismatch nothing is left behind. The cache is
`inference.cache_dir`, else `$VITAS_CACHE_DIR`, else `~/.cache/vitas`.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Optional
from urllib.error import URLError
from urllib.parse import unquote, urlparse

from torch.hub import HASH_REGEX, download_url_to_file

from vitas.core import dist
from vitas.core.checkpoint import load_checkpoint
from vitas.core.errors import UserError

URL_SCHEMES = ("http", "https", "file")
MIN_PREFIX = 8  # torch.hub's published file names carry 8 hex digits
_HEX = re.compile(r"[0-9a-f]+")


def is_url(path_or_url: str | os.PathLike) -> bool:
    """True for http(s):// and file:// addresses."""
    return urlparse(str(path_or_url)).scheme in URL_SCHEMES


def cache_dir(override: Optional[str] = None) -> Path:
    """Where downloads go: `override`, `$VITAS_CACHE_DIR` or `~/.cache/vitas`."""
    return Path(override or os.environ.get("VITAS_CACHE_DIR") or "~/.cache/vitas").expanduser()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def expected_hash(file_name: str, sha256: Optional[str]) -> str:
    """The full sha256 (or hash prefix) a file must have; UserError when neither is available."""
    if sha256:
        sha256 = sha256.strip().lower()
        if len(sha256) != 64 or not _HEX.fullmatch(sha256):
            raise UserError(f"--sha256 must be 64 hexadecimal digits, got {sha256!r}")
        return sha256
    found = HASH_REGEX.search(file_name)
    if found and len(found.group(1)) >= MIN_PREFIX:
        return found.group(1)
    raise UserError(f"downloading {file_name} needs its sha256: pass --sha256 HEX (inference.sha256) "
                    f"or use a torch.hub-style name NAME-<sha256 prefix>.pth")


def download(url: str, sha256: Optional[str] = None, cache: Optional[str] = None) -> Path:
    """Download `url` into the cache (or reuse a cached copy whose hash matches) and return it."""
    name = Path(unquote(urlparse(url).path)).name
    if not name:
        raise UserError(f"URL {url} does not name a file")
    expected = expected_hash(name, sha256)
    dst = cache_dir(cache) / "checkpoints" / name
    if dst.is_file():
        if sha256_file(dst).startswith(expected):
            return dst
        dst.unlink()  # a stale or corrupted copy: fetch again
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        download_url_to_file(url, str(dst), hash_prefix=expected, progress=sys.stderr.isatty())
    except RuntimeError as exc:  # torch.hub's hash check; it has already removed the partial file
        raise UserError(f"sha256 mismatch for {url}: {exc}; the download was deleted") from None
    except (URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise UserError(f"cannot download {url}: {reason}") from None
    return dst


def resolve_checkpoint(path_or_url: str | os.PathLike, sha256: Optional[str] = None,
                       cache: Optional[str] = None) -> Path:
    """A local path for a checkpoint file or URL; a given sha256 is checked for local files too.

    Under several processes rank 0 downloads first and the others then reuse its cached copy.
    """
    if is_url(path_or_url):
        if dist.is_main():
            path = download(str(path_or_url), sha256, cache)
        dist.barrier()
        if not dist.is_main():
            path = download(str(path_or_url), sha256, cache)
        return path
    path = Path(path_or_url).expanduser()
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if sha256 and path.is_file():
        expected, actual = expected_hash(path.name, sha256), sha256_file(path)
        if actual != expected:
            raise UserError(f"sha256 mismatch for {path}: expected {expected}, got {actual}")
    return path


def load_remote(path_or_url: str | os.PathLike, sha256: Optional[str] = None,
                cache: Optional[str] = None) -> dict:
    """Resolve (download and verify) a checkpoint and load it with `weights_only=True`."""
    return load_checkpoint(resolve_checkpoint(path_or_url, sha256, cache))
