"""Getting this very trainctl-lightning onto a fresh cloud instance.

An instance that boots from a stock image installs trainctl-lightning before it can run the
agent. A released version comes from PyPI (``trainctl-lightning==<version>``), but a launcher
running from a source checkout (an editable install, a fork, a development version) must ship
what it runs: the agent on the instance reads the job spec this launcher wrote. So the launcher
builds a wheel of its own source tree once per content (kept in ``$TRAINCTL_HOME/dist``), puts it
in the store under ``_dist/<the wheel's sha256>/<wheel file name>``, and the instance installs
that only if its SHA-256 is the one the launcher put in the instance's user data.

Internal: not part of the public API; it may change without notice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from trainctl_lightning.errors import IntegrityError, StoreError
from trainctl_lightning.paths import trainctl_home
from trainctl_lightning.store import ObjectStore, layout

__all__ = ["ShippedWheel", "ship_trainctl", "source_digest", "source_tree"]

log = logging.getLogger(__name__)

_PACKAGE = Path(__file__).resolve().parents[1]


def source_tree() -> Path | None:
    """The source checkout this package runs from, or None for an installed release."""
    root = _PACKAGE.parent
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "trainctl-lightning"' in pyproject.read_text(errors="replace"):
        return root
    return None


def source_digest(root: Path) -> str:
    """SHA-256 over what goes into the wheel: pyproject.toml and every file of the package."""
    digest = hashlib.sha256()
    files = [root / "pyproject.toml", root / "README.md"] + sorted(
        p for p in (root / _PACKAGE.name).rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    for path in files:
        if path.is_file():
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


@dataclass(frozen=True)
class ShippedWheel:
    """A wheel of this trainctl in the store, and the SHA-256 the instance must find before installing it."""

    url: str
    """``<store>/_dist/<sha256>/<wheel file name>`` (pip reads the version from the file name)."""
    sha256: str
    """Of the wheel as built here: the boot script refuses any other bytes (``install_sha256``)."""


def ship_trainctl(store_url: str) -> ShippedWheel | None:
    """A wheel of this trainctl-lightning in the store, built and uploaded if needed.

    The wheel is built once per source content into ``$TRAINCTL_HOME/dist`` (private to the
    user), and its SHA-256 comes from that local copy, never from the store: anyone who can write
    the store could replace the wheel an instance installs as root, so the launcher records the
    hash it trusts and the boot script checks it. The store object is named by that hash and is
    rewritten when its content differs (a replaced or torn copy).

    None when running from an installed release: the instance installs it from PyPI.

    Raises:
        StoreError: the wheel could not be built or uploaded (nothing was created).
    """
    root = source_tree()
    if root is None:
        return None
    wheel = _local_wheel(root, source_digest(root)[:16])
    sha256 = hashlib.sha256(wheel.read_bytes()).hexdigest()
    store = ObjectStore(store_url)
    rel = f"{layout.dist_dir(sha256)}/{wheel.name}"
    try:
        stored: str | None = store.digest(rel)[0]
    except IntegrityError:  # not there yet
        stored = None
    if stored != sha256:
        if stored is not None:
            log.warning("trainctl: %s differs from the wheel built here: uploading it again", store.url_of(rel))
        store.write(rel, wheel.read_bytes())
    return ShippedWheel(url=store.url_of(rel), sha256=sha256)


def _local_wheel(root: Path, key: str) -> Path:
    """The wheel of ``root`` for source digest ``key``, from the local cache or built into it."""
    cache = trainctl_home() / "dist" / key
    cached = sorted(cache.glob("trainctl_lightning-*.whl")) if cache.is_dir() else []
    if cached:
        return cached[0]
    with tempfile.TemporaryDirectory(prefix="trainctl-wheel-") as out:
        log.info("trainctl: building a wheel of %s for the instance", root)
        built = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, str(root)],
            capture_output=True,
            text=True,
        )
        wheels = sorted(Path(out).glob("trainctl_lightning-*.whl"))
        if built.returncode != 0 or not wheels:
            last = (built.stderr.strip().splitlines() or ["no wheel was written"])[-1]
            raise StoreError(
                f"could not build a wheel of {root} to install on the instance ({last}); "
                "install a released trainctl-lightning, or set options.install in trainctl.toml"
            )
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        for folder in (cache, cache.parent):
            folder.chmod(0o700)  # the launcher trusts this copy: only the user may change it
        staged = cache / f".{wheels[0].name}.tmp"
        shutil.copyfile(wheels[0], staged)
        os.replace(staged, cache / wheels[0].name)  # whole or absent: a torn copy is never used
        return cache / wheels[0].name
