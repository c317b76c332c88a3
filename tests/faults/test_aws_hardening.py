"""AWS faults and hostile inputs, against moto's server: limits that are not finite, no security
group to launch into, and per-run credentials (what an instance may touch, and that nothing of
them outlives the run). Each refusal is one line and leaves nothing created."""

from __future__ import annotations

import math
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.helpers.aws import moto_ami, not_terminated, raw_instances, trainctl_security_group
from trainctl_lightning import runkey
from trainctl_lightning.config import Settings, read_config_file
from trainctl_lightning.errors import ConfigError, ProviderError
from trainctl_lightning.gc import collect_garbage
from trainctl_lightning.jobs.spec import JobPhase, JobSpec, JobState
from trainctl_lightning.jobs.store import JobStore
from trainctl_lightning.providers.api import AgentLaunch, InstanceSpec
from trainctl_lightning.providers.aws import AWSProvider
from trainctl_lightning.providers.aws_bootstrap import render_user_data
from trainctl_lightning.providers.aws_run_role import RUN_KEY_PARAMETER_ENV, RUN_ROLE_PATH, run_key_parameter
from trainctl_lightning.providers.aws_setup import setup_aws
from trainctl_lightning.store.layout import run_url_in
from trainctl_lightning.timeutil import utc_now

BAD_LIMITS = [math.inf, -math.inf, math.nan, 0, -1]


@pytest.fixture
def ec2(s3):
    return s3.server.client("ec2")


@pytest.fixture
def iam(s3):
    return s3.server.client("iam")


@pytest.fixture
def ami(ec2) -> str:
    return moto_ami(ec2)


@pytest.fixture
def provider(s3, ami) -> AWSProvider:
    return AWSProvider(endpoint_url=s3.endpoint, ami_resolver=lambda region: ami)


@pytest.fixture
def store_url(s3) -> str:
    return f"s3://{s3.bucket}/store"


@pytest.fixture
def set_up(s3):
    return setup_aws(s3.bucket, endpoint_url=s3.endpoint)


def run_spec(store_url: str, run_id: str = "mnist-20250101-120000-ab12", **overrides: Any) -> InstanceSpec:
    fields = {"run_url": run_url_in(store_url, run_id), "store_url": store_url, "instance_type": "g5.xlarge"}
    return InstanceSpec(**{"max_runtime_s": 3600, **fields, **overrides})


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


def run_roles(iam) -> list[str]:
    return [r["RoleName"] for r in iam.list_roles(PathPrefix=RUN_ROLE_PATH)["Roles"] if r["Path"] == RUN_ROLE_PATH]


def run_profiles(iam) -> list[str]:
    profiles = iam.list_instance_profiles(PathPrefix=RUN_ROLE_PATH)["InstanceProfiles"]
    return [p["InstanceProfileName"] for p in profiles if p["Path"] == RUN_ROLE_PATH]  # moto ignores PathPrefix


# ----------------------------------------------------------------------------- limits
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "0", "-1", "1e9"])
def test_max_hours_in_the_config_file_must_be_finite_and_positive(tmp_path, value: str) -> None:
    path = tmp_path / "trainctl.toml"
    path.write_text(f"max_hours = {value}\n[profiles.gpu]\ncode_max_mb = {value}\n")
    with pytest.raises(ConfigError) as exc:
        read_config_file(path)
    message = one_line(exc)
    assert f"{path}: max_hours = " in message and "must be a finite number > 0" in message


