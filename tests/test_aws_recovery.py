"""Managed runs on AWS (aws option ``recover``) against moto's server: the run's launch template
and Auto Scaling group are created and tagged, AWS replaces a lost instance with one that boots
the same user data, and nothing is left once the run ends, is terminated or fails to launch;
gc deletes what an ended run left behind.

moto 5.2 answers 500 to a MixedInstancesPolicy with InstancesDistribution, so the provider here
leaves it out (``instances_distribution = False``; see providers/aws_recovery.py).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from tests.helpers import wait_until
from tests.helpers.aws import moto_ami, not_terminated, raw_instances, trainctl_security_group
from tests.helpers.cli import trainctl
from trainctl_lightning.errors import ConfigError, ProviderError
from trainctl_lightning.gc import collect_garbage, find_garbage
from trainctl_lightning.jobs.spec import JobPhase, JobState
from trainctl_lightning.jobs.store import JobStore
from trainctl_lightning.providers.api import InstanceSpec
from trainctl_lightning.providers.aws import RECOVERY_STEPS, AWSProvider
from trainctl_lightning.providers.aws_recovery import LIFETIME_ACTION, RECOVERY_GROUP_ENV, TAG_RECOVERY_GROUP
from trainctl_lightning.providers.aws_run_role import run_role_for
from trainctl_lightning.providers.aws_setup import setup_aws
from trainctl_lightning.store.layout import TAG_MANAGED_BY, TAG_RUN_ID, TAG_STORE, run_url_in
from trainctl_lightning.timeutil import utc_now

RUN_ID = "mnist-20250101-120000-ab12"
RECOVER = {"max_restarts": 3, "max_hours": 12, "instance_types": ["g5.xlarge", "g6.xlarge"]}


@pytest.fixture
def ec2(s3) -> Any:
    return s3.server.client("ec2")


@pytest.fixture
def autoscaling(s3) -> Any:
    return s3.server.client("autoscaling")


@pytest.fixture
def iam(s3) -> Any:
    return s3.server.client("iam")


@pytest.fixture
def provider(s3, ec2) -> AWSProvider:
    ami = moto_ami(ec2)
    trainctl_security_group(ec2)
    setup_aws(s3.bucket, endpoint_url=s3.endpoint)
    provider = AWSProvider(endpoint_url=s3.endpoint, ami_resolver=lambda region: ami, shutdown_command=["true"])
    provider.instances_distribution = False  # moto 5.2: 500 on InstancesDistribution
    provider.visible_timeout_s = 20.0
    return provider


@pytest.fixture
def store_url(s3) -> str:
    return f"s3://{s3.bucket}/store"


def recover_spec(store: str, /, run_id: str = RUN_ID, recover: Any = None, **overrides: Any) -> InstanceSpec:
    options = {"recover": RECOVER if recover is None else recover, **overrides.pop("options", {})}
    fields = {"run_url": run_url_in(store, run_id), "store_url": store, "options": options}
    return InstanceSpec(**{"instance_type": "g5.xlarge", "max_runtime_s": 3600, "spot": True, **fields, **overrides})


def groups(autoscaling) -> dict[str, dict]:
    return {g["AutoScalingGroupName"]: g for g in autoscaling.describe_auto_scaling_groups()["AutoScalingGroups"]}


def templates(ec2) -> dict[str, dict]:
    return {t["LaunchTemplateName"]: t for t in ec2.describe_launch_templates()["LaunchTemplates"]}


def run_roles(iam) -> list[str]:
    return [r["RoleName"] for r in iam.list_roles(PathPrefix="/trainctl/runs/")["Roles"]]


def tags_of(raw: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in raw.get("Tags", [])}


def live_in_group(ec2, name: str) -> list[dict]:
    return [
        i
        for i in raw_instances(ec2)
        if tags_of(i).get("aws:autoscaling:groupName") == name and i["State"]["Name"] in ("pending", "running")
    ]


def nothing_left(ec2, autoscaling, iam) -> bool:
    return not groups(autoscaling) and not templates(ec2) and not run_roles(iam) and not not_terminated(ec2)


def test_dry_run_shows_group_and_template_and_creates_nothing(provider, ec2, autoscaling, iam, store_url) -> None:
    plan = provider.create_dryrun(recover_spec(store_url))
    name = plan.run_role.name
    assert nothing_left(ec2, autoscaling, iam)
    text = plan.describe()
    assert f"launch template {name}" in text and f"EC2 Auto Scaling group {name}" in text
    assert "up to 3 restart(s)" in text and "0 instances 12 h after creation" in text
    group = plan.request["CreateAutoScalingGroup"]
    assert (group["MinSize"], group["MaxSize"], group["DesiredCapacity"]) == (1, 1, 1)
    default_subnets = ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
    assert len(group["VPCZoneIdentifier"].split(",")) == len(default_subnets) > 1  # every availability zone
    overrides = group["MixedInstancesPolicy"]["LaunchTemplate"]["Overrides"]
    assert [o["InstanceType"] for o in overrides] == RECOVER["instance_types"]
    assert all(t["PropagateAtLaunch"] for t in group["Tags"])
    assert plan.request["PutScheduledUpdateGroupAction"]["DesiredCapacity"] == 0
    data = plan.request["CreateLaunchTemplate"]["LaunchTemplateData"]
    assert "bytes" in json.dumps(data["UserData"]) and "agent" not in json.dumps(data["UserData"])  # summarised
    assert f"{RECOVERY_GROUP_ENV}={name}" in (plan.user_data or "")
    json.dumps(plan.to_dict())  # a plan is shown as JSON too

    # real AWS's shape: the distribution says spot, the template does not
    provider.instances_distribution = True
    real = provider.create_dryrun(recover_spec(store_url)).request
    distribution = real["CreateAutoScalingGroup"]["MixedInstancesPolicy"]["InstancesDistribution"]
    assert distribution == {
        "OnDemandBaseCapacity": 0,
        "OnDemandPercentageAboveBaseCapacity": 0,
        "SpotAllocationStrategy": "capacity-optimized",
    }
    assert "InstanceMarketOptions" not in real["CreateLaunchTemplate"]["LaunchTemplateData"]
    assert nothing_left(ec2, autoscaling, iam)


def test_group_and_template_are_created_tagged_and_the_instance_boots_the_run(provider, ec2, autoscaling, iam, store_url) -> None:
    instance = provider.create(recover_spec(store_url))
    name = instance.details["recovery_group"]
    group, template = groups(autoscaling)[name], templates(ec2)[name]
    for tags in ({t["Key"]: t["Value"] for t in group["Tags"]}, tags_of(template), instance.tags):
        assert tags[TAG_MANAGED_BY] == "trainctl-lightning" and tags[TAG_RUN_ID] == RUN_ID
        assert tags[TAG_STORE] == store_url and tags[TAG_RECOVERY_GROUP] == name
    assert instance.details["launch_template"] == template["LaunchTemplateId"]
    assert [i["InstanceId"] for i in group["Instances"]] == [instance.id]
    assert run_roles(iam) == [name]
    actions = autoscaling.describe_scheduled_actions(AutoScalingGroupName=name)["ScheduledUpdateGroupActions"]
    assert [(a["ScheduledActionName"], a["DesiredCapacity"]) for a in actions] == [(LIFETIME_ACTION, 0)]
    version = ec2.describe_launch_template_versions(LaunchTemplateName=name)["LaunchTemplateVersions"][0]
    user_data = base64.b64decode(version["LaunchTemplateData"]["UserData"]).decode()
    assert run_url_in(store_url, RUN_ID) in user_data and f"{RECOVERY_GROUP_ENV}={name}" in user_data
    assert version["LaunchTemplateData"]["IamInstanceProfile"]["Arn"].endswith(f"instance-profile/trainctl/runs/{name}")
    assert [i.id for i in provider.list()] == [instance.id]


@pytest.mark.parametrize("how", ["ec2", "autoscaling"])
def test_aws_replaces_a_lost_instance_with_one_for_the_same_run(provider, ec2, autoscaling, store_url, how) -> None:
    first = provider.create(recover_spec(store_url))
    name = first.details["recovery_group"]
    if how == "ec2":  # reclaimed, or terminated from outside
        ec2.terminate_instances(InstanceIds=[first.id])
    else:
        autoscaling.terminate_instance_in_auto_scaling_group(InstanceId=first.id, ShouldDecrementDesiredCapacity=False)
    replacement = wait_until(
        lambda: [i for i in live_in_group(ec2, name) if i["InstanceId"] != first.id], timeout=30, what="a replacement"
    )[0]
    tags = tags_of(replacement)
    assert (tags[TAG_RUN_ID], tags[TAG_STORE], tags[TAG_MANAGED_BY]) == (RUN_ID, store_url, "trainctl-lightning")
    assert replacement["ImageId"] == provider.ami_resolver("us-east-1")  # type: ignore[misc]
    # the replacement is listed, and its run's key parameter and role are still there for it to read
    assert replacement["InstanceId"] in [i.id for i in provider.list()]
    assert [g.garbage for g in find_garbage(provider, boot_grace_s=0).groups] == [False]


def test_terminate_deletes_group_template_role_and_instances(provider, ec2, autoscaling, iam, store_url) -> None:
    instance = provider.create(recover_spec(store_url))
    assert provider.terminate(instance.id).state.value == "terminated"
    assert nothing_left(ec2, autoscaling, iam)
    assert provider.terminate_group(instance.details["recovery_group"]) is False  # idempotent


@pytest.mark.parametrize("step", RECOVERY_STEPS)
def test_a_failed_launch_leaves_nothing(provider, ec2, autoscaling, iam, store_url, step) -> None:
    provider._fail_after = step
    with pytest.raises(ProviderError, match=f"injected failure after {step}.*deleted the group, its instances, the template"):
        provider.create(recover_spec(store_url))
    assert nothing_left(ec2, autoscaling, iam)


@pytest.mark.parametrize(
    ("recover", "overrides", "message"),
    [
        ("yes", {}, "aws option recover must be a mapping"),
        ({"max_restarts": -1}, {}, "recover.max_restarts must be a whole number >= 0, got -1"),
        ({"max_restarts": 1, "max_hours": 0}, {}, "recover.max_hours must be a positive number"),
        ({"max_restarts": 1, "retries": 2}, {}, "unknown key 'retries' in aws option recover"),
        ({"max_restarts": 1, "on_demand_fallback": "no"}, {}, "on_demand_fallback must be true or false"),
        ({"max_restarts": 1, "instance_types": ["g5.xlarge", "g9.huge"]}, {}, "instance type 'g9.huge' is not offered"),
        ({"max_restarts": 1}, {"options": {"run_credentials": False}}, "recover needs the run's own IAM role"),
        ({"max_restarts": 1}, {"run_url": None, "store_url": None}, "recover needs a run"),
    ],
)
def test_preflight_refuses_bad_input_before_anything_is_created(
    provider, ec2, autoscaling, iam, store_url, recover, overrides, message
) -> None:
    spec = recover_spec(store_url, recover=recover, **overrides)
    with pytest.raises(ConfigError, match=message) as error:
        provider.create(spec)
    assert "\n" not in str(error.value)
    assert nothing_left(ec2, autoscaling, iam)


def test_preflight_refuses_a_region_without_subnets(provider, ec2, autoscaling, iam, store_url) -> None:
    for subnet in ec2.describe_subnets()["Subnets"]:
        ec2.delete_subnet(SubnetId=subnet["SubnetId"])
    with pytest.raises(ConfigError, match="no default subnets for the run's Auto Scaling group"):
        provider.create(recover_spec(store_url))
    assert nothing_left(ec2, autoscaling, iam)


def test_the_run_role_may_end_its_own_group_and_template_only(store_url) -> None:
    run_url = run_url_in(store_url, RUN_ID)
    plain = run_role_for(run_url, {})
    role = run_role_for(run_url, {}, recovery=True)
    extra = [s for s in role.policy["Statement"] if s not in plain.policy["Statement"]]
    assert {s["Action"] for s in extra} == {"autoscaling:DeleteAutoScalingGroup", "ec2:DeleteLaunchTemplate"}
    by_action = {s["Action"]: s for s in extra}
    assert by_action["autoscaling:DeleteAutoScalingGroup"]["Resource"].endswith(f":autoScalingGroupName/{role.name}")
    assert "Condition" not in by_action["autoscaling:DeleteAutoScalingGroup"]
    assert by_action["ec2:DeleteLaunchTemplate"]["Condition"] == {
        "StringEquals": {f"aws:ResourceTag/{TAG_RECOVERY_GROUP}": role.name}
    }
    assert all(s["Effect"] == "Allow" and "*" not in s["Action"] for s in role.policy["Statement"])


def test_the_instance_deletes_its_group_when_the_run_is_over(provider, ec2, autoscaling, iam, store_url, monkeypatch) -> None:
    instance = provider.create(recover_spec(store_url))
    name = instance.details["recovery_group"]
    monkeypatch.setenv(RECOVERY_GROUP_ENV, name)  # what the boot script exports on the instance
    provider.release_from_agent(instance.id, run_over=False)  # a restart is due: the group stays
    assert name in groups(autoscaling)
    provider.release_from_agent(instance.id)
    assert not groups(autoscaling) and not templates(ec2) and not not_terminated(ec2)
    assert run_roles(iam) == [name]  # the role cannot delete itself: gc does, the group being gone
    report = collect_garbage(provider, yes=True, boot_grace_s=0)
    assert [(c.name, c.deleted) for c in report.credentials] == [(name, True)]
    assert nothing_left(ec2, autoscaling, iam)


@pytest.mark.slow
def test_gc_deletes_the_group_of_an_ended_run_and_keeps_a_live_one(provider, ec2, autoscaling, iam, store_url, s3) -> None:
    ended = provider.create(recover_spec(store_url, run_id="ended-1"))
    live = provider.create(recover_spec(store_url, run_id="live-1"))
    capped = provider.create(recover_spec(store_url, run_id="capped-1"))
    for run_id, phase in (("ended-1", JobPhase.SUCCEEDED), ("live-1", JobPhase.RUNNING), ("capped-1", JobPhase.RUNNING)):
        JobStore(run_url_in(store_url, run_id)).write_state(JobState(run_id=run_id, phase=phase, updated_at=utc_now()))
    names = {i.run_id: i.details["recovery_group"] for i in (ended, live, capped)}
    # what the lifetime's scheduled action does at max_hours (moto stores it, never runs it)
    autoscaling.update_auto_scaling_group(AutoScalingGroupName=names["capped-1"], MinSize=0, MaxSize=0, DesiredCapacity=0)
    wait_until(lambda: not live_in_group(ec2, names["capped-1"]), what="the capped run's instance to go")

    listed = find_garbage(provider, boot_grace_s=0)
    verdicts = {g.run_id: (g.garbage, g.reason) for g in listed.groups}
    assert verdicts == {
        "ended-1": (True, "run ended (succeeded)"),
        "live-1": (False, "run is running"),
        "capped-1": (True, "its lifetime (max hours) emptied it"),
    }
    assert {c.run_id: c.garbage for c in listed.credentials} == {"ended-1": True, "live-1": False, "capped-1": True}
    assert set(groups(autoscaling)) == set(names.values())  # listing changes nothing
    table = trainctl("gc", "--provider", "aws", "--grace-minutes", "0", env={**s3.env(), "COLUMNS": "250"})
    assert table.returncode == 0, table.stderr
    assert f"recovery group {names['ended-1']}: garbage (run ended (succeeded))" in table.stdout
    assert f"recovery group {names['live-1']}: keep (run is running)" in table.stdout

    report = collect_garbage(provider, yes=True, boot_grace_s=0)
    assert sorted(g["run_id"] for g in report.to_dict()["groups"] if g["deleted"]) == ["capped-1", "ended-1"]
    kept = names["live-1"]
    assert set(groups(autoscaling)) == set(templates(ec2)) == {kept} and run_roles(iam) == [kept]
    assert not_terminated(ec2) == [live.id]


def test_gc_deletes_a_template_left_without_its_group(provider, ec2, autoscaling, iam, store_url) -> None:
    instance = provider.create(recover_spec(store_url, run_id="orphan-1"))
    name = instance.details["recovery_group"]
    autoscaling.delete_auto_scaling_group(AutoScalingGroupName=name, ForceDelete=True)
    assert [g.garbage for g in find_garbage(provider).groups] == [False]  # young: a launch may be under way
    report = collect_garbage(provider, yes=True, boot_grace_s=0)
    assert [(g.name, g.reason, g.deleted) for g in report.groups] == [(name, "a template whose group is gone", True)]
    assert nothing_left(ec2, autoscaling, iam)


def test_launch_with_recover_builds_the_group_and_terminate_ends_it(
    provider, ec2, autoscaling, iam, store_url, tmp_path, monkeypatch
) -> None:
    """`trainctl launch --provider aws --recover`: the launch plan carries the run's policy to the
    provider, which builds the group; the job spec carries it to the instances."""
    from trainctl_lightning import launch as api

    monkeypatch.setattr(AWSProvider, "instances_distribution", False)  # moto 5.2: 500 on InstancesDistribution
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("print('hi')\n")
    monkeypatch.chdir(project)
    image = moto_ami(ec2)

    with pytest.raises(ConfigError, match="omit --instance"):  # an existing instance cannot be replaced by AWS
        api.launch("train.py", provider="aws", store=store_url, instance="i-0123456789abcdef0", recover=True, detach=True)
    assert nothing_left(ec2, autoscaling, iam)

    run = api.launch(
        "train.py",
        provider="aws",
        store=store_url,
        image=image,
        instance_type="g5.xlarge",
        recover=True,
        max_restarts=2,
        detach=True,
    )
    [name] = groups(autoscaling)
    assert tags_of_group(groups(autoscaling)[name])[TAG_RUN_ID] == run.run_id
    assert name in templates(ec2)
    spec = JobStore(run.run_url).read_spec()
    assert spec.recover is not None and spec.recover.max_restarts == 2
    api.terminate(run.instance_id)
    wait_until(lambda: nothing_left(ec2, autoscaling, iam), what="the group, template, role and instance to go")


def tags_of_group(group: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in group.get("Tags", [])}
