"""The agent builds an environment with a real uv and installs a requirement the interpreter lacks.

The requirement is a tiny wheel built by the test and offered through a find-links folder with
uv offline, so the test needs no index. uv is a dev dependency (``pip install uv``); without it
the test is skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.agent import make_job, run
from tests.helpers.wheels import build_wheel
from trainctl_lightning.jobs.spec import EnvMode, JobPhase

DEP = "trainctl-tiny-dep"

TRAIN_PY = """\
import sys

import fsspec
import trainctl_tiny_dep
import trainctl_lightning

print("PREFIX", sys.prefix)
print("TINY", trainctl_tiny_dep.VALUE, trainctl_tiny_dep.__file__)
"""


@pytest.fixture
def real_uv(tmp_path: Path) -> dict[str, str]:
    """The agent's environment with the uv from the ``uv`` package first on PATH, and uv's cache in the test's temp dir."""
    uv = pytest.importorskip("uv", reason="uv is not installed: pip install uv (the dev extra has it)")
    bin_dir = tmp_path / "uv-bin"
    bin_dir.mkdir()
    (bin_dir / "uv").symlink_to(uv.find_uv_bin())
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "UV_CACHE_DIR": str(tmp_path / "uv-cache")}


def test_uv_installs_a_missing_requirement_and_the_job_imports_it(
    file_store: str, workdir: Path, tmp_path: Path, real_uv: dict[str, str]
) -> None:
    wheels = tmp_path / "wheels"
    build_wheel(wheels, DEP, "1.0", {"trainctl_tiny_dep.py": "VALUE = 'tiny 1.0'\n"})
    jobs = make_job(
        file_store,
        workdir,
        files={"requirements.txt": f"fsspec\n{DEP}==1.0\n", "train.py": TRAIN_PY},
        script="train.py",
        env_mode=EnvMode.AUTO,
        env={"UV_FIND_LINKS": str(wheels), "UV_OFFLINE": "1"},
    )
    done = run(jobs, workdir, env=real_uv, timeout=180)
    logs = jobs.read_logs().decode(errors="replace")
    assert done.returncode == 0, logs + done.stderr

    state = jobs.read_state()
    assert state.phase is JobPhase.SUCCEEDED and state.env_mode == "isolated (uv)"
    env_dir = Path(state.python).parent.parent
    assert env_dir.parent == workdir / "envs"
    assert f"1 of 2 requirements missing: {DEP}==1.0 (not installed)" in logs
    assert f"uv: installing {DEP}==1.0" in logs
    # the job ran in the new environment and imported the package from it
    assert f"PREFIX {env_dir}" in logs
    [site_packages] = env_dir.glob("lib/python*/site-packages")
    assert f"TINY tiny 1.0 {site_packages}/trainctl_tiny_dep.py" in logs
    # only what the base lacked was installed: fsspec and trainctl_lightning come from the base
    assert not list(site_packages.glob("fsspec*"))
