"""What a test left running: trainctl agents and the jobs they started, under this test's TRAINCTL_HOME."""

from __future__ import annotations

import os
import time
from pathlib import Path

from trainctl_lightning.providers import get_provider


def live_agent_pids() -> list[int]:
    """Live (not zombie) agents and jobs started for this test: an agent's command line names the
    agent module, a job's environment has the TRAINCTL_RUN_URL its agent set; both inherited this
    test's TRAINCTL_HOME. The test process itself and the moto server have neither mark."""
    home = f"TRAINCTL_HOME={os.environ['TRAINCTL_HOME']}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z" or home not in environ:
            continue
        if b"trainctl_lightning.agent" in cmdline or b"TRAINCTL_RUN_URL=" in environ:
            pids.append(int(entry.name))
    return pids


def assert_nothing_running(wait_s: float = 15) -> None:
    """No agent or job of this test is alive (after up to ``wait_s``), and no local instance is left."""
    deadline = time.monotonic() + wait_s
    while live_agent_pids() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live_agent_pids() == []
    assert [i.id for i in get_provider("local").list()] == []


def end_local_instances_then_assert_nothing_running() -> None:
    """What a local-provider test leaves: terminate every instance still up (a failed test may
    leave one), then require that no agent or job of this test is alive and no instance is left."""
    provider = get_provider("local")
    for instance in provider.list():
        provider.terminate(instance.id)
    assert_nothing_running()
