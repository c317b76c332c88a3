"""Blocking time per save of a sharded checkpoint: CheckpointSync's sharded writer vs DCP's async_save.

Run: ``python -m torch.distributed.run --nproc-per-node=2 benchmarks/sharded_checkpoint.py [--mb 64] [--saves 5]``
(2 processes on gloo, CPU). Both save the same state in the same run, alternately, to a file://
store under a temporary folder: the writer stages the state on the calling thread (DCP's own
stager) and then writes, uploads and commits in the background; ``async_save`` stages and
returns a future. Printed: each rank's blocking time per save (median, max) for both, the time
until the writer's checkpoint is published, and a final JSON line with the ratio of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from trainctl_lightning.checkpoint.sharded import ShardedWriter, new_group
from trainctl_lightning.store import RunStore


def _state(mb: int, rank: int) -> dict[str, torch.Tensor]:
    """``mb`` MiB per rank, in 8 tensors, different on every rank (each rank's own shard)."""
    gen = torch.Generator().manual_seed(rank)
    per = mb * 2**20 // 4 // 8
    return {f"layer{i}.rank{rank}": torch.randn(per, generator=gen) for i in range(8)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=64, help="state size per rank, MiB")
    parser.add_argument("--saves", type=int, default=5)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    root = Path(tempfile.mkdtemp(prefix="sharded-bench-")) if rank == 0 else None
    box = [str(root)]
    dist.broadcast_object_list(box, src=0)
    root = Path(box[0])
    node = root / f"node{rank}"  # every rank its own disk folder, as on separate nodes
    store = RunStore(f"file://{root / 'store'}")
    writer = ShardedWriter(store, new_group(600), rank=rank, world_size=world, state_key="state_dict", session="bench")
    dcp_group = new_group(600)
    ours, theirs, published = [], [], []
    for i in range(args.saves):
        state = _state(args.mb, rank)
        checkpoint = {"state_dict": state, "optimizer_states": [], "global_step": i, "epoch": 0}
        dist.barrier()
        writer.save(checkpoint, str(node / f"ours-{i}.ckpt"), {"global_step": i, "epoch": 0})
        ours.append(writer.blocking_s[-1])
        started = time.perf_counter()
        future = dcp.async_save(_state(args.mb, rank), checkpoint_id=str(node / f"dcp-{i}"), process_group=dcp_group)
        theirs.append(time.perf_counter() - started)
        future.result()
        done = time.perf_counter()
        while writer._jobs and not writer._jobs[-1].done.is_set():  # the background publication
            time.sleep(0.01)
        published.append(time.perf_counter() - done)
    result = writer.flush(600)
    dist.barrier()
    med_ours, med_theirs = statistics.median(ours), statistics.median(theirs)
    print(
        f"rank {rank}: {args.mb} MiB/rank, {args.saves} saves: CheckpointSync sharded blocks {med_ours * 1e3:.1f} ms "
        f"(max {max(ours) * 1e3:.1f}), DCP async_save blocks {med_theirs * 1e3:.1f} ms (max {max(theirs) * 1e3:.1f}); "
        f"published: {len(result.published)}/{args.saves}, failed: {result.failed}",
        flush=True,
    )
    if rank == 0:
        listed = store.list_checkpoints()
        print(
            json.dumps(
                {
                    "benchmark": "sharded_checkpoint",
                    "world_size": world,
                    "mb_per_rank": args.mb,
                    "saves": args.saves,
                    "ours_blocking_ms_median": round(med_ours * 1e3, 2),
                    "async_save_blocking_ms_median": round(med_theirs * 1e3, 2),
                    "ratio": round(med_ours / med_theirs, 3),
                    "manifests": len(listed),
                    "files_per_manifest": len(listed[-1].files) if listed else 0,
                }
            ),
            flush=True,
        )
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