@pytest.mark.parametrize("value", BAD_LIMITS)
def test_limits_from_the_python_api_are_refused_before_anything_is_created(
    value: float, provider, ec2, set_up, store_url, tmp_path, monkeypatch
) -> None:
    from trainctl_lightning import launch as api

    for key in ("max_hours", "code_max_mb"):
        with pytest.raises(ConfigError) as exc:
            Settings(**{key: value})
        assert one_line(exc).startswith(f"{key} = {value!r}")
    (tmp_path / "train.py").write_text("print('hi')\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as exc:
        api.launch("train.py", provider="aws", store=store_url, max_hours=value, detach=True)
    assert f"max_hours = {value!r}" in one_line(exc)
    with pytest.raises(ConfigError, match="InstanceSpec.max_runtime_s = .* must be a finite number of seconds > 0"):
        provider.create(run_spec(store_url, max_runtime_s=value))
    with pytest.raises(ConfigError, match="max_runtime_s = .* finite"):
        render_user_data("s3://b/store/run-1", max_runtime_s=value)
    for name in ("max_runtime_s", "stop_grace_s", "heartbeat_interval_s", "log_interval_s", "launcher_grace_s"):
        with pytest.raises(ConfigError, match=f"JobSpec.{name} = "):
            JobSpec(run_id="r-1", run_url="s3://b/r-1", created_at=utc_now(), module="m", **{name: value})
    assert raw_instances(ec2) == []


# ----------------------------------------------------------------------------- security groups
def test_no_tagged_security_group_is_one_line_saying_run_aws_setup(provider, ec2) -> None:
    with pytest.raises(ConfigError) as exc:
        provider.create(InstanceSpec())
    message = one_line(exc)
    assert "no trainctl security group in the default VPC" in message and "`trainctl aws setup --bucket BUCKET`" in message
    assert "never falls back to the VPC's default group" in message
    assert raw_instances(ec2) == []


def test_a_subnet_in_a_vpc_without_the_group_is_refused_and_names_the_vpc(provider, ec2) -> None:
    trainctl_security_group(ec2)  # in the default VPC only
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.9.1.0/24")["Subnet"]["SubnetId"]
    with pytest.raises(ConfigError) as exc:
        provider.create(InstanceSpec(options={"subnet_id": subnet}))
    message = one_line(exc)
    assert f"subnet {subnet}'s VPC {vpc}" in message and f"--vpc-id {vpc}" in message
    with pytest.raises(ConfigError, match="subnet_id='subnet-0000000000000dead' is not a subnet in us-east-1"):
        provider.create(InstanceSpec(options={"subnet_id": "subnet-0000000000000dead"}))
    assert raw_instances(ec2) == []

    group = trainctl_security_group(ec2, vpc)
    instance = provider.create(InstanceSpec(options={"subnet_id": subnet}))
    [raw] = raw_instances(ec2)
    assert [g["GroupId"] for g in raw["SecurityGroups"]] == [group] and raw["SubnetId"] == subnet
    provider.terminate(instance.id)


# ----------------------------------------------------------------------------- the _dist wheel
def test_an_s3_wheel_without_its_sha256_is_refused(provider, ec2, set_up, store_url) -> None:
    wheel = f"{store_url}/_dist/x/trainctl_lightning-0.1.0-py3-none-any.whl"
    with pytest.raises(ConfigError) as exc:
        provider.create_dryrun(run_spec(store_url, options={"install": wheel}))
    assert "give its install_sha256" in one_line(exc)
    with pytest.raises(ConfigError, match="install_sha256"):
        provider.create_dryrun(run_spec(store_url, options={"install": wheel, "install_sha256": "abc"}))
    plan = provider.create_dryrun(run_spec(store_url, options={"install": wheel, "install_sha256": "ab" * 32}))
    assert "INSTALL_SHA256=" + "ab" * 32 in (plan.user_data or "")
    assert any("only if its sha256 is abababab" in r for r in plan.resources)
    assert raw_instances(ec2) == []


# ----------------------------------------------------------------------------- per-run credentials
def test_each_run_gets_a_role_scoped_to_its_own_objects(provider, ec2, iam, set_up, store_url, s3) -> None:
    spec = run_spec(store_url, run_id="scoped-1")
    plan = provider.create_dryrun(spec)
    assert plan.run_role is not None and any("for this run only" in r for r in plan.resources)
    assert run_roles(iam) == []  # the dry run created nothing

    instance = provider.create(spec)
    [raw] = raw_instances(ec2)
    [role] = run_roles(iam)
    assert role == plan.run_role.name and len(role) <= 64
    assert raw["IamInstanceProfile"]["Arn"].endswith(f"instance-profile{RUN_ROLE_PATH}{role}")
    tags = {t["Key"]: t["Value"] for t in iam.list_role_tags(RoleName=role)["Tags"]}
    assert tags["trainctl:run-id"] == "scoped-1" and tags["trainctl:store"] == store_url

    [policy_name] = iam.list_role_policies(RoleName=role)["PolicyNames"]
    document = iam.get_role_policy(RoleName=role, PolicyName=policy_name)["PolicyDocument"]
    writes = {
        r for st in document["Statement"] if "s3:PutObject" in st["Action"] for r in [st["Resource"]]
    }  # fmt: skip
    assert writes == {f"arn:aws:s3:::{s3.bucket}/store/scoped-1/*"}
    reads = {
        r
        for st in document["Statement"]
        if st["Action"] == "s3:GetObject"
        for r in (st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]])
    }
    assert reads == {f"arn:aws:s3:::{s3.bucket}/store/_code/blobs/*", f"arn:aws:s3:::{s3.bucket}/store/_dist/*"}
    deletes = [st for st in document["Statement"] if "s3:DeleteObject" in st["Action"]]
    assert [st["Resource"] for st in deletes] == [f"arn:aws:s3:::{s3.bucket}/store/scoped-1/*"]
    others = [
        (st["Action"], st["Resource"])
        for st in document["Statement"]
        if not all(a.startswith("s3:") for a in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"]))
    ]
    assert others == [("ssm:GetParameter", f"arn:aws:ssm:*:*:parameter{run_key_parameter(role)}")]  # its own key only

    provider.terminate(instance.id)  # the end of the run: its credentials go with it
    assert run_roles(iam) == [] and run_profiles(iam) == []


def test_a_failed_launch_deletes_the_runs_role(provider, ec2, iam, set_up, store_url) -> None:
    provider._fail_after = "wait_visible"
    with pytest.raises(ProviderError, match="failed at wait_visible"):
        provider.create(run_spec(store_url, run_id="failed-1"))
    assert not_terminated(ec2) == [] and run_roles(iam) == [] and run_profiles(iam) == []


def test_run_instances_waits_for_a_new_instance_profile_to_propagate(provider, ec2, iam, set_up, store_url, monkeypatch) -> None:
    """Real IAM takes seconds to show a new profile to EC2: RunInstances says "Invalid IAM Instance Profile"."""
    real_client = provider.client
    refusals = []

    class NotYetVisible:
        def __init__(self, client):
            self._client = client

        def __getattr__(self, name):
            return getattr(self._client, name)

        def run_instances(self, **kwargs):
            if len(refusals) < 2:
                refusals.append(kwargs["IamInstanceProfile"])
                error = {
                    "Code": "InvalidParameterValue",
                    "Message": "Value (x) for parameter iamInstanceProfile.arn is invalid. Invalid IAM Instance Profile ARN",
                }
                raise ClientError({"Error": error}, "RunInstances")
            return self._client.run_instances(**kwargs)

    monkeypatch.setattr(
        provider,
        "client",
        lambda service, region=None: (
            NotYetVisible(real_client(service, region)) if service == "ec2" else real_client(service, region)
        ),
    )
    instance = provider.create(run_spec(store_url, run_id="slow-iam-1"))
    assert len(refusals) == 2 and instance.id in not_terminated(ec2)
    provider.terminate(instance.id)

    # a profile that never shows up: bounded, one line, nothing left behind
    refusals.clear()
    provider.profile_wait_s = 0.5
    with pytest.raises(ProviderError, match="Invalid IAM Instance Profile"):
        provider.create(run_spec(store_url, run_id="never-iam-1"))
    assert run_roles(iam) == [] and not_terminated(ec2) == []


def test_gc_deletes_the_role_of_a_run_whose_instance_powered_itself_off(provider, ec2, iam, set_up, store_url) -> None:
    done = provider.create(run_spec(store_url, run_id="done-1"))
    live = provider.create(run_spec(store_url, run_id="live-1"))
    JobStore(run_url_in(store_url, "live-1")).write_state(JobState(run_id="live-1", phase=JobPhase.RUNNING, updated_at=utc_now()))
    ec2.terminate_instances(InstanceIds=[done.id])  # shutdown -h now on the instance: trainctl was not told
    assert len(run_roles(iam)) == 2

    listed = collect_garbage(provider, boot_grace_s=0)
    verdicts = {c.run_id: c for c in listed.credentials}
    assert verdicts["done-1"].garbage and not verdicts["live-1"].garbage
    assert len(run_roles(iam)) == 2  # only listed

    young = collect_garbage(provider, yes=True)  # inside the grace: a launch may still be making it
    assert not any(c.deleted for c in young.credentials) and len(run_roles(iam)) == 2

    report = collect_garbage(provider, yes=True, boot_grace_s=0)
    assert [c.run_id for c in report.credentials if c.deleted] == ["done-1"]
    assert [r for r in run_roles(iam)] == [verdicts["live-1"].name]
    assert live.id in not_terminated(ec2)
    provider.terminate(live.id)
    assert run_roles(iam) == [] and run_profiles(iam) == []


def test_an_explicit_instance_profile_or_run_credentials_false_uses_the_shared_one(provider, ec2, iam, set_up, store_url) -> None:
    plan = provider.create_dryrun(run_spec(store_url, options={"run_credentials": False}))
    assert plan.run_role is None and plan.request["IamInstanceProfile"] == {"Name": "trainctl-lightning-instance"}
    assert any("shared: every run in the store" in r for r in plan.resources)
    plan = provider.create_dryrun(run_spec(store_url, options={"iam_instance_profile": "mine"}))
    assert plan.run_role is None and plan.request["IamInstanceProfile"] == {"Name": "mine"}
    assert run_roles(iam) == []


def user_data_of(ec2, instance_id: str) -> str:
    import base64

    value = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")["UserData"]["Value"]
    return base64.b64decode(value).decode()


def test_the_run_key_reaches_the_instance_through_a_parameter_only_its_role_can_read(
    provider, ec2, iam, set_up, store_url, s3, monkeypatch
) -> None:
    """Not the store, not the user data: an SSM SecureString named in the user data, deleted with the role."""
    ssm = s3.server.client("ssm")
    spec = run_spec(store_url, run_id="keyed-1")
    instance = provider.create(spec)
    [role] = run_roles(iam)
    key = runkey.new_key()
    provider.start_agent(instance, AgentLaunch(run_id="keyed-1", run_url=spec.run_url or "", run_key=key))

    parameter = ssm.get_parameter(Name=run_key_parameter(role), WithDecryption=True)["Parameter"]
    assert parameter["Type"] == "SecureString" and parameter["Value"] == key
    user_data = user_data_of(ec2, instance.id)
    assert key not in user_data and f"{RUN_KEY_PARAMETER_ENV}={run_key_parameter(role)}" in user_data
    objects = s3.server.client().list_objects_v2(Bucket=s3.bucket).get("Contents", [])
    for obj in objects:  # nothing in the store
        assert key.encode() not in s3.server.client().get_object(Bucket=s3.bucket, Key=obj["Key"])["Body"].read()

    # on the instance: the agent reads it from the parameter its boot script names
    monkeypatch.setenv(RUN_KEY_PARAMETER_ENV, run_key_parameter(role))
    assert provider.fetch_run_key() == key

    provider.terminate(instance.id)
    assert run_roles(iam) == []
    with pytest.raises(ClientError, match="ParameterNotFound"):
        ssm.get_parameter(Name=run_key_parameter(role))
    monkeypatch.setenv("TRAINCTL_RUN_KEY_WAIT_S", "0")
    with pytest.raises(ProviderError, match="is not in SSM parameter") as exc:
        provider.fetch_run_key()
    one_line(exc)


def test_with_the_shared_profile_the_key_is_not_handed_out(provider, ec2, iam, set_up, store_url, s3, caplog) -> None:
    """Every instance of the shared role could read it, so it would prove nothing: remote calls are refused instead."""
    spec = run_spec(store_url, run_id="shared-1", options={"run_credentials": False})
    instance = provider.create(spec)
    provider.start_agent(instance, AgentLaunch(run_id="shared-1", run_url=spec.run_url or "", run_key=runkey.new_key()))
    assert s3.server.client("ssm").describe_parameters()["Parameters"] == []
    assert "cannot reach it privately" in caplog.text
    assert RUN_KEY_PARAMETER_ENV not in user_data_of(ec2, instance.id)
    provider.terminate(instance.id)
