"""The run store's layout: every object name under a store and a run, run URLs, and tag names.

This module is the one place these names are spelled; ``docs/run-store.md`` documents them.
Nothing here touches storage::

    <store url>/                          a store: the root under which runs live
      _code/blobs/<sha256>                file contents of every synced project (code sync)
      _dist/<sha256>/<wheel>              wheels of a source checkout's trainctl (AWS installs, hash-checked)
      <run id>/                           a run: what CheckpointSync / MetricsReporter write to
        job.json                          the job spec (trainctl launch), create-only
        code.json                         the code bundle manifest (its SHA-256 is in job.json)
        job-state.json                    the job's state, rewritten by the agent (heartbeat)
        status.json                       live training status (MetricsReporter)
        logs/<start>-<session>-<seq>.log  the job's output, immutable chunks in order
        metrics/<start>-<session>-<seq>.jsonl   immutable metric segments (MetricsReporter)
        checkpoints/<checkpoint id>/      one published checkpoint: data objects, MANIFEST.json last
        control/cancel.json               present once someone asked the job to stop
        control/launcher.json             the attached launcher's heartbeat
        remote/payload.pkl, result.pkl    a RemoteStrategy / remote() call and its outcome
        control/rendezvous.json           a multi-node run: where the nodes meet (written by node 0)
        nodes/<k>/job-state.json          a multi-node run: node k's own state (k >= 1; node 0's is job-state.json)
        nodes/<k>/logs/...                node k's output (k >= 1; node 0's is logs/)
"""

from __future__ import annotations

__all__ = [
    "ATTEMPT_ENV",
    "CANCEL",
    "CHECKPOINTS",
    "CHECKPOINT_MANIFEST",
    "CODE_BLOBS",
    "CODE_MANIFEST",
    "DIST",
    "JOB",
    "JOB_SIGNATURE",
    "JOB_STATE",
    "LAUNCHER_HEARTBEAT",
    "LOGS",
    "METRICS",
    "NODES",
    "NODE_ENV",
    "RECOVER_ENV",
    "REMOTE_PAYLOAD",
    "REMOTE_RESULT",
    "RENDEZVOUS",
    "RUN_MARKERS",
    "RUN_URL_ENV",
    "STATUS",
    "TAG_MANAGED_BY",
    "TAG_NAME",
    "TAG_NODE",
    "TAG_OWNER",
    "TAG_PURPOSE",
    "TAG_RUN_ID",
    "TAG_STORE",
    "blobs_url_in",
    "checkpoint_object",
    "dist_dir",
    "node_object",
    "run_id_of",
    "run_url_in",
    "split_run_url",
    "store_url_of",
]

# ----------------------------------------------------------------------------- in a run
JOB = "job.json"
"""The job spec (:class:`~trainctl_lightning.jobs.spec.JobSpec`), written once by the launcher."""
JOB_SIGNATURE = "job.sig"
"""The run key's HMAC of ``job.json`` (one line, written just before it): the agent runs the job
only when it matches (``runkey``). The spec names the code manifest's sha256, so it covers the code."""
CODE_MANIFEST = "code.json"
"""The code bundle manifest of the run (file path -> blob checksum, size, mode)."""
JOB_STATE = "job-state.json"
"""The job's state (:class:`~trainctl_lightning.jobs.spec.JobState`), rewritten by the agent."""
STATUS = "status.json"
"""Live training status, rewritten every few seconds by MetricsReporter."""
LOGS = "logs"
"""Folder of the job's output chunks (immutable, in name order)."""
METRICS = "metrics"
"""Folder of immutable metrics segments (JSON Lines, in name order)."""
CHECKPOINTS = "checkpoints"
"""Folder of published checkpoints, one sub-folder per checkpoint id."""
CHECKPOINT_MANIFEST = "MANIFEST.json"
"""The object that makes a checkpoint exist; written last, create-only."""
CANCEL = "control/cancel.json"
"""Present once someone asked the job to stop."""
LAUNCHER_HEARTBEAT = "control/launcher.json"
"""The attached launcher's heartbeat; the agent's watchdog cancels the job once it is stale."""
REMOTE_PAYLOAD = "remote/payload.pkl"
"""What a RemoteStrategy / remote() call runs (pickled by the launcher)."""
REMOTE_RESULT = "remote/result.pkl"
"""What came of it (pickled by the worker on the instance)."""
RENDEZVOUS = "control/rendezvous.json"
"""A multi-node run: node 0's agent writes where torchrun's c10d rendezvous listens (private
address and port, attempt); the other nodes' agents wait for it."""
NODES = "nodes"
"""A multi-node run: folder of the other nodes' own objects, ``nodes/<k>/`` for node k >= 1
(their ``job-state.json`` and ``logs/``). Node 0 (the lead) writes the run's own."""
#: Objects whose presence marks a folder as a run (``runs ls`` finds runs by them).
RUN_MARKERS = (JOB, STATUS, CHECKPOINTS)

