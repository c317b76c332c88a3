#!/usr/bin/env python
"""How much does ``trainctl launch`` add before a script starts, and does a relaunch upload code?

A small project (a Lightning training script plus a few modules and a data file, like a real
one) is run three ways, each as a fresh process, interleaved over ``--repeats`` rounds:

``direct``
    ``python train.py``: the reference.
``launch``
    ``trainctl launch train.py`` on the local provider with a ``file://`` store: resolve
    settings, create an instance, sync the code, write the job, start the agent as a separate
    process, which fetches the code, checks the environment (reused here: this interpreter
    has what the project needs), starts the script and ships its output to the store, from
    where the CLI prints it.
``launch_s3`` (unless ``--no-s3``)
    the same with the store on a local S3 endpoint (moto's server, a separate process).

Figures:

* **time to first line**: from starting the process to reading the script's first output line
  (for a launch, on the CLI's output, i.e. after it went through the store), median over rounds;
  the launch's overhead is that minus ``direct``'s (target: at most 3 s);
* **code bytes uploaded**: by the first launch of a fresh store, and by every later launch of the
  unchanged project (target: 0);
* the agent's own timings (fetch, setup) as it recorded them in the job state.

Output: human-readable lines, then one JSON line (the last line). Exit code 0 whether or not the
targets are met; non-zero only when the benchmark itself fails.

Usage::

    .venv/bin/python benchmarks/launch_overhead.py            # 5 rounds, ~2 min
    .venv/bin/python benchmarks/launch_overhead.py --quick    # 1 round, no S3; figures mean little
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import round_or_none, start_server, stop_server

FIRST_LINE = "train.py: first line"
TRAIN_PY = textwrap.dedent(
    f'''
    print("{FIRST_LINE}", flush=True)
    import torch
    from lightning.pytorch import LightningModule, Trainer
    from torch.utils.data import DataLoader, TensorDataset

    from model_lib import Tiny

    trainer = Trainer(max_steps=5, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(Tiny())
    print("train.py: done", flush=True)
    '''
)
MODEL_LIB = textwrap.dedent(
    """
    import torch
    from lightning.pytorch import LightningModule
    from torch.utils.data import DataLoader, TensorDataset


    class Tiny(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            x = torch.randn(32, 4)
            return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    """
)


def make_project(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "train.py").write_text(TRAIN_PY)
    (root / "model_lib.py").write_text(MODEL_LIB)
    (root / "requirements.txt").write_text("torch\nlightning\n")
    pkg = root / "helpers"
    pkg.mkdir()
    for i in range(20):
        (pkg / f"mod_{i:02d}.py").write_text(f"VALUE = {i}\n" + "# padding\n" * 200)
    (root / "vocab.txt").write_bytes(os.urandom(512 * 1024).hex().encode())  # 1 MB of data the script ships with


def time_to_first_line(cmd: list[str], cwd: Path, env: dict[str, str], stream: str) -> tuple[float, float, str, str]:
    """(seconds to the first line, seconds to exit, stdout, stderr) of ``cmd``."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL
    )
    pipe = proc.stdout if stream == "stdout" else proc.stderr
    assert pipe is not None
    first = None
    seen: list[str] = []
    for line in pipe:
        seen.append(line)
        if FIRST_LINE in line:
            first = time.perf_counter() - start
            break
    out, err = proc.communicate(timeout=600)
    total = time.perf_counter() - start
    if stream == "stdout":
        out = "".join(seen) + out
    else:
        err = "".join(seen) + err
    if proc.returncode != 0 or first is None:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{err[-3000:]}")
    return first, total, out, err


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one round, no S3 (smoke test)")
    parser.add_argument("--no-s3", action="store_true")
    opts = parser.parse_args()
    repeats = 1 if opts.quick else opts.repeats
    use_s3 = not (opts.quick or opts.no_s3)

    work = Path(tempfile.mkdtemp(prefix="trainctl-launch-bench-"))
    server = None
    try:
        project = work / "project"
        make_project(project)
        base_env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINCTL_", "AWS_"))}
        base_env.update(TRAINCTL_HOME=str(work / "home"), PYTHONUNBUFFERED="1")
        modes: dict[str, dict[str, str]] = {
            "direct": base_env,
            "launch": {**base_env, "TRAINCTL_STORE": f"file://{work / 'store'}"},
        }
        if use_s3:
            from trainctl_lightning.testing import DUMMY_ENV

            server_env = {**base_env, **DUMMY_ENV}
            server, endpoint = start_server(server_env)
            import boto3

            boto3.client("s3", endpoint_url=endpoint, **_creds(DUMMY_ENV)).create_bucket(Bucket="bench")
            modes["launch_s3"] = {**server_env, "AWS_ENDPOINT_URL": endpoint, "TRAINCTL_STORE": "s3://bench/runs"}

        first_line: dict[str, list[float]] = {m: [] for m in modes}
        total: dict[str, list[float]] = {m: [] for m in modes}
        uploaded: dict[str, list[int]] = {m: [] for m in modes if m != "direct"}
        agent: dict[str, list[dict[str, float]]] = {m: [] for m in modes if m != "direct"}
        launch_cmd = [sys.executable, "-m", "trainctl_lightning.cli.app", "launch", "train.py", "--output", "json"]
        for rep in range(repeats):
            order = list(modes)
            order = order[rep % len(order) :] + order[: rep % len(order)]
            for mode in order:
                print(f"launch_overhead: round {rep} {mode} ...", file=sys.stderr, flush=True)
                if mode == "direct":
                    f, t, _, _ = time_to_first_line([sys.executable, "train.py"], project, modes[mode], "stdout")
                else:
                    f, t, out, _ = time_to_first_line(launch_cmd, project, modes[mode], "stderr")
                    result = json.loads(out)
                    uploaded[mode].append(int(result["code_bytes_uploaded"]))
                    state = _job_state(result["run_id"], project, modes[mode])
                    agent[mode].append(state.get("timings", {}))
                first_line[mode].append(f)
                total[mode].append(t)
                print(
                    f"[{mode:9s} {rep}] first line {f:.2f}s, exit {t:.2f}s"
                    + (f", code uploaded {uploaded[mode][-1]} B" if mode != "direct" else "")
                )

        med = {m: statistics.median(v) for m, v in first_line.items()}
        med_total = {m: statistics.median(v) for m, v in total.items()}
        overhead = {m: med[m] - med["direct"] for m in modes if m != "direct"}
        later_uploads = {m: v[1:] for m, v in uploaded.items()}
        for m in overhead:
            timings = agent[m]
            fetch = statistics.median(t.get("fetch", float("nan")) for t in timings)
            setup = statistics.median(t.get("setup", float("nan")) for t in timings)
            print(
                f"{m}: time to first line {med[m]:.2f}s vs direct {med['direct']:.2f}s: +{overhead[m]:.2f}s "
                f"(target <= 3 s: {'met' if overhead[m] <= 3 else 'MISSED'}); whole run {med_total[m]:.2f}s vs {med_total['direct']:.2f}s; "
                f"agent fetch {fetch:.2f}s, setup {setup:.2f}s"
            )
            print(
                f"{m}: code uploaded by the first launch {uploaded[m][0]} B; by the {len(later_uploads[m])} later launches of the "
                f"unchanged project {later_uploads[m]} B (target 0: {'met' if all(b == 0 for b in later_uploads[m]) else 'MISSED'})"
            )
        summary = {
            "benchmark": "launch_overhead",
            "repeats": repeats,
            "cpus": os.cpu_count(),
            "first_line_s": {m: round_or_none(v, 3) for m, v in med.items()},
            "first_line_runs_s": {m: [round(x, 3) for x in v] for m, v in first_line.items()},
            "total_s": {m: round_or_none(v, 3) for m, v in med_total.items()},
            "overhead_s": {m: round_or_none(v, 3) for m, v in overhead.items()},
            "code_bytes_uploaded_first": {m: v[0] for m, v in uploaded.items()},
            "code_bytes_uploaded_later": later_uploads,
            "agent_timings_s": agent,
            "targets": {
                "overhead_le_3s": {m: v <= 3.0 for m, v in overhead.items()},
                "relaunch_uploads_zero": {m: bool(v) and all(b == 0 for b in v) for m, v in later_uploads.items()},
            },
        }
        print(json.dumps(summary))
        return 0
    finally:
        if server is not None:
            stop_server(server)
        _terminate_leftovers(work)
        shutil.rmtree(work, ignore_errors=True)


def _creds(env: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }


def _job_state(run_id: str, cwd: Path, env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "trainctl_lightning.cli.app", "status", run_id, "--output", "json"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out).get("job") or {}


def _terminate_leftovers(work: Path) -> None:
    """Every local instance the benchmark created is terminated (the launches do it; this makes sure)."""
    env = {**os.environ, "TRAINCTL_HOME": str(work / "home")}
    listed = subprocess.run(
        [sys.executable, "-m", "trainctl_lightning.cli.app", "ls", "--provider", "local", "--output", "json"],
        env=env,
        capture_output=True,
        text=True,
    )
    try:
        instances = json.loads(listed.stdout).get("instances", [])
    except ValueError:
        return
    for inst in instances:
        subprocess.run(
            [sys.executable, "-m", "trainctl_lightning.cli.app", "terminate", inst["id"]], env=env, capture_output=True
        )


if __name__ == "__main__":
    sys.exit(main())
