"""Multi-node runs from the launcher's side: the one option that asks for them, all-or-nothing
instances, the job spec every node reads, and logs and status across nodes.

The nodes training together under torchrun is tested end to end in test_multinode.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.cli import trainctl
from trainctl_lightning import launch as api
from trainctl_lightning.errors import ConfigError, ProviderError
from trainctl_lightning.jobs.spec import JobPhase, JobSpec, JobState
from trainctl_lightning.jobs.store import JobStore, NodeLogMerger, chunk_time_ms
from trainctl_lightning.providers.api import CreatePlan, Instance, InstanceSpec, InstanceState
from trainctl_lightning.providers.local import LocalProvider
from trainctl_lightning.store.layout import TAG_NODE, TAG_RUN_ID
from trainctl_lightning.timeutil import utc_now


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "train.py").write_text("print('hello')\n")
    return root


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"nodes": 0}, "nodes = 0 is not allowed"),
        ({"nodes": "2"}, "nodes = '2' is not allowed"),
        ({"nodes": True}, "nodes = True is not allowed"),
        ({"nodes": 100000}, "from 1 to 256"),
        ({"nodes": 2, "nproc_per_node": 0}, "processes per node = 0"),
        ({"nproc_per_node": 2}, "needs nodes > 1"),
        ({"nodes": 2, "instance": "local-abc"}, "omit instance='local-abc'"),
    ],
)
def test_bad_node_options_are_one_line_before_anything_is_created(
    project: Path, options: dict, words: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=words) as info:
        api.launch(str(project / "train.py"), project_dir=project, store=f"file://{tmp_path}/store", dry_run=True, **options)
    assert "\n" not in str(info.value)
    assert LocalProvider().list(include_terminated=True) == []


def test_cli_refuses_a_bad_node_count_in_one_line(project: Path, tmp_path: Path) -> None:
    result = trainctl("launch", "train.py", "--nodes", "0", "--store", f"file://{tmp_path}/store", cwd=project)
    assert result.returncode != 0
    assert "nodes = 0 is not allowed" in result.stderr and "Traceback" not in result.stderr
    assert LocalProvider().list(include_terminated=True) == []


# ----------------------------------------------------------------------------- the plan


def test_dry_run_plans_n_instances_and_a_job_for_every_node(project: Path, tmp_path: Path) -> None:
    plan = api.launch(
        str(project / "train.py"), project_dir=project, store=f"file://{tmp_path}/store", nodes=3, nproc_per_node=2, dry_run=True
    )
    assert isinstance(plan, api.LaunchPlan) and isinstance(plan.instance, CreatePlan)
    assert plan.instance.spec.nodes == 3
    assert "nodes: 3 instances, created together (all or none)" in plan.describe()
    assert plan.to_dict()["instance"]["nodes"] == 3
    assert (plan.job.nodes, plan.job.nproc_per_node) == (3, 2)
    assert LocalProvider().list(include_terminated=True) == []  # a dry run creates nothing


def test_a_job_spec_names_one_instance_per_node() -> None:
    base = {"run_id": "r1", "run_url": "file:///s/r1", "created_at": utc_now(), "script": "t.py"}
    with pytest.raises(ConfigError, match="names 1 instances for 2 nodes"):
        JobSpec(**base, nodes=2, node_instances=["i-0"])
    spec = JobSpec(**base, nodes=2, nproc_per_node=4, node_instances=["i-0", "i-1"])
    again = JobSpec.from_json(spec.to_json())
    assert (again.nodes, again.nproc_per_node, again.node_instances) == (2, 4, ["i-0", "i-1"])
    # a spec written before multi-node runs existed reads as one node
    old = json.loads(JobSpec(**base).to_json())
    for name in ("nodes", "nproc_per_node", "node_instances"):
        old.pop(name)
    assert JobSpec.from_json(json.dumps(old)).nodes == 1


# ----------------------------------------------------------------------------- all or none


class _FailsOnNode(LocalProvider):
    """The local provider, with the ``fail_at``-th instance failing to be created."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at
        self.made = 0

    def _create(self, plan: CreatePlan) -> Instance:
        if self.made == self.fail_at:
            raise ProviderError(f"no capacity for node {self.made}")
        self.made += 1
        return super()._create(plan)


def test_create_nodes_tags_each_instance_with_its_node() -> None:
    provider = LocalProvider()
    made = provider.create_nodes(InstanceSpec(nodes=3, tags={TAG_RUN_ID: "run-x"}))
    try:
        assert [i.tags[TAG_NODE] for i in made] == ["0", "1", "2"]
        assert {i.tags[TAG_RUN_ID] for i in made} == {"run-x"}
        assert len({i.details["workdir"] for i in made}) == 3  # no shared disk between nodes
    finally:
        for inst in made:
            provider.terminate(inst.id)


@pytest.mark.parametrize("fail_at", [0, 1, 2])
def test_create_nodes_is_all_or_none(fail_at: int) -> None:
    provider = _FailsOnNode(fail_at)
    with pytest.raises(ProviderError, match=f"no capacity for node {fail_at}"):
        provider.create_nodes(InstanceSpec(nodes=3))
    left = provider.list(include_terminated=True)
    assert len(left) == fail_at
    assert all(i.state is InstanceState.TERMINATED for i in left)


