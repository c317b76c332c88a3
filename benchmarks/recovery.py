#!/usr/bin/env python
"""How long does a managed run (``--recover``) take to recover, and how many steps does it lose?

One managed run on the local provider (``tests/scripts/recover_train.py``: a real ``Trainer.fit``
with ``ModelCheckpoint(every_n_train_steps=--every)``, ``CheckpointSync`` and ``MetricsReporter``,
about 0.05 s a step) is interrupted ``--rounds`` times each way, alternating:

``notice``
    a spot interruption notice on the ``LocalIMDS`` stand-in, announcing the interruption
    ``--notice-s`` seconds ahead (EC2 gives two minutes). The agent asks the job for a
    checkpoint at once (SIGUSR1: a ``preempt-step=N`` checkpoint), stops it at the announced
    time and ends the attempt ``preempted``; the supervisor starts the next one.
``kill``
    no notice: SIGKILL of the attempt's agent and of the job's process group, at a random step
    (the instance is lost). The supervisor sees the agent gone and starts the next attempt.

Each interruption comes once the attempt has trained a random 5 to 5 + ``--every`` steps past
where it resumed, so the kills land at random points of the checkpoint interval. Once the last
replacement trains, the run is cancelled (the tests check that a run finishes; this measures).

Figures, all derived from what the run left in its store (the metric records' step and time,
``job-state.json``'s attempts: ``started_at``, ``ended_at``, ``resumed_step``), the agents the
local instance recorded (pid and process start time), and the moment the benchmark acted:

* **instance start-up** (reported on its own): attempt 1's time from its agent process's start to
  its first training step: the agent's interpreter and imports, the job's interpreter, torch and
  Lightning imports, building the Trainer and one step, with no checkpoint to resume. What any
  start of the job on a fresh instance takes.
* **time to recover**: from the notice (or the kill) to the first training step of the
  replacement, split into: the notice's lead (the job trains on until the announced time),
  stop (announced time or kill to the attempt's end), relaunch (the attempt's end to the next
  agent process's start), start-up (agent start to the first step, which includes finding,
  downloading and loading the checkpoint).
* **overhead beyond start-up** = time to recover - the notice's lead - instance start-up:
  what recovery costs beyond starting the job on a new instance, measured from the moment the
  instance goes away (target: at most 10 s). ``total - start-up`` (lead included) is printed too.
  The start-up baseline is one sample (attempt 1); on shared cores start-ups vary by a second or
  two between attempts, so an overhead can come out slightly negative: that is the margin.
* **steps lost with a notice**: steps completed by the time of the notice that the replacement
  does not resume with (completed at the notice - its ``resumed_step``; target 0). The steps
  trained between the preempt checkpoint and the announced time are trained again; they are
  reported as ``redone``, not lost (on EC2 that window is up to two minutes of training).
* **steps lost without a notice**: steps completed before the kill beyond the checkpoint the
  replacement resumes from (target: at most one checkpoint interval, ``--every``). The metrics
  reach the store every 0.2 s (the job's ``flush_interval``), so steps of the last 0.2 s before a
  kill may be missing from them: the figure is a lower bound, and ``lost_upper`` adds the steps
  0.2 s holds at the measured step rate; the target is judged on ``lost_upper``.

Completed steps are counted from the metric records: a fresh start's first record is the first
completed step, which fixes the offset between a record's ``step`` and completed global steps.

AWS estimate (not measured here; each term sourced or marked as an estimate):

=====================  ==========================================================================
notice                 2 minutes before the interruption (AWS docs, "Spot Instance interruption
                       notices"). Training goes on during it; the preempt checkpoint is taken at
                       once, so nothing before the notice is lost.
publish                checkpoint size / ~170 MB/s (the S3 upload rate from issue 15's
                       checkpoint_stall figures; an estimate for other instance types and
                       regions): 1 GB about 6 s, 10 GB about 60 s, inside the 2-minute notice.
replacement boot       EC2 launch of the replacement by the Auto Scaling group plus boot to user
                       data: typically 30-90 s for a GPU Deep Learning AMI. An estimate, not a
                       measured figure (AWS docs, "Instance lifecycle" and "Run commands on your
                       Linux instance at launch", describe the steps, not their duration).
                       Detection is EC2's own: the group replaces an instance once it is
                       terminated (AWS docs, "Replace unhealthy instances"/"health checks for
                       instances in an Auto Scaling group"), adding its health-check interval.
install + resume       trainctl install and the agent's start: ``benchmarks/launch_overhead.py``
                       measures 1.9 s (file://) / 2.5 s (S3) from launch to the script's first
                       line on a 2-core machine (README); pip installing trainctl on a fresh
                       AMI is extra and an estimate (tens of seconds, package-cache dependent).
                       Resume: downloading the checkpoint at the S3 rate above, then loading it.
=====================  ==========================================================================

So on AWS, from the interruption (the end of the notice) to the first step: replacement boot
(30-90 s, estimate) + install and agent start (seconds to tens of seconds) + checkpoint download
(size / ~170 MB/s) + the job's own start-up; the recovery overhead this benchmark measures locally
comes on top of that.

Output: human-readable lines, then one JSON line (the last line). Exit code 0 whether or not the
targets are met; non-zero only when the benchmark itself fails. Everything it starts (the IMDS
stand-in, the supervisor, agents, jobs, the local instance, its temp dir) is ended or removed.

Usage::

    .venv/bin/python benchmarks/recovery.py               # 3 rounds (3 notices, 3 kills), about 1.5 min on 2 cores
    .venv/bin/python benchmarks/recovery.py --rounds 1    # about 25 s
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import round_or_none

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "scripts" / "recover_train.py"
FLUSH_S = 0.2  # recover_train.py's MetricsReporter flush_interval
OVERHEAD_TARGET_S = 10.0

T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout: float, what: str, every: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def boot_wall_time() -> float:
    """Wall-clock time of the machine's boot, to 10 ms (a process start time is in ticks since boot)."""
    with open("/proc/uptime") as f:
        return time.time() - float(f.read().split()[0])


