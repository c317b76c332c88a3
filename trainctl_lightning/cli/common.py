"""Pieces every CLI command shares: the --output option and turning our errors into one line."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from trainctl_lightning.cli.output import Format, emit_json, shown, stderr
from trainctl_lightning.errors import TrainctlError

__all__ = ["F", "OutputOption", "handle_errors", "resolve_run"]

F = TypeVar("F", bound=Callable[..., Any])

OutputOption = typer.Option(Format.table, "--output", help="table for people, json for programs.", case_sensitive=False)


def resolve_run(value: str | None) -> str | None:
    """Argument callback: a run id becomes its URL in the configured store; URLs and paths pass."""
    if value is None:
        return None
    from trainctl_lightning.launch import resolve_run_url

    try:
        return resolve_run_url(value)
    except TrainctlError as exc:
        raise typer.BadParameter(str(exc)) from None


def handle_errors(fn: F) -> F:
    """Print a TrainctlError as one line (and as JSON in --output json) and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TrainctlError as exc:
            if getattr(kwargs.get("output"), "value", kwargs.get("output")) == Format.json.value:
                emit_json({"error": str(exc), "type": type(exc).__name__})
            stderr.print(f"[red]error:[/red] {shown(exc)}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]
