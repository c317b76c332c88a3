#!/usr/bin/env python
"""How long until every node trains: one node against two, on the local provider.

The same small Lightning script is launched with ``trainctl``'s Python API (``launch``), attached,
with a ``file://`` store, as one node (a plain single-node job) and as two nodes (two local
instances, each its own working directory, ``torchrun`` on each, c10d rendezvous at node 0,
gloo), interleaved over ``--repeats`` rounds. Every rank prints the wall-clock time of its first
training step; the figure is the time from calling ``launch`` to the *last* rank's first step.
The difference between two nodes and one is what rendezvous and discovery cost (the agents
meet through the store, then torchrun's c10d rendezvous and the gloo process group form).

Figures (medians over rounds): time to all nodes training, for 1 and 2 nodes, and the overhead.
Output: human-readable lines, then one JSON line (the last line). Exit code 0 unless the
benchmark itself fails.

Usage::

    .venv/bin/python benchmarks/multinode.py              # 3 rounds, ~2 min
    .venv/bin/python benchmarks/multinode.py --repeats 1  # quick; figures mean little
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

TRAIN_PY = textwrap.dedent(
    """
    import os
    import time

    import torch
    from lightning.pytorch import LightningModule, Trainer
    from torch.utils.data import DataLoader, TensorDataset


    class Tiny(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            if batch_idx == 0:
                print(f"FIRST_STEP rank={self.global_rank} t={time.time():.3f}", flush=True)
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            x = torch.randn(32, 4)
            return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


    if __name__ == "__main__":
        nodes = int(os.environ.get("NODES", "1"))
        trainer = Trainer(
            num_nodes=nodes, devices=1, accelerator="cpu", strategy="ddp" if nodes > 1 else "auto",
            max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(Tiny())
    """
)
FIRST_STEP = re.compile(r"FIRST_STEP rank=(\d+) t=([0-9.]+)")


def one_launch(project: Path, store: str, nodes: int) -> float:
    """Seconds from calling launch to the last rank's first training step."""
    from trainctl_lightning import launch as api

    start = time.time()
    run = api.launch(
        str(project / "train.py"),
        project_dir=project,
        store=store,
        nodes=nodes,
        env={"NODES": str(nodes)},
        on_output=lambda chunk: None,
        on_event=lambda msg: None,
    )
    assert isinstance(run, api.Run)
    state = run.state()
    if state is None or state.phase.value != "succeeded":
        raise RuntimeError(f"the {nodes}-node run did not succeed: {state.error if state else 'no state'}\n{run.logs()[-2000:]}")
    firsts = {int(m.group(1)): float(m.group(2)) for m in FIRST_STEP.finditer(run.logs())}
    if len(firsts) != nodes:
        raise RuntimeError(f"expected a first step from {nodes} ranks, found {sorted(firsts)}")
    return max(firsts.values()) - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trainctl-bench-multinode-") as tmp:
        os.environ["TRAINCTL_HOME"] = os.path.join(tmp, "home")  # instances of this benchmark only
        project = Path(tmp) / "project"
        project.mkdir()
        (project / "train.py").write_text(TRAIN_PY)
        store = f"file://{tmp}/store"
        times: dict[int, list[float]] = {1: [], 2: []}
        for round_ in range(args.repeats):
            for nodes in (1, 2):
                seconds = one_launch(project, store, nodes)
                times[nodes].append(seconds)
                print(f"round {round_ + 1}: {nodes} node(s): all training after {seconds:.2f}s", flush=True)
        from trainctl_lightning.providers import get_provider

        left = [i.id for i in get_provider("local").list()]
        if left:
            raise RuntimeError(f"instances left running: {left}")
    one, two = statistics.median(times[1]), statistics.median(times[2])
    print(f"time until all nodes train (median of {args.repeats}): 1 node {one:.2f}s, 2 nodes {two:.2f}s")
    print(f"rendezvous and discovery overhead: {two - one:+.2f}s ({two / one:.2f}x)")
    print(
        json.dumps(
            {
                "benchmark": "multinode",
                "repeats": args.repeats,
                "cpu_count": os.cpu_count(),
                "seconds_to_all_training_1_node": round(one, 3),
                "seconds_to_all_training_2_nodes": round(two, 3),
                "overhead_s": round(two - one, 3),
                "ratio": round(two / one, 3),
                "all_runs_s": {str(k): [round(v, 3) for v in vs] for k, vs in times.items()},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
