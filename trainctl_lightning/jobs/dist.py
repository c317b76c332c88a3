"""Getting this very trainctl-lightning onto a fresh cloud instance.

An instance that boots from a stock image installs trainctl-lightning before it can run the
agent. A released version comes from PyPI (``trainctl-lightning==<version>``), but a launcher
running from a source checkout (an editable install, a fork, a development version) must ship
what it runs: the agent on the instance reads the job spec this launcher wrote. So the launcher
builds a wheel of its own source tree once per content, puts it in the store under
``_dist/<content hash>/<wheel file name>``, and the instance installs that.

Internal: not part of the public API; it may change without notice.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

from trainctl_lightning.errors import StoreError
from trainctl_lightning.store import ObjectStore, layout

__all__ = ["ship_trainctl", "source_digest", "source_tree"]

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


def ship_trainctl(store_url: str) -> str | None:
    """URL of a wheel of this trainctl-lightning in the store, built and uploaded if needed.

    None when running from an installed release: the instance installs it from PyPI.

    Raises:
        StoreError: the wheel could not be built or uploaded (nothing was created).
    """
    root = source_tree()
    if root is None:
        return None
    key = source_digest(root)[:16]
    store = ObjectStore(store_url)
    folder = layout.dist_dir(key)
    existing = sorted(store.list_sizes(folder, "*.whl"))
    if existing:
        return store.url_of(folder, existing[0])
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
        wheel = wheels[0]
        store.write(f"{folder}/{wheel.name}", wheel.read_bytes())
        return store.url_of(folder, wheel.name)
