"""``python -m trainctl_lightning.agent run --run-url URL [--workdir DIR] [--daemon] [--log-file PATH]``.

``... supervise --run-url URL --workdir DIR --instance ID [--daemon] [--log-file PATH]``: the local
provider's supervisor of a managed run (:mod:`.supervisor`).

What every instance runs for a job. Start-up cost counts (it is part of launch latency), so
this imports only the standard library until it knows what to do, and never Lightning.

``--daemon`` detaches before any thread starts: the process that was started prints the
agent's pid and exits at once (so whoever started it can reap it and leave no zombie), and the
agent goes on in its own session, outliving the command that launched it.

Internal: not part of the public API; it may change without notice.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

__all__ = ["daemonize", "main"]


def _default_workdir() -> Path:
    from trainctl_lightning.paths import trainctl_home

    return trainctl_home() / "agent"


def daemonize(log_file: Path) -> None:
    """Fork; the parent prints the child's pid and exits 0, the child returns detached.

    The child has its own session, stdin from /dev/null and stdout/stderr appended to ``log_file``.
    """
    log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid > 0:
        os.write(1, f"{pid}\n".encode())
        os._exit(0)
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    out = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(out, 1)
    os.dup2(out, 2)
    for fd in (null, out):
        if fd > 2:
            os.close(fd)
    os.chdir("/")  # never keep a directory (or a mount) busy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainctl_lightning.agent", description="The trainctl agent.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the job stored at --run-url and report on it there")
    run.add_argument("--run-url", required=True, help="URL of the run in the store (holds job.json)")
    run.add_argument("--workdir", type=Path, help="scratch space for code, environments and logs")
    run.add_argument("--daemon", action="store_true", help="detach; print the agent's pid and return at once")
    run.add_argument("--log-file", type=Path, help="where a --daemon agent writes its own log")
    sup = commands.add_parser("supervise", help="run a managed run's attempts on a local instance (local provider)")
    sup.add_argument("--run-url", required=True, help="URL of the run in the store (holds job.json)")
    sup.add_argument("--workdir", type=Path, help="the instance's working directory")
    sup.add_argument("--instance", required=True, help="the local instance's id")
    sup.add_argument("--daemon", action="store_true", help="detach; print the supervisor's pid and return at once")
    sup.add_argument("--log-file", type=Path, help="where a --daemon supervisor writes its own log")
    args = parser.parse_args(argv)

    from trainctl_lightning.agent.jobproc import use_agent_umask

    use_agent_umask()
    workdir = (args.workdir or _default_workdir()).resolve()
    if args.daemon:
        if args.log_file is None:
            parser.error("--daemon needs --log-file (a detached agent has no terminal to write to)")
        daemonize(args.log_file.resolve())
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s trainctl-agent[%(process)d] %(levelname)s %(message)s")
    logging.getLogger("trainctl_lightning").setLevel(logging.INFO)

    if args.command == "supervise":
        from trainctl_lightning.agent.supervisor import run_supervisor

        return run_supervisor(args.run_url, workdir, args.instance)

    from trainctl_lightning.agent.runner import run_agent

    return run_agent(args.run_url, workdir)


if __name__ == "__main__":
    sys.exit(main())
