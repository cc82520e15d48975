"""Verified downloads: sha256 or torch.hub hash prefix, nothing left on a mismatch, weights_only."""
import functools
import hashlib
import http.server
import os
import threading
from pathlib import Path

import pytest
import torch

from vitas.core.errors import UserError
from vitas.inference.hub import download, load_remote, resolve_checkpoint


class Evil:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An HTTP server on 127.0.0.1 serving a folder: (folder, base URL)."""
    root = tmp_path_factory.mktemp("www")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def publish(root: Path, name: str, obj) -> str:
    """Save `obj` as root/name; returns its sha256."""
    torch.save(obj, root / name)
    return hashlib.sha256((root / name).read_bytes()).hexdigest()


def test_download_with_sha256(server, tmp_path):
    root, url = server
    digest = publish(root, "good.pth", {"model": {"w": torch.arange(4.0)}})
    path = download(f"{url}/good.pth", sha256=digest, cache=str(tmp_path))
    assert path == tmp_path / "checkpoints" / "good.pth"
    state = load_remote(f"{url}/good.pth", digest, str(tmp_path))
    assert torch.equal(state["model"]["w"], torch.arange(4.0))
    (root / "good.pth").unlink()  # a cached copy with the right hash is reused
    assert download(f"{url}/good.pth", sha256=digest.upper(), cache=str(tmp_path)) == path


def test_wrong_hash_fails_and_leaves_no_file(server, tmp_path):
    root, url = server
    publish(root, "tampered.pth", {"w": torch.ones(3)})
    with pytest.raises(UserError, match="sha256 mismatch") as err:
        download(f"{url}/tampered.pth", sha256="0" * 64, cache=str(tmp_path))
    assert "\n" not in str(err.value)
    assert list(tmp_path.rglob("*.*")) == []  # neither the file nor a partial download


def test_stale_cached_copy_is_replaced(server, tmp_path):
    root, url = server
    digest = publish(root, "fresh.pth", {"w": torch.zeros(2)})
    cached = tmp_path / "checkpoints" / "fresh.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"corrupted")
    assert download(f"{url}/fresh.pth", sha256=digest, cache=str(tmp_path)) == cached
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == digest


def test_torch_hub_hash_prefix_in_name(server, tmp_path):
    root, url = server
    digest = publish(root, "staging.pth", {"w": torch.ones(2)})
    (root / f"net-{digest[:8]}.pth").write_bytes((root / "staging.pth").read_bytes())
    (root / "net-0badbeef.pth").write_bytes((root / "staging.pth").read_bytes())
    assert download(f"{url}/net-{digest[:8]}.pth", cache=str(tmp_path)).is_file()
    with pytest.raises(UserError, match="sha256 mismatch"):
        download(f"{url}/net-0badbeef.pth", cache=str(tmp_path))
    assert not (tmp_path / "checkpoints" / "net-0badbeef.pth").exists()


def test_hash_is_required(server, tmp_path):
    _, url = server
    with pytest.raises(UserError, match="needs its sha256"):
        download(f"{url}/good.pth", cache=str(tmp_path))
    with pytest.raises(UserError, match="64 hexadecimal digits"):
        download(f"{url}/good.pth", sha256="abc", cache=str(tmp_path))
    assert not list(tmp_path.rglob("*.pth"))


def test_unreachable_and_missing(server, tmp_path):
    _, url = server
    with pytest.raises(UserError, match="cannot download"):
        download(f"{url}/absent.pth", sha256="a" * 64, cache=str(tmp_path))
    with pytest.raises(UserError, match="checkpoint not found"):
        resolve_checkpoint(tmp_path / "nowhere.pth")


def test_file_url_and_local_hash(tmp_path):
    digest = publish(tmp_path, "local.pth", {"w": torch.ones(1)})
    cache = tmp_path / "cache"
    assert download((tmp_path / "local.pth").as_uri(), sha256=digest, cache=str(cache)).is_file()
    assert resolve_checkpoint(tmp_path / "local.pth", sha256=digest) == tmp_path / "local.pth"
    with pytest.raises(UserError, match="sha256 mismatch"):
        resolve_checkpoint(tmp_path / "local.pth", sha256="f" * 64)
    assert (tmp_path / "local.pth").is_file()  # a user's own file is never deleted


def test_malicious_pickle_is_refused(server, tmp_path):
    root, url = server
    marker = tmp_path / "pwned"
    digest = publish(root, "evil.pth", {"model": Evil(marker)})
    with pytest.raises(UserError, match="refusing to load") as err:
        load_remote(f"{url}/evil.pth", sha256=digest, cache=str(tmp_path / "cache"))
    assert "\n" not in str(err.value)
    assert not marker.exists()
