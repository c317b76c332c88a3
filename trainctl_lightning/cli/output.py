"""Rendering for the CLI: rich tables for people, one JSON document for programs."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Any

from fsspec.callbacks import Callback
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from trainctl_lightning.humanize import printable

__all__ = ["Format", "emit_json", "shown", "stderr", "stdout", "transfer_progress"]


class Format(str, Enum):
    table = "table"
    json = "json"


stdout = Console()
stderr = Console(stderr=True)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def shown(value: object) -> str:
    """Store-supplied text (checkpoint and run names, hosts, errors...) ready for a rich table or line.

    Non-printable characters become ``\\x1b``-style escapes (no ANSI sequence reaches the
    terminal) and rich markup is escaped (``[/bold]`` prints as itself instead of failing).
    """
    return escape(printable(value))


class _RichCallback(Callback):
    """fsspec progress callback that drives one rich progress task."""

    def __init__(self, progress: Progress, task: Any) -> None:
        super().__init__()
        self.progress = progress
        self.task = task

    def set_size(self, size: int) -> None:
        pass  # the task's total is known up front from the manifest

    def relative_update(self, inc: int = 1) -> None:
        self.progress.advance(self.task, inc)

    def absolute_update(self, value: int) -> None:
        self.progress.update(self.task, completed=value)


@contextmanager
def transfer_progress(description: str, total: int, fmt: Format) -> Iterator[Callback | None]:
    """A byte progress bar on stderr for long transfers (only on a terminal, never in JSON mode)."""
    if fmt is Format.json or not stderr.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=total or None)
        yield _RichCallback(progress, task)