# ----------------------------------------------------------------------------- in a store
CODE_BLOBS = "_code/blobs"
"""Content-addressed file contents shared by every run in the store."""
DIST = "_dist"
"""Wheels of trainctl built from a source checkout, by content key."""

#: Set by the trainctl agent on an instance: the run's store URL, used when none is given.
RUN_URL_ENV = "TRAINCTL_RUN_URL"
RECOVER_ENV = "TRAINCTL_RECOVER"
"""Set to ``1`` by the agent for the job of a managed run (``--recover``): ``CheckpointSync``
then resumes ``fit`` from the run's newest complete checkpoint without user code."""
NODE_ENV = "TRAINCTL_NODE"
"""The node index (0 for the lead) of a multi-node run's agent, given by the provider that
starts it; the job sees it too."""
ATTEMPT_ENV = "TRAINCTL_ATTEMPT"
"""The attempt number (1 for the first start, 2 for the first replacement, ...), set by the agent."""

# ----------------------------------------------------------------------------- tags
TAG_MANAGED_BY = "trainctl:managed-by"
"""On everything trainctl creates; list/stop/terminate/gc find resources by it only."""
TAG_OWNER = "trainctl:owner"
"""``user@host`` of whoever launched it."""
TAG_RUN_ID = "trainctl:run-id"
"""The run an instance was created for."""
TAG_STORE = "trainctl:store"
"""The store URL of that run (gc reads the run's state from it)."""
TAG_PURPOSE = "trainctl:purpose"
"""What a supporting resource is for (``trainctl aws setup``'s security group)."""
TAG_NODE = "trainctl:node"
"""A multi-node run's node index (0, 1, ...) on each of its instances."""
TAG_NAME = "Name"
"""The console name of an instance."""


def run_url_in(store_url: str, run_id: str) -> str:
    """The URL of run ``run_id`` in the store rooted at ``store_url``."""
    return f"{store_url.rstrip('/')}/{run_id}"


def split_run_url(run_url: str) -> tuple[str, str]:
    """``(store url, run id)`` of a run URL made by :func:`run_url_in`."""
    store, _, run_id = run_url.rstrip("/").rpartition("/")
    return store, run_id


def store_url_of(run_url: str) -> str:
    """The store a run URL lives in."""
    return split_run_url(run_url)[0]


def run_id_of(run_url: str) -> str:
    """The last part of a run URL: the run's id."""
    return split_run_url(run_url)[1]


def blobs_url_in(store_url: str) -> str:
    """Where code sync keeps its content-addressed blobs for a store."""
    return f"{store_url.rstrip('/')}/{CODE_BLOBS}"


def node_object(node: int, name: str) -> str:
    """Where node ``node`` of a run keeps its own ``name`` (``job-state.json``, ``logs``): the run's
    own for node 0 (the lead, and every single-node run), ``nodes/<k>/<name>`` for the others."""
    if isinstance(node, bool) or not isinstance(node, int) or node < 0:
        raise ValueError(f"node index must be an int >= 0, got {node!r}")
    return name if node == 0 else f"{NODES}/{node}/{name}"


def dist_dir(key: str) -> str:
    """Folder (relative to the store) of a wheel of trainctl, named by the wheel's SHA-256."""
    return f"{DIST}/{key}"


def checkpoint_object(checkpoint_id: str, name: str = "") -> str:
    """Path (relative to the run) of a checkpoint's folder, or of one object in it."""
    return f"{CHECKPOINTS}/{checkpoint_id}/{name}" if name else f"{CHECKPOINTS}/{checkpoint_id}"
