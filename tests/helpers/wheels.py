"""Tiny pure-Python wheels built on the spot, so installers can be tested with no index reachable."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(dist_dir: Path, name: str, version: str, modules: dict[str, str]) -> Path:
    """Write ``<name>-<version>-py3-none-any.whl`` holding ``modules`` (file name -> source) into ``dist_dir``.

    Example::

        build_wheel(tmp_path / "wheels", "tiny-dep", "1.0", {"tiny_dep.py": "VALUE = 1\\n"})
    """
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = {
        **{path: text.encode() for path, text in modules.items()},
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: trainctl-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items()) + f"{info}/RECORD,,\n"
    dist_dir.mkdir(parents=True, exist_ok=True)
    wheel = dist_dir / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
        zf.writestr(f"{info}/RECORD", record)
    return wheel
