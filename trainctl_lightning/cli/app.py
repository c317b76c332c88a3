"""``trainctl``: the command line over trainctl-lightning's Python API.

Each command parses its arguments, calls the API, and renders the result: a table for people,
or ``--output json`` for programs. Errors of ours print one line (``error: ...``) and exit 1;
in JSON mode they print ``{"error": ..., "type": ...}`` on stdout as well.
"""

from __future__ import annotations

import logging
import sys

import typer

from trainctl_lightning import __version__
from trainctl_lightning.cli import aws as aws_cli
from trainctl_lightning.cli import ckpt, instances, runs
from trainctl_lightning.cli import config as config_cli
from trainctl_lightning.cli import gc as gc_cli
from trainctl_lightning.cli import launch as launch_cli
from trainctl_lightning.cli import metrics as metrics_cli

__all__ = ["app", "main"]

app = typer.Typer(
    name="trainctl",
    help="Train PyTorch Lightning models on remote GPUs; never lose a checkpoint.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(ckpt.app, name="ckpt")
app.add_typer(runs.app, name="runs")
app.add_typer(config_cli.app, name="config")
app.command("monitor")(metrics_cli.monitor)
app.command("metrics")(metrics_cli.metrics)
app.command("plot")(metrics_cli.plot)
app.command("launch")(launch_cli.launch)
app.command("status")(launch_cli.status)
app.command("logs")(launch_cli.logs)
app.command("create")(instances.create)
app.command("ls")(instances.ls)
app.command("stop")(instances.stop)
app.command("terminate")(instances.terminate)
app.add_typer(aws_cli.app, name="aws")
app.command("gc")(gc_cli.gc)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"trainctl-lightning {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what happens (to stderr)."),
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr, format="%(message)s")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
