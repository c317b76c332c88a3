"""A hostile or faulty store, written the way an attacker or a fault would: raw objects, no checks.

``plant`` writes bytes straight through fsspec (no ``ObjectStore`` path checks, no create-only),
so a test can put any manifest, any torn JSON, at any name. ``LostReplies`` makes chosen writes
land and then report a transient failure (a lost reply).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from typing import Any

import fsspec
import pytest

from trainctl_lightning.store import ObjectStore, layout

__all__ = ["LostReplies", "manifest_json", "plant", "plant_checkpoint"]


def plant(url: str, rel: str, data: bytes) -> None:
    """Write ``data`` at ``<url>/<rel>`` as it is (``rel`` may hold ``..``: nothing is checked)."""
    fs, root = fsspec.core.url_to_fs(url)
    path = f"{root.rstrip('/')}/{rel}"
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)
    fs.invalidate_cache()


def manifest_json(ckpt_id: str, files: list[dict[str, Any]], *, created_at: str = "2999-01-01T00:00:00Z", **extra: Any) -> bytes:
    """A checkpoint manifest with these ``files`` entries (``path``, ``size``, ``sha256``)."""
    data = {
        "format": "trainctl.checkpoint/1",
        "id": ckpt_id,
        "name": extra.pop("name", "evil.ckpt"),
        "epoch": 0,
        "global_step": 999,
        "created_at": created_at,
        "files": files,
        "package_version": "0",
        **extra,
    }
    return json.dumps(data).encode()


def plant_checkpoint(
    url: str, ckpt_id: str, path: str, content: bytes, *, created_at: str = "2999-01-01T00:00:00Z", **extra: Any
) -> None:
    """A complete-looking checkpoint whose one file entry is ``path`` (its data planted there too)."""
    entry = {"path": path, "size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    if not path.startswith("/") and ".." not in path and "\x00" not in path:  # never write outside while planting
        plant(url, layout.checkpoint_object(ckpt_id, path), content)
    plant(
        url,
        layout.checkpoint_object(ckpt_id, layout.CHECKPOINT_MANIFEST),
        manifest_json(ckpt_id, [entry], created_at=created_at, **extra),
    )


class LostReplies:
    """Chosen writes land in the real store, then their reply is lost (``ConnectionError``, once each).

    Installed under every :class:`ObjectStore` (``install``), below its retries and create-only
    checks, on every backend: the object is really written, as when a connection drops after the
    server committed the request.

    Attributes:
        lose: decides, from the object's backend path, whether this write's reply is lost.
        limit: how many replies are lost in all (the first ``limit`` writes ``lose`` picks).
        lost: paths whose reply was lost, in order (each path loses its reply at most once).
        landed: every path a write reached, in order (retries that found it there included).
    """

    def __init__(self, lose: Callable[[str], bool], limit: int = 1) -> None:
        self.lose = lose
        self.limit = limit
        self.lost: list[str] = []
        self.landed: list[str] = []
        self._lock = threading.Lock()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> LostReplies:
        real = ObjectStore._write_bytes

        def write_then_lose(store: ObjectStore, path: str, data: bytes, create_only: bool) -> None:
            real(store, path, data, create_only)
            with self._lock:
                self.landed.append(path)
                if path in self.lost or len(self.lost) >= self.limit or not self.lose(path):
                    return
                self.lost.append(path)
            raise ConnectionError(f"connection reset after writing {path} (test double: the reply is lost)")

        monkeypatch.setattr(ObjectStore, "_write_bytes", write_then_lose)
        return self