def epoch(iso: str) -> float:
    from trainctl_lightning.timeutil import parse_time

    return parse_time(iso).timestamp()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interruptions of each kind (notice, kill)")
    parser.add_argument("--every", type=int, default=10, help="checkpoint every N steps")
    parser.add_argument("--notice-s", type=float, default=2.0, help="the notice's lead: the interruption this many s after it")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    if opts.rounds < 1 or opts.every < 1 or opts.notice_s <= 0:
        parser.error("--rounds and --every must be >= 1 and --notice-s > 0")

    work = Path(tempfile.mkdtemp(prefix="trainctl-recovery-bench-"))
    os.environ.update(
        TRAINCTL_HOME=str(work / "home"),
        TRAINCTL_SPOT="1",
        TRAINCTL_SPOT_POLL_S="0.1",
        PYTHONUNBUFFERED="1",
    )
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[key]
    os.chdir(work)

    from trainctl_lightning.testing import LocalIMDS

    imds = LocalIMDS().start()
    os.environ["TRAINCTL_IMDS_ENDPOINT"] = imds.endpoint
    try:
        summary = measure(opts, work, imds)
    finally:
        imds.stop()
        leftovers = cleanup()
        shutil.rmtree(work, ignore_errors=True)
    if leftovers:
        raise RuntimeError(f"processes still running after the benchmark: {leftovers}")
    print(json.dumps(summary))
    return 0


