"""Jobs a test controls: a script that prints, waits for the test to open a gate, then prints more."""

from __future__ import annotations

import textwrap
from pathlib import Path

from trainctl_lightning.providers import get_provider

#: Run as ``gated.py GATE_PATH``: prints a line, waits until GATE_PATH exists, prints another.
#: It gives up (exit code 3) after two minutes, so a test that fails before opening the gate
#: leaves nothing running for long.
GATED_SCRIPT = textwrap.dedent(
    """
    import sys
    import time
    from pathlib import Path

    print("before the gate", flush=True)
    gate = Path(sys.argv[1])
    deadline = time.monotonic() + 120
    while not gate.exists():
        if time.monotonic() > deadline:
            print("the gate never opened", flush=True)
            sys.exit(3)
        time.sleep(0.05)
    print("after the gate", flush=True)
    """
)


class Gate:
    """A file the gated job waits for; ``open()`` lets it finish."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def open(self) -> None:
        self.path.touch()

    def __str__(self) -> str:
        return str(self.path)


def write_gated_script(project: Path, name: str = "gated.py") -> Path:
    project.mkdir(parents=True, exist_ok=True)
    script = project / name
    script.write_text(GATED_SCRIPT)
    return script


def release_local_instances() -> None:
    """Terminate every local instance still alive (teardown after a failed test; the test asserts its own cleanup)."""
    provider = get_provider("local")
    for instance in provider.list():
        provider.terminate(instance.id)
