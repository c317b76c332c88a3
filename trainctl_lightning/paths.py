"""Where trainctl keeps things on this machine, and how: private to the user.

Everything trainctl creates under :func:`trainctl_home` (local-provider instances, the default
store, agent work folders) and in a local (``file://``) store is readable by its owner only:
folders ``0700``, files ``0600``. Folders that already exist are left as the user made them.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["HOME_ENV", "PRIVATE_DIR_MODE", "PRIVATE_FILE_MODE", "default_store_url", "make_private_dir", "trainctl_home"]

HOME_ENV = "TRAINCTL_HOME"
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def trainctl_home() -> Path:
    """``$TRAINCTL_HOME``, default ``~/.trainctl``: local-provider instances and the default store."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".trainctl").expanduser().resolve()


def default_store_url() -> str:
    """The store used when none is configured: a directory under :func:`trainctl_home`."""
    return f"file://{trainctl_home() / 'store'}"


def make_private_dir(path: str | os.PathLike[str]) -> Path:
    """``mkdir -p`` where every folder created is ``0700`` (``os.makedirs`` gives the parents 0777 - umask).

    Folders that exist already are not changed.
    """
    path = Path(path)
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:
            continue  # made by someone else meanwhile: theirs, left as it is
        os.chmod(folder, PRIVATE_DIR_MODE)  # mkdir's mode is masked by the umask; 0700 is what we want
    return path