def measure(opts: argparse.Namespace, work: Path, imds: Any) -> dict[str, Any]:
    from trainctl_lightning import launch as api
    from trainctl_lightning.jobs.spec import JobPhase, JobState
    from trainctl_lightning.metrics.read import MetricsFollower
    from trainctl_lightning.providers.local import LocalProvider

    rng = random.Random(opts.seed)
    kinds = ["notice", "kill"] * opts.rounds
    run = api.launch(
        str(SCRIPT),
        args=["--max-steps", "100000", "--every", str(opts.every)],
        sync_code=False,
        provider="local",
        store=f"file://{work / 'store'}",
        detach=True,
        recover=True,
        max_restarts=len(kinds),
    )
    assert isinstance(run, api.Run) and run.instance_id is not None
    instance_id = run.instance_id
    metrics = MetricsFollower(run.run_url)
    agents: dict[int, dict[str, Any]] = {}  # pid -> the agent record (attempt agents, in start order)

    def state() -> JobState:
        s = run.state()
        if s is None:
            raise RuntimeError("the run has no job state")
        if s.phase.is_terminal():
            raise RuntimeError(f"the run ended early: {s.phase.value}: {s.error}")
        return s

    def note_agents() -> None:
        for a in LocalProvider().describe(instance_id).details.get("agents", []):
            if a.get("role") is None:
                agents.setdefault(a["pid"], a)

    def records_of(number: int, attempts: list[Any]) -> list[tuple[float, int]]:
        """(time, step) of attempt ``number``'s training records, by the attempts' start times."""
        start = epoch(attempts[number - 1].started_at)
        end = epoch(attempts[number].started_at) if len(attempts) > number else float("inf")
        out = []
        for r in metrics.records():
            if "train_loss" in r.metrics and start <= epoch(r.time) < end:
                out.append((epoch(r.time), r.step))
        return out

    def training(number: int, ahead: int) -> bool:
        s = state()
        if s.phase is not JobPhase.RUNNING or len(s.attempts) != number:
            return False
        note_agents()
        recs = records_of(number, s.attempts)
        base = s.attempts[-1].resumed_step or 0
        return bool(recs) and max(step for _, step in recs) >= base + ahead

    events: list[dict[str, Any]] = []
    for i, kind in enumerate(kinds):
        number = i + 1
        ahead = rng.randint(5, 5 + opts.every)
        print(f"recovery: attempt {number}: waiting for {ahead} steps, then {kind} ...", file=sys.stderr, flush=True)
        wait_for(lambda n=number, a=ahead: training(n, a), 180, f"attempt {number} training", every=0.1)
        if kind == "notice":
            at = time.time()
            imds.notice(in_s=opts.notice_s)
            wait_for(lambda n=number: state().phase is JobPhase.RECOVERING or len(state().attempts) > n, 60, "the preemption")
            imds.clear()  # the replacement is another instance: no notice there
        else:
            s = state()
            [agent] = [a for a in LocalProvider().describe(instance_id).details["agents"] if a.get("role") is None and a["alive"]]
            if s.pid is None:
                raise RuntimeError(f"attempt {number} has no job pid to kill")
            at = time.time()
            os.kill(agent["pid"], signal.SIGKILL)
            os.killpg(s.pid, signal.SIGKILL)
        events.append({"kind": kind, "attempt": number, "at": at})
    number = len(kinds) + 1
    wait_for(lambda: training(number, 3), 180, f"attempt {number} training", every=0.1)
    final = state()
    records = [(epoch(r.time), r.step) for r in metrics.records() if "train_loss" in r.metrics]
    run.cancel("benchmark done", wait_s=60)

    attempts = final.attempts
    boot = boot_wall_time()
    tick = os.sysconf("SC_CLK_TCK")
    agent_start = [boot + a["start_time"] / tick for a in sorted(agents.values(), key=lambda a: a["start_time"])]
    if len(agent_start) != len(attempts):
        raise RuntimeError(f"found {len(agent_start)} attempt agents for {len(attempts)} attempts")

    def in_attempt(number: int) -> list[tuple[float, int]]:
        start = epoch(attempts[number - 1].started_at)
        end = epoch(attempts[number].started_at) if len(attempts) > number else float("inf")
        return sorted(r for r in records if start <= r[0] < end)

    first = in_attempt(1)
    offset = 1 - first[0][1]  # a fresh start's first record is completed step 1
    startup = first[0][0] - agent_start[0]
    times = [b[0] - a[0] for a, b in itertools.pairwise(first) if b[1] == a[1] + 1]
    step_s = statistics.median(times)
    flush_steps = int(FLUSH_S / step_s) + 1
    print(f"instance start-up (attempt 1: agent process start -> first training step): {startup:.2f} s")
    print(f"step time {step_s * 1000:.0f} ms; checkpoint every {opts.every} steps; notice lead {opts.notice_s:g} s")

    rows = []
    for ev in events:
        n = ev["attempt"]
        mine, nxt = in_attempt(n), in_attempt(n + 1)
        before = [s for t, s in mine if t <= ev["at"]]
        completed_at = (max(before) + offset) if before else (attempts[n - 1].resumed_step or 0)
        completed_end = max(s for _, s in mine) + offset
        resumed = attempts[n].resumed_step or 0
        first_step_t = nxt[0][0]
        lead = opts.notice_s if ev["kind"] == "notice" else 0.0
        ended = epoch(attempts[n - 1].ended_at)
        total = first_step_t - ev["at"]
        row = {
            "kind": ev["kind"],
            "attempt": n,
            "ended": attempts[n - 1].ended,
            "resumed_step": resumed,
            "completed_at_interruption": completed_at,
            "lost": max(0, completed_at - resumed),
            "total_s": total,
            "lead_s": lead,
            "stop_s": ended - (ev["at"] + lead),
            "relaunch_s": agent_start[n] - ended,
            "startup_s": first_step_t - agent_start[n],
            "overhead_s": total - lead - startup,
            "total_minus_startup_s": total - startup,
        }
        if ev["kind"] == "notice":
            row["redone"] = max(0, completed_end - resumed)
        else:
            row["lost_upper"] = row["lost"] + flush_steps
        rows.append(row)
        extra = (
            f", redone {row['redone']}"
            if "redone" in row
            else f" (<= {row['lost_upper']} counting the last {FLUSH_S} s unflushed)"
        )
        print(
            f"[{ev['kind']:6s} attempt {n} -> {n + 1}] ended {row['ended']}; recover {total:.2f} s = lead {lead:.2f} + stop "
            f"{row['stop_s']:.2f} + relaunch {row['relaunch_s']:.2f} + start-up {row['startup_s']:.2f}; overhead beyond start-up "
            f"{row['overhead_s']:.2f} s (total - start-up {row['total_minus_startup_s']:.2f} s); steps: completed {completed_at}, "
            f"resumed at {resumed}, lost {row['lost']}{extra}"
        )

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["kind"] == kind)

    lost_notice = max(r["lost"] for r in rows if r["kind"] == "notice")
    lost_kill = max(r["lost"] for r in rows if r["kind"] == "kill")
    lost_kill_upper = max(r["lost_upper"] for r in rows if r["kind"] == "kill")
    worst_overhead = max(r["overhead_s"] for r in rows)
    targets = {
        "lost_with_notice_eq_0": lost_notice == 0,
        "lost_without_notice_le_interval": lost_kill_upper <= opts.every,
        "overhead_beyond_startup_le_10s": worst_overhead <= OVERHEAD_TARGET_S,
    }

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT MET"

    print(f"steps lost with a notice: max {lost_notice} (target 0: {verdict(targets['lost_with_notice_eq_0'])})")
    print(
        f"steps lost without a notice: max {lost_kill}, at most {lost_kill_upper} with unflushed metrics "
        f"(target <= {opts.every}, one checkpoint interval: {verdict(targets['lost_without_notice_le_interval'])})"
    )
    print(
        f"overhead beyond start-up: notice median {med('notice', 'overhead_s'):.2f} s, kill median "
        f"{med('kill', 'overhead_s'):.2f} s, worst {worst_overhead:.2f} s "
        f"(target <= {OVERHEAD_TARGET_S:g} s: {verdict(targets['overhead_beyond_startup_le_10s'])})"
    )
    return {
        "benchmark": "recovery",
        "rounds": opts.rounds,
        "cpus": os.cpu_count(),
        "every_n_steps": opts.every,
        "notice_lead_s": opts.notice_s,
        "step_s": round_or_none(step_s),
        "instance_startup_s": round_or_none(startup, 3),
        "interruptions": [{k: (round_or_none(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
        "median_total_s": {k: round_or_none(med(k, "total_s"), 3) for k in ("notice", "kill")},
        "median_overhead_s": {k: round_or_none(med(k, "overhead_s"), 3) for k in ("notice", "kill")},
        "steps_lost_max": {"notice": lost_notice, "kill": lost_kill, "kill_upper": lost_kill_upper},
        "targets": targets,
    }


def cleanup() -> list[int]:
    """Terminate every local instance under this benchmark's TRAINCTL_HOME; the pids still alive after."""
    from trainctl_lightning.providers.local import LocalProvider

    for instance in LocalProvider().list():
        LocalProvider().terminate(instance.id)
    return wait_quiet(15.0)


def wait_quiet(timeout: float) -> list[int]:
    """Agents and jobs of this benchmark (its TRAINCTL_HOME in their environment) still alive after ``timeout``."""
    home = f"TRAINCTL_HOME={os.environ['TRAINCTL_HOME']}".encode()

    def alive() -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
                status = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if status != "Z" and home in environ:
                pids.append(int(entry.name))
        return pids

    deadline = time.monotonic() + timeout
    while (pids := alive()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return pids


if __name__ == "__main__":
    sys.exit(main())
