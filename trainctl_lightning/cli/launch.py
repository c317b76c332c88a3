"""``trainctl launch``, ``status`` and ``logs``: run a script through the agent and follow it."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional, TextIO

import typer
from rich.markup import escape
from rich.table import Table

from trainctl_lightning import launch as api
from trainctl_lightning.cli.common import OutputOption, handle_errors
from trainctl_lightning.cli.output import Format, emit_json, shown, stderr, stdout
from trainctl_lightning.errors import IntegrityError
from trainctl_lightning.humanize import human_size
from trainctl_lightning.jobs.spec import JobPhase, JobState

__all__ = ["EXIT_CTRL_C", "launch", "logs", "status"]

EXIT_CTRL_C = 130
log = logging.getLogger(__name__)


def _seconds(value: object) -> str:
    """A timing from the store: ``12.3s``, or the raw value when it is not a number."""
    return f"{value:.1f}s" if isinstance(value, (int, float)) else repr(value)


def _raw_sink(stream: TextIO) -> api.OutputSink:
    def write(chunk: bytes) -> None:
        stream.buffer.write(chunk)
        stream.flush()

    return write


@handle_errors
def launch(
    script: Path = typer.Argument(..., help="The training script, inside the project directory that is synced."),
    args: Optional[list[str]] = typer.Argument(None, help="Arguments for the script (put them after --)."),
    provider: Optional[str] = typer.Option(None, "--provider", "-p", help="local (default), aws, ..."),
    store: Optional[str] = typer.Option(None, "--store", help="Store URL for runs (default: config, else ~/.trainctl/store)."),
    instance_type: Optional[str] = typer.Option(None, "--instance-type", "-t", help="Instance type, e.g. g5.xlarge."),
    spot: Optional[bool] = typer.Option(None, "--spot/--on-demand", help="Spot capacity (cheaper, can be reclaimed)."),
    region: Optional[str] = typer.Option(None, "--region", help="Cloud region."),
    instance: Optional[str] = typer.Option(None, "--instance", help="Run on this existing instance (kept afterwards)."),
    keep_alive: bool = typer.Option(False, "--keep-alive", help="Keep the instance this launch creates after the job."),
    detach: bool = typer.Option(False, "--detach", "-d", help="Return once the job has started."),
    env: Optional[list[str]] = typer.Option(
        None, "--env", "-e", help="NAME=VALUE for the job, or NAME to forward it unstored (repeatable)."
    ),
    env_mode: Optional[str] = typer.Option(
        None, "--env-mode", help="auto (reuse this Python if it has what the project needs) | reuse | isolated."
    ),
    max_hours: Optional[float] = typer.Option(None, "--max-hours", help="Stop the job (and the instance) after this many hours."),
    project_dir: Optional[Path] = typer.Option(None, "--project-dir", help="Directory to sync (default: the current one)."),
    include: Optional[list[str]] = typer.Option(None, "--include", help="Sync this path even if ignored (repeatable)."),
    code_max_mb: Optional[float] = typer.Option(
        None, "--code-max-mb", help="Refuse to sync a project larger than this (default 100 MB)."
    ),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Name the run (default: <script>-<time>-<hex>)."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Config profile (trainctl.toml / [tool.trainctl])."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be created and run; create nothing."),
    recover: bool = typer.Option(
        False, "--recover", help="A managed run: replace a reclaimed or lost instance and resume from the newest checkpoint."
    ),
    max_restarts: Optional[int] = typer.Option(None, "--max-restarts", help="With --recover: replacements at most (default 3)."),
    nodes: int = typer.Option(
        1, "--nodes", "-n", help="Run across N instances under torchrun (the script uses Trainer(num_nodes=N))."
    ),
    nproc_per_node: Optional[int] = typer.Option(
        None, "--nproc-per-node", help="With --nodes: processes per node, the Trainer's devices (default: one per GPU, else 1)."
    ),
    output: Format = OutputOption,
) -> None:
    """Run SCRIPT on an instance through the trainctl agent and stream its output.

    Creates an instance (or uses --instance), uploads the project (only files that changed), starts the job and follows it. Exits with the job's exit code. Ctrl-C asks whether to detach (the job goes on) or cancel (the job is stopped and the instance this launch created is terminated).

    Example: trainctl launch train.py -- --max-epochs 3

    Multi-node: trainctl launch train.py --nodes 2 --nproc-per-node 4 (docs/multi-node.md).
    """
    json_mode = output is Format.json

    def event(msg: str) -> None:
        stderr.print(f"[dim]trainctl:[/dim] {escape(msg)}", highlight=False, soft_wrap=True)

    request = api.LaunchRequest(
        script=str(script),
        args=list(args or []),
        run_id=run_id,
        project_dir=project_dir,
        include=list(include or []),
        env=list(env or []),
        instance=instance,
        keep_alive=keep_alive,
        detach=True,  # followed here, so that Ctrl-C can offer to detach
        follow=not detach,
        recover=recover,
        max_restarts=max_restarts,
        nodes=nodes,
        nproc_per_node=nproc_per_node,
    )
    settings = api.resolve_settings(
        request.project_root(),
        profile,
        provider=provider,
        store=store,
        instance_type=instance_type,
        spot=spot,
        region=region,
        env_mode=env_mode,
        max_hours=max_hours,
        code_max_mb=code_max_mb,
    )
    plan = api.plan_launch(request, settings)
    if dry_run:
        if json_mode:
            emit_json(plan.to_dict())
        else:
            stdout.print(plan.describe(), highlight=False)
        return
    run = api.execute_plan(plan, on_event=event)
    if detach:
        _emit_run(run, output)
        if not json_mode:
            stderr.print(f"follow it with: trainctl logs {run.run_id} -f", highlight=False)
        return
    sink = _raw_sink(sys.stderr if json_mode else sys.stdout)
    while True:
        try:
            state = run.wait(on_output=sink)
            break
        except KeyboardInterrupt:
            if _ask_detach():
                stderr.print(f"detached; the job goes on. Follow it with: trainctl logs {run.run_id} -f", highlight=False)
                _emit_run(run, output)
                raise typer.Exit(0) from None
            stderr.print(f"cancelling {run.run_id} (the script gets SIGTERM, so Lightning can save)...", highlight=False)
            try:
                run.cancel("cancelled by the user (Ctrl-C)", wait_s=90)
            except KeyboardInterrupt:
                pass
            _emit_run(run, output)
            raise typer.Exit(EXIT_CTRL_C) from None
    _emit_run(run, output, state)
    if state.phase is not JobPhase.SUCCEEDED:
        if not json_mode:
            stderr.print(
                f"[red]run {shown(run.run_id)} {state.state()}[/red]" + (f": {shown(state.error)}" if state.error else ""),
                highlight=False,
            )
        raise typer.Exit(state.exit_code if state.exit_code not in (None, 0) else 1)


def _ask_detach() -> bool:
    """Ctrl-C while following: True to detach, False to cancel (the default without a terminal)."""
    if not sys.stdin.isatty():
        return False
    try:
        answer = typer.prompt("\n[d]etach (the job goes on) or [c]ancel (stop it, terminate the instance)?", default="c")
    except (KeyboardInterrupt, EOFError, typer.Abort):
        return False
    return answer.strip().lower().startswith("d")


def _emit_run(run: api.Run, output: Format, state: JobState | None = None) -> None:
    data = run.to_dict()
    if state is not None:
        data.update(state=state.state(), exit_code=state.exit_code, error=state.error)
    if output is Format.json:
        emit_json(data)
    elif run.code is not None and state is not None:
        stderr.print(
            f"[dim]trainctl:[/dim] run {run.run_id} {data['state']} (exit code {data['exit_code']}); "
            f"store: {run.run_url}; code uploaded: {human_size(run.code.bytes_uploaded)}",
            highlight=False,
            soft_wrap=True,
        )


@handle_errors
def status(
    run: str = typer.Argument(..., help="Run id (in the configured store) or run URL."),
    store: Optional[str] = typer.Option(None, "--store", help="Store URL to look the run id up in."),
    output: Format = OutputOption,
) -> None:
    """Show a run's job state: phase, exit code, timings, instance, and its training status if it reports one."""
    r = api.get_run(run, store=store)
    state = r.state()
    from trainctl_lightning.metrics import read

    try:
        training = read.read_status(r.run_url)
    except IntegrityError as exc:  # the job's own state still shows; the damaged object is named
        log.warning("%s", exc)
        training = None
    node_states = r.node_states() if r.nodes > 1 else []
    if output is Format.json:
        emit_json(
            {
                **r.to_dict(),
                "job": state.to_dict() if state else None,
                "nodes": [
                    {"node": k, "instance_id": r.node_instances[k], "job": s.to_dict() if s else None}
                    for k, s in enumerate(node_states)
                ],
                "training": training.to_dict() if training else None,
            }
        )
        return
    table = Table(show_header=False, title=f"run {shown(r.run_id)}", title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("state", state.state() if state else "unknown")
    table.add_row("url", shown(r.run_url))
    table.add_row("instance", shown(f"{r.instance_id or '-'} ({r.provider})"))
    if state is not None:
        if state.exit_code is not None:
            table.add_row("exit code", str(state.exit_code))
        if state.error:
            table.add_row("error", shown(state.error))
        if state.timings:
            table.add_row("timings", shown(", ".join(f"{k} {_seconds(v)}" for k, v in state.timings.items())))
        if state.env_mode:
            table.add_row("environment", shown(state.env_mode))
        table.add_row("updated", shown(state.updated_at))
        for a in state.attempts:
            steps = f", {a.steps} steps" if a.steps is not None else ""
            start = f"from {a.resumed_from}" if a.resumed_from else "from scratch"
            end = f"{a.ended} {a.ended_at}" if a.ended else "running"
            table.add_row(
                f"attempt {a.number}",
                shown(f"{a.instance_id or '-'} {a.started_at or '?'} -> {end}{steps}, {start}"),
            )
    for k, node_state in enumerate(node_states):
        table.add_row(
            f"node {k}", shown(_node_line(r.node_instances[k], node_state, failed=state is not None and state.failed_node == k))
        )
    if training is not None:
        step = f"step {training.global_step}" + (f"/{training.max_steps}" if training.max_steps else "")
        table.add_row("training", f"{training.state()} {step}, epoch {training.epoch}")
        if training.metrics:
            table.add_row("metrics", shown(", ".join(f"{k}={v:.4g}" for k, v in list(training.metrics.items())[:6])))
    stdout.print(table)
    if state is not None and state.error_tail and state.phase is not JobPhase.SUCCEEDED:
        stdout.print("[bold]last output:[/bold]")
        stdout.print(state.error_tail.rstrip(), highlight=False, markup=False)


def _node_line(instance_id: str, state: JobState | None, failed: bool) -> str:
    """One node of a multi-node run in ``trainctl status``: instance, host, phase, exit, why."""
    if state is None:
        return f"{instance_id}: no state yet"
    parts = [f"{instance_id} on {state.host or '?'}: {state.state()}"]
    if state.exit_code is not None:
        parts.append(f"exit code {state.exit_code}")
    if state.error:
        parts.append(state.error)
    return ", ".join(parts) + (" (failed first)" if failed else "")


@handle_errors
def logs(
    run: str = typer.Argument(..., help="Run id (in the configured store) or run URL."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new output until the job ends."),
    store: Optional[str] = typer.Option(None, "--store", help="Store URL to look the run id up in."),
    node: Optional[int] = typer.Option(
        None, "--node", help="A multi-node run: only node K's output (default: every node's, each line prefixed [node K])."
    ),
    output: Format = OutputOption,
) -> None:
    """Print a run's output (stdout and stderr of the script, as the agent shipped it)."""
    r = api.get_run(run, store=store)
    if output is Format.json:
        text = r.logs(node)  # checks --node before waiting
        if follow:
            r.wait()
            text = r.logs(node)
        state = r.state()
        emit_json({"run_id": r.run_id, "state": state.state() if state else "unknown", "node": node, "logs": text})
        return
    if not follow:
        sys.stdout.write(r.logs(node))
        sys.stdout.flush()
        return
    sink = _raw_sink(sys.stdout)
    try:
        for chunk in r.follow(node=node):
            sink(chunk)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_CTRL_C) from None
    state = r.state()
    if state is not None and state.phase.is_terminal():
        stderr.print(
            f"[dim]trainctl:[/dim] run {shown(r.run_id)} {state.state()}"
            + (f" (exit code {state.exit_code})" if state.exit_code is not None else ""),
            highlight=False,
        )
