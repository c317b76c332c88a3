"""Multi-node runs on the AWS provider, against moto's server.

What a user would check in the console after ``create_nodes``: N instances of one type in one
availability zone, in one cluster placement group and a security group that admits only its own
members, each tagged with the run and its node index, spot for all or none; and afterwards that
nothing is left: after a launch that failed at any step, after ``terminate`` of the last node,
and after ``trainctl gc`` once the instances ended themselves.

moto 5.2 has no placement groups at all: ``tests/helpers/aws.py`` adds them to the in-process
moto server (see there); moto also accepts EFA interfaces but records them as plain ones, so the
EFA tests check the request and the refusal, not the adapter.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.helpers import wait_until
from tests.helpers.aws import moto_ami, not_terminated, placement_groups, raw_instances
from trainctl_lightning.errors import ConfigError, ProviderError
from trainctl_lightning.gc import collect_garbage, store_clock
from trainctl_lightning.jobs.spec import JobPhase, JobSpec, JobState
from trainctl_lightning.jobs.store import JobStore
from trainctl_lightning.providers.api import InstanceSpec, InstanceState
from trainctl_lightning.providers.aws import NODE_STEPS, RUN_SECURITY_GROUP, TAG_CLUSTER, AWSProvider
from trainctl_lightning.providers.aws_cluster import CLUSTER_PURPOSE, TAG_CREATED_AT
from trainctl_lightning.store.layout import TAG_MANAGED_BY, TAG_NODE, TAG_PURPOSE, TAG_RUN_ID, TAG_STORE, run_url_in
from trainctl_lightning.testing import LocalIMDS
from trainctl_lightning.timeutil import parse_time, utc_now

RUN_ID = "ddp-20250101-120000-ab12"


@pytest.fixture
def ec2(s3: Any) -> Any:
    return s3.server.client("ec2")


@pytest.fixture
def provider(s3: Any, ec2: Any) -> AWSProvider:
    ami = moto_ami(ec2)
    provider = AWSProvider(endpoint_url=s3.endpoint, ami_resolver=lambda region: ami)
    provider.cluster_release_poll_s = 0.1
    return provider


@pytest.fixture
def store_url(s3: Any) -> str:
    return f"s3://{s3.bucket}/store"


def nodes_spec(store_url: str, nodes: int = 2, **overrides: Any) -> InstanceSpec:
    fields: dict[str, Any] = {
        "instance_type": "g5.xlarge",
        "max_runtime_s": 3600,
        "run_url": run_url_in(store_url, RUN_ID),
        "store_url": store_url,
        "nodes": nodes,
    }
    return InstanceSpec(**{**fields, **overrides})


def tags_of(raw: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in raw.get("Tags", [])}


def cluster_groups(ec2: Any) -> list[dict[str, Any]]:
    """Security groups made for multi-node runs (the VPC's default groups are not)."""
    return [g for g in ec2.describe_security_groups()["SecurityGroups"] if tags_of(g).get(TAG_PURPOSE) == CLUSTER_PURPOSE]


def run_roles(s3: Any) -> list[str]:
    return [r["RoleName"] for r in s3.server.client("iam").list_roles(PathPrefix="/trainctl/runs/")["Roles"]]


def assert_nothing_left(s3: Any, ec2: Any) -> None:
    assert not_terminated(ec2) == []
    assert placement_groups(ec2) == []
    assert cluster_groups(ec2) == []
    assert run_roles(s3) == []


# ----------------------------------------------------------------------------- the dry run
def test_the_dry_run_describes_the_cluster_and_creates_nothing(provider: AWSProvider, s3: Any, ec2: Any, store_url: str) -> None:
    plan = provider.create_dryrun(nodes_spec(store_url, nodes=3, spot=True))
    request = plan.request
    assert request["MinCount"] == request["MaxCount"] == 3
    assert request["Placement"] == {"GroupName": plan.cluster.name}
    assert request["SecurityGroupIds"] == [RUN_SECURITY_GROUP]
    assert request["InstanceMarketOptions"]["MarketType"] == "spot"  # one request: spot for all
    assert "NetworkInterfaces" not in request
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["nodes"] == 3 and data["spot"] is True
    assert data["cluster"]["placement_group"] == {"GroupName": plan.cluster.name, "Strategy": "cluster"}
    ingress = data["cluster"]["security_group"]["Ingress"]
    assert ingress == [{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": RUN_SECURITY_GROUP}]}]
    zone = data["cluster"]["availability_zone"]
    subnet = ec2.describe_subnets(SubnetIds=[data["cluster"]["subnet_id"]])["Subnets"][0]
    assert request["SubnetId"] == subnet["SubnetId"] and subnet["AvailabilityZone"] == zone
    text = plan.describe()
    assert "3 spot (one-time" in text and "cluster placement group" in text and "its own members only" in text
    assert "all or none" in text and f"{TAG_NODE}=k" in text
    assert raw_instances(ec2) == [] and placement_groups(ec2) == [] and cluster_groups(ec2) == [] and run_roles(s3) == []


def test_bad_combinations_are_refused_in_one_line_before_anything_is_made(
    provider: AWSProvider, s3: Any, ec2: Any, store_url: str
) -> None:
    subnets = ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
    two_zones = [s["SubnetId"] for s in sorted(subnets, key=lambda s: s["AvailabilityZone"])[:2]]
    cases = {
        "does not support EFA": nodes_spec(store_url, options={"efa": True}),  # g5.xlarge: EfaSupported false
        "spans availability zones": nodes_spec(store_url, options={"subnet_id": two_zones}),
        "recover is for one instance": nodes_spec(store_url, options={"recover": {"max_restarts": 1}}),
        "needs a run": InstanceSpec(instance_type="g5.xlarge", nodes=2),
        "only a multi-node run": nodes_spec(store_url, nodes=1, options={"efa": True}),
        "efa must be true or false": nodes_spec(store_url, options={"efa": "yes"}),
    }
    for expected, spec in cases.items():
        with pytest.raises(ConfigError, match=expected) as exc:
            provider.create_nodes(spec)
        assert "\n" not in str(exc.value)
    assert "EFA types include" in str(_refusal(provider, cases["does not support EFA"]))
    for zone_subnet in two_zones:
        assert zone_subnet in str(_refusal(provider, cases["spans availability zones"]))
    assert raw_instances(ec2) == [] and placement_groups(ec2) == [] and cluster_groups(ec2) == [] and run_roles(s3) == []


def _refusal(provider: AWSProvider, spec: InstanceSpec) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        provider.create_dryrun(spec)
    return exc.value


def test_efa_goes_on_one_interface_per_network_card_with_the_run_group(provider: AWSProvider, ec2: Any, store_url: str) -> None:
    info = ec2.describe_instance_types(InstanceTypes=["p4d.24xlarge"])["InstanceTypes"][0]["NetworkInfo"]
    expected = min(info["MaximumNetworkCards"], info["EfaInfo"]["MaximumEfaInterfaces"])
    plan = provider.create_dryrun(nodes_spec(store_url, instance_type="p4d.24xlarge", options={"efa": True}))
    interfaces = plan.request["NetworkInterfaces"]
    assert len(interfaces) == expected == plan.cluster.efa_interfaces
    assert {i["InterfaceType"] for i in interfaces} == {"efa"}
    assert [i["NetworkCardIndex"] for i in interfaces] == list(range(expected))
    assert interfaces[0]["DeviceIndex"] == 0 and all(i["Groups"] == [RUN_SECURITY_GROUP] for i in interfaces)
    assert all(i["SubnetId"] == plan.cluster.subnet_id for i in interfaces)
    # EC2 refuses a subnet or groups at the top level next to interfaces
    assert "SubnetId" not in plan.request and "SecurityGroupIds" not in plan.request

    instances = provider.create_nodes(plan.spec)
    [group] = cluster_groups(ec2)
    for raw in raw_instances(ec2):  # moto records the interfaces, though not their EFA type
        assert raw["NetworkInterfaces"] and raw["Placement"]["GroupName"] == plan.cluster.name
        for interface in raw["NetworkInterfaces"]:
            assert [g["GroupId"] for g in interface["Groups"]] == [group["GroupId"]]
            assert interface["SubnetId"] == plan.cluster.subnet_id
    for instance in instances:
        provider.terminate(instance.id)
    assert placement_groups(ec2) == [] and cluster_groups(ec2) == []


# ----------------------------------------------------------------------------- create and end
def test_nodes_share_a_zone_a_placement_group_and_a_closed_security_group(
    provider: AWSProvider, s3: Any, ec2: Any, store_url: str
) -> None:
    instances = provider.create_nodes(nodes_spec(store_url, nodes=3, spot=True, tags={"team": "vision"}))
    raws = {raw["InstanceId"]: raw for raw in raw_instances(ec2)}
    assert [i.id for i in instances] == sorted(raws, key=lambda i: raws[i]["AmiLaunchIndex"])  # node order
    [pg] = placement_groups(ec2)
    [sg] = cluster_groups(ec2)
    run_tags = {TAG_MANAGED_BY: "trainctl-lightning", TAG_RUN_ID: RUN_ID, TAG_STORE: store_url, "team": "vision"}

    assert pg["Strategy"] == "cluster" and pg["GroupName"] == sg["GroupName"]
    for group in (pg, sg):
        assert {**run_tags, TAG_PURPOSE: CLUSTER_PURPOSE}.items() <= tags_of(group).items()
        assert TAG_CREATED_AT in tags_of(group)
    # inbound: all traffic from its own members, nothing else; outbound: EC2's default
    assert sg["IpPermissions"] == [
        {
            "IpProtocol": "-1",
            "UserIdGroupPairs": [{"UserId": sg["OwnerId"], "GroupId": sg["GroupId"], "Description": "the run's own nodes"}],
            "IpRanges": [],
            "Ipv6Ranges": [],
            "PrefixListIds": [],
        }
    ]

    zones = {raw["Placement"]["AvailabilityZone"] for raw in raws.values()}
    assert len(zones) == 1 and len({raw["SubnetId"] for raw in raws.values()}) == 1
    for node, instance in enumerate(instances):
        raw = raws[instance.id]
        assert raw["InstanceType"] == "g5.xlarge" and raw["InstanceLifecycle"] == "spot" and instance.spot
        assert raw["Placement"]["GroupName"] == pg["GroupName"]
        assert [g["GroupId"] for g in raw["SecurityGroups"]] == [sg["GroupId"]]
        assert {**run_tags, TAG_NODE: str(node), TAG_CLUSTER: pg["GroupName"]}.items() <= tags_of(raw).items()
        assert instance.details["node"] == str(node)
    roles = run_roles(s3)
    # one RunInstances names one profile for all (moto records it on the first instance only)
    profiles = {raw["IamInstanceProfile"]["Arn"] for raw in raws.values() if "IamInstanceProfile" in raw}
    assert len(roles) == 1 and len(profiles) == 1 and roles[0] in profiles.pop()

    # every agent finds its node from job.json's node_instances and the metadata service
    written = JobSpec(
        run_id=RUN_ID,
        run_url=run_url_in(store_url, RUN_ID),
        created_at=utc_now(),
        script="train.py",
        provider="aws",
        nodes=3,
        node_instances=[i.id for i in instances],
    )
    spec = JobSpec.from_json(written.to_json())  # what each agent reads from job.json
    for node, instance in enumerate(instances):
        with LocalIMDS(instance_id=instance.id, local_ipv4=raws[instance.id]["PrivateIpAddress"]) as imds:
            with pytest.MonkeyPatch.context() as env:
                env.setenv("TRAINCTL_IMDS_ENDPOINT", imds.endpoint)
                assert spec.node_instances.index(provider.own_instance_id()) == node
                assert provider.node_address() == raws[instance.id]["PrivateIpAddress"]

    # the groups and the role stay while a node is up, and go with the last one
    for instance in instances[:-1]:
        assert provider.terminate(instance.id).state in (InstanceState.TERMINATING, InstanceState.TERMINATED)
        assert placement_groups(ec2) and cluster_groups(ec2) and run_roles(s3)
    provider.terminate(instances[-1].id)
    assert_nothing_left(s3, ec2)


@pytest.mark.parametrize("step", NODE_STEPS)
def test_a_failure_at_any_step_leaves_nothing(provider: AWSProvider, s3: Any, ec2: Any, store_url: str, step: str) -> None:
    provider._fail_after = step
    with pytest.raises(ProviderError, match=f"injected failure after {step}.*failed at {step}") as exc:
        provider.create_nodes(nodes_spec(store_url, nodes=2, spot=True))
    assert "\n" not in str(exc.value)
    launched = [raw["InstanceId"] for raw in raw_instances(ec2)]
    assert len(launched) == (2 if NODE_STEPS.index(step) >= NODE_STEPS.index("run_instances") else 0)
    if launched:
        assert f"terminated {', '.join(sorted(launched))}" in str(exc.value) or all(i in str(exc.value) for i in launched)
    assert_nothing_left(s3, ec2)


class NoClusterCapacity:
    """EC2 as it answers when a cluster placement group cannot hold N instances of the type now."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def run_instances(self, **kwargs: Any) -> Any:
        error = {"Error": {"Code": "InsufficientInstanceCapacity", "Message": "We currently do not have sufficient capacity"}}
        raise ClientError(error, "RunInstances")


def test_no_capacity_for_all_nodes_deletes_the_groups_and_the_role(
    provider: AWSProvider, s3: Any, ec2: Any, store_url: str, monkeypatch: Any
) -> None:
    real_client = provider.client
    monkeypatch.setattr(provider, "client", lambda service, region=None: NoClusterCapacity(real_client(service, region)))
    with pytest.raises(ProviderError, match="AWS has no capacity.*failed at run_instances.*deleted security-group") as exc:
        provider.create_nodes(nodes_spec(store_url))
    assert "\n" not in str(exc.value) and "deleted placement-group" in str(exc.value)
    assert raw_instances(ec2) == []
    assert_nothing_left(s3, ec2)


# ----------------------------------------------------------------------------- gc
def test_gc_deletes_the_groups_once_every_node_ended_itself(provider: AWSProvider, s3: Any, ec2: Any, store_url: str) -> None:
    instances = provider.create_nodes(nodes_spec(store_url, nodes=2))
    JobStore(run_url_in(store_url, RUN_ID)).write_state(JobState(run_id=RUN_ID, phase=JobPhase.RUNNING, updated_at=utc_now()))
    # node 1 powers itself off (release_from_agent: shutdown terminates): node 0 still runs the run
    ec2.terminate_instances(InstanceIds=[instances[1].id])
    report = collect_garbage(provider, yes=True, boot_grace_s=0)
    assert {(c.kind, c.garbage) for c in report.cluster} == {("placement-group", False), ("security-group", False)}
    assert placement_groups(ec2) and cluster_groups(ec2) and not_terminated(ec2) == [instances[0].id]

    # the run ends, node 0 powers off too: nothing terminates the run's groups but gc
    JobStore(run_url_in(store_url, RUN_ID)).write_state(JobState(run_id=RUN_ID, phase=JobPhase.SUCCEEDED, updated_at=utc_now()))
    ec2.terminate_instances(InstanceIds=[instances[0].id])
    assert placement_groups(ec2) and cluster_groups(ec2)
    # gc ages the groups on the store's clock, whose modified times have whole seconds (S3's too):
    # within the second of their creation tag they read as 0-1 s young, still inside any grace
    created = max(parse_time(r["created_at"]) for r in provider.list_cluster_resources())
    wait_until(lambda: store_clock(store_url) >= created, timeout=10, what="the store's clock to pass the groups' creation")
    listed = collect_garbage(provider, boot_grace_s=0)
    assert all(c.garbage and not c.deleted for c in listed.cluster) and len(listed.cluster) == 2
    assert placement_groups(ec2) and cluster_groups(ec2)  # listing deletes nothing

    report = collect_garbage(provider, yes=True, boot_grace_s=0)
    assert all(c.deleted and c.error is None for c in report.cluster)
    assert json.loads(json.dumps(report.to_dict()))["cluster"][0]["deleted"] is True
    assert_nothing_left(s3, ec2)


def test_gc_keeps_young_groups_of_a_launch_under_way(provider: AWSProvider, ec2: Any, store_url: str) -> None:
    provider._fail_after = "tag_nodes"
    provider.cluster_release_wait_s = 0  # leave nothing to clean up by gc here: make the cleanup fail
    plan = provider.create_dryrun(nodes_spec(store_url))
    from trainctl_lightning.providers.aws_cluster import create_placement_group, create_security_group

    # what create_nodes has made just before RunInstances: both groups, no instance yet
    tagged = plan.cluster.__class__(**{**plan.cluster.__dict__, "tags": {**plan.cluster.tags, TAG_CREATED_AT: utc_now()}})
    create_placement_group(ec2, tagged)
    create_security_group(ec2, tagged)
    JobStore(run_url_in(store_url, RUN_ID)).write_state(JobState(run_id=RUN_ID, phase=JobPhase.QUEUED, updated_at=utc_now()))
    report = collect_garbage(provider, yes=True)  # the default grace
    assert len(report.cluster) == 2 and not any(c.garbage for c in report.cluster)
    assert all("launch may be under way" in c.reason for c in report.cluster)
    assert placement_groups(ec2) and cluster_groups(ec2)


# ----------------------------------------------------------------------------- the metadata service
def test_without_the_metadata_service_the_agent_is_told_in_one_line(provider: AWSProvider, monkeypatch: Any) -> None:
    with LocalIMDS() as imds:
        endpoint = imds.endpoint
    monkeypatch.setenv("TRAINCTL_IMDS_ENDPOINT", endpoint)  # nothing listens there any more
    provider.metadata_attempts = 1
    with pytest.raises(ProviderError, match=r"cannot read /latest/meta-data/instance-id .*\(IMDSv2\)") as exc:
        provider.own_instance_id()
    assert "\n" not in str(exc.value)