def test_a_launch_whose_second_node_fails_leaves_nothing(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failing = _FailsOnNode(1)
    monkeypatch.setattr(api, "provider_for", lambda *a, **k: failing)
    with pytest.raises(ProviderError, match="no capacity for node 1"):
        api.launch(str(project / "train.py"), project_dir=project, store=f"file://{tmp_path}/store", nodes=2, detach=True)
    assert [i.state for i in failing.list(include_terminated=True)] == [InstanceState.TERMINATED]
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").glob("*/job.json"))


# ----------------------------------------------------------------------------- logs and status


def test_node_logs_interleave_by_time_with_a_prefix_and_keep_cut_lines_whole() -> None:
    merger = NodeLogMerger()
    merger.add(0, [("a-000000-t1000.log", b"zero one\nzero tw"), ("a-000001-t3000.log", b"o\n")])
    merger.add(1, [("b-000000-t2000.log", b"one one\n")])
    assert merger.flush() == b"[node 0] zero one\n[node 1] one one\n[node 0] zero two\n"
    held = NodeLogMerger()
    held.add(1, [("b-000000-t1.log", b"no newline yet")])
    assert held.flush(final=False) == b""
    assert held.flush() == b"[node 1] no newline yet\n"
    assert chunk_time_ms("logs/x-000003-t1700000000123.log") == 1700000000123
    assert chunk_time_ms("20260101T000000-abcdef-000003.log") is None  # written before names carried it


def _two_node_run(store: str) -> api.Run:
    """A finished two-node run as the agents leave it in the store (no agent runs here)."""
    url = f"{store}/two-nodes"
    spec = JobSpec(run_id="two-nodes", run_url=url, created_at=utc_now(), script="t.py", nodes=2, node_instances=["i-a", "i-b"])
    job = JobStore(url)
    job.write_spec(spec)
    for node, (phase, code, error) in enumerate(
        [(JobPhase.FAILED, 1, "node 1 failed first"), (JobPhase.FAILED, -9, "exit code -9")]
    ):
        view = job.for_node(node)
        state = JobState(run_id="two-nodes", phase=phase, updated_at=utc_now(), node=node, exit_code=code, error=error)
        state.failed_node = 1
        view.write_state(state)
        writer = view.log_writer()
        writer.write(f"node {node} line 1\n".encode())
        writer.write(f"node {node} line 2\n".encode())
    return api.get_run(url)


def test_logs_and_status_show_every_node(file_store: str) -> None:
    run = _two_node_run(file_store)
    assert run.nodes == 2 and run.node_instances == ["i-a", "i-b"]
    everything = run.logs()
    assert everything.count("[node 0] node 0 line") == 2 and everything.count("[node 1] node 1 line") == 2
    assert run.logs(node=1) == "node 1 line 1\nnode 1 line 2\n"
    assert [s.exit_code if s else None for s in run.node_states()] == [1, -9]
    with pytest.raises(ConfigError, match="has no node 2: it runs on 2 node"):
        run.logs(node=2)

    out = trainctl("logs", run.run_url, "--node", "1")
    assert out.returncode == 0 and out.stdout == "node 1 line 1\nnode 1 line 2\n"
    bad = trainctl("logs", run.run_url, "--node", "7")
    assert bad.returncode != 0 and "has no node 7" in bad.stderr and "Traceback" not in bad.stderr
    followed = trainctl("logs", run.run_url, "-f")  # the run ended: every node's output, then it returns
    assert followed.returncode == 0 and followed.stdout.count("[node 1] ") == 2

    status = json.loads(trainctl("status", run.run_url, "--output", "json").stdout)
    assert [(n["node"], n["instance_id"], n["job"]["exit_code"]) for n in status["nodes"]] == [(0, "i-a", 1), (1, "i-b", -9)]
    assert status["job"]["failed_node"] == 1
    table = trainctl("status", run.run_url).stdout
    assert "node 1" in table and "i-b" in table and "(failed first)" in table


# ----------------------------------------------------------------------------- RemoteStrategy


def test_remote_strategy_num_nodes_is_checked_here() -> None:
    from trainctl_lightning import RemoteStrategy

    with pytest.raises(ConfigError, match="give devices as a count per node"):
        RemoteStrategy(provider="local", num_nodes=2, devices=[0, 1])
    with pytest.raises(ConfigError, match="use num_nodes= and devices="):
        RemoteStrategy(provider="local", nodes=2)
    with pytest.raises(ConfigError, match="nodes = 0 is not allowed"):
        RemoteStrategy(provider="local", num_nodes=0)
    strategy = RemoteStrategy(provider="local", num_nodes=2, devices=2)
    assert strategy.options.launch_options == {"nodes": 2, "nproc_per_node": 2}
    assert "num_nodes=2" in repr(strategy)


def test_the_remote_worker_knows_global_rank_zero_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainctl_lightning.remote import worker

    for name in ("RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert worker._is_rank_zero()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "2")  # torchrun: node 1's first process is global rank 2
    assert not worker._is_rank_zero()
    monkeypatch.setenv("RANK", "0")
    assert worker._is_rank_zero()
