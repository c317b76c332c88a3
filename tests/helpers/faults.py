"""Faults injected where the process meets the OS: a disk that fills up, fails or refuses writes
under one folder.

A real full disk needs a small filesystem of its own (a tmpfs or a loop device), and mounting
one needs root, which the test suite must not need; a read-only folder does not stop root, which
some CI containers run as. So :class:`FailingDisk` makes the files opened for writing under one
folder fail the way the kernel would: ``open`` raising ``EACCES``, or ``write`` raising
``ENOSPC`` / ``EIO`` part-way through, after some bytes really reached the file. Everything else
the process writes is untouched.
"""

from __future__ import annotations

import builtins
import errno
import os
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

__all__ = ["FailingDisk", "HeldDisk"]


class _WrappedFile:
    """A real file, its ``write`` replaced by the subclass; everything else goes to the file."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __enter__(self) -> _WrappedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._real.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class _FailingFile(_WrappedFile):
    """A real file whose writes fail once ``budget`` bytes have gone in."""

    def __init__(self, real: Any, error: int, budget: int, path: str) -> None:
        super().__init__(real)
        self._error = error
        self._budget = budget
        self._path = path

    def write(self, data: Any) -> int:
        size = len(memoryview(data).cast("B"))
        if size > self._budget:
            if self._budget:
                self._real.write(memoryview(data).cast("B")[: self._budget])
                self._budget = 0
            raise OSError(self._error, os.strerror(self._error), self._path)
        self._budget -= size
        return int(self._real.write(data))


_D = TypeVar("_D", bound="_DiskUnder")


class _DiskUnder:
    """While active (``with``), files opened for writing below ``folder`` go through :meth:`_open_here`."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = os.path.abspath(folder)
        self._real_open: Any = None

    def _open_here(self, path: str, open_real: Any) -> Any:
        """Open ``path`` (below the folder, for writing): ``open_real()`` opens the real file."""
        raise NotImplementedError

    def _open(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        real_open = self._real_open
        if not isinstance(file, (str, bytes, os.PathLike)) or not any(c in mode for c in "wax+"):
            return real_open(file, mode, *args, **kwargs)
        path = os.path.abspath(os.fsdecode(file))
        if not path.startswith(self.folder + os.sep):
            return real_open(file, mode, *args, **kwargs)
        return self._open_here(path, lambda: real_open(file, mode, *args, **kwargs))

    def __enter__(self: _D) -> _D:
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        self._real_open = builtins.open
        builtins.open = self._open
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        builtins.open = self._real_open


class FailingDisk(_DiskUnder):
    """While active, the ``nth`` file opened for writing under ``folder`` and every later one fail.

    Args:
        folder: the "disk": only files below it are affected.
        error: the errno to raise (``errno.ENOSPC``, ``errno.EIO``, ``errno.EACCES``...).
        nth: the first file (counting from 1) that fails; the earlier ones are written normally.
        at: ``"write"``: writes fail after ``after_bytes`` bytes (a disk that fills up, or an I/O
            error mid-file); ``"open"``: the open itself fails (permission denied).
        after_bytes: bytes a failing file accepts before its writes fail.

    Attributes:
        opened: every path opened for writing under ``folder``, in order.
        failed: the ones that failed.

    Example::

        with FailingDisk(tmp_path / "ckpts", errno.ENOSPC, nth=2):
            trainer.fit(model)
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        error: int = errno.ENOSPC,
        *,
        nth: int = 1,
        at: str = "write",
        after_bytes: int = 4096,
    ) -> None:
        if at not in ("write", "open"):
            raise ValueError(f"FailingDisk(at={at!r}): 'write' or 'open'")
        super().__init__(folder)
        self.error = error
        self.nth = nth
        self.at = at
        self.after_bytes = after_bytes
        self.opened: list[str] = []
        self.failed: list[str] = []
        self._lock = threading.Lock()

    def _open_here(self, path: str, open_real: Any) -> Any:
        with self._lock:
            self.opened.append(path)
            failing = len(self.opened) >= self.nth
            if failing:
                self.failed.append(path)
        if failing and self.at == "open":
            raise OSError(self.error, os.strerror(self.error), path)
        handle = open_real()
        return _FailingFile(handle, self.error, self.after_bytes, path) if failing else handle


class _HeldFile(_WrappedFile):
    """A real file whose writes wait for ``go`` once ``budget`` bytes have gone in."""

    def __init__(self, real: Any, budget: int, go: threading.Event, held: threading.Event) -> None:
        super().__init__(real)
        self._budget = budget
        self._go = go
        self._held = held

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if len(view) > self._budget and not self._go.is_set():
            written = int(self._real.write(view[: self._budget])) if self._budget else 0
            self._budget = 0
            self._held.set()
            self._go.wait(60)
            return written + int(self._real.write(view[written:]))
        self._budget -= min(self._budget, len(view))
        return int(self._real.write(data))


class HeldDisk(_DiskUnder):
    """While active, files opened for writing under ``folder`` stop accepting bytes after
    ``after_bytes`` until :meth:`release` (a disk that stalls: a slow network volume, a hung NFS).

    Attributes:
        held: set once a write is waiting.
    """

    def __init__(self, folder: str | os.PathLike[str], after_bytes: int) -> None:
        super().__init__(folder)
        self.after_bytes = after_bytes
        self.held = threading.Event()
        self._go = threading.Event()

    def release(self) -> None:
        self._go.set()

    def _open_here(self, path: str, open_real: Any) -> Any:
        return _HeldFile(open_real(), self.after_bytes, self._go, self.held)

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        super().__exit__(kind, value, tb)
        self.release()
