"""The AWS provider against moto's server (EC2, SSM, IAM and S3 on one local endpoint).

What a user would check in the console after a launch: the instance and its volumes carry our
tags, it terminates when it powers off, spot is one-time, IMDSv2 is required, the user data
would run the agent for the run; plus everything that must never happen: an untagged instance
touched, an instance left running after a failed launch, a launch without credentials.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import fsspec
import pytest

from tests.helpers import wait_until
from tests.helpers.aws import trainctl_security_group
from tests.helpers.provider_contract import ProviderContract
from trainctl_lightning.errors import (
    ConfigError,
    InstanceNotFoundError,
    ProviderError,
    StoreError,
)
from trainctl_lightning.gc import (
    classify,
    collect_garbage,
    find_garbage,
)
from trainctl_lightning.jobs.spec import EnvMode, JobPhase, JobSpec, JobState
from trainctl_lightning.jobs.store import JobStore
from trainctl_lightning.providers import get_provider
from trainctl_lightning.providers.api import (
    AgentLaunch,
    InstanceSpec,
    InstanceState,
)
from trainctl_lightning.providers.aws import (
    DLAMI_PARAMETER,
    LAUNCH_STEPS,
    AWSProvider,
    explain_aws_error,
)
from trainctl_lightning.providers.aws_bootstrap import USER_DATA_LIMIT, render_user_data
from trainctl_lightning.providers.aws_setup import ROLE_NAME, setup_aws
from trainctl_lightning.store.layout import (
    TAG_MANAGED_BY,
    TAG_RUN_ID,
    TAG_STORE,
    run_url_in,
)
from trainctl_lightning.timeutil import utc_now

TRAINCTL = [sys.executable, "-m", "trainctl_lightning.cli.app"]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture
def ec2(s3):
    """A raw EC2 client on the (freshly reset) moto server: what the AWS console would show."""
    return s3.server.client("ec2")


@pytest.fixture
def ami(ec2) -> str:
    """One of moto's Ubuntu images (asking for all 1,300 takes seconds)."""
    images = ec2.describe_images(Owners=["amazon"], Filters=[{"Name": "name", "Values": ["ubuntu/images/*"]}])["Images"]
    return images[0]["ImageId"]


@pytest.fixture
def security_group(ec2) -> str:
    """The security group `trainctl aws setup` makes: no instance launches without one."""
    return trainctl_security_group(ec2)


@pytest.fixture
def provider(s3, ami, security_group) -> AWSProvider:
    return AWSProvider(endpoint_url=s3.endpoint, ami_resolver=lambda region: ami)


@pytest.fixture
def store_url(s3) -> str:
    return f"s3://{s3.bucket}/store"


@pytest.fixture
def set_up(s3):
    """``trainctl aws setup`` done for the test bucket: the instance profile exists."""
    return setup_aws(s3.bucket, endpoint_url=s3.endpoint)


def run_spec(store_url: str, run_id: str = "mnist-20250101-120000-ab12", **overrides) -> InstanceSpec:
    fields = {"run_url": run_url_in(store_url, run_id), "store_url": store_url}
    return InstanceSpec(**{"instance_type": "g5.xlarge", "max_runtime_s": 3600, **fields, **overrides})


def raw_instances(ec2) -> list[dict]:
    """Every instance on the server, tagged or not."""
    return [i for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]]


def not_terminated(ec2) -> list[str]:
    return [i["InstanceId"] for i in raw_instances(ec2) if i["State"]["Name"] not in ("terminated", "shutting-down")]


def tags_of(raw: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in raw.get("Tags", [])}


def untagged_instance(ec2, ami: str) -> str:
    """An instance someone made by hand in the same account: trainctl must never see or touch it."""
    return ec2.run_instances(ImageId=ami, InstanceType="g5.xlarge", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]


# ----------------------------------------------------------------------------- the contract
class TestAWSProvider(ProviderContract):
    runs_jobs = False
    unknown_instance_id = "i-0123456789abcdef0"


# ----------------------------------------------------------------------------- create
def test_on_demand_launch_is_what_the_plan_said(provider, ec2, set_up, store_url):
    spec = run_spec(store_url, disk_gb=150, tags={"team": "vision"})
    plan = provider.create_dryrun(spec)
    assert not raw_instances(ec2)  # the dry run created nothing
    assert plan.price_per_hour == pytest.approx(1.006) and "$1.006/hour" in plan.describe()
    assert "UserData" in plan.request and "agent" not in json.dumps(plan.request["UserData"])

    instance = provider.create(spec)
    raw = raw_instances(ec2)[0]
    assert instance.id == raw["InstanceId"] and instance.state.is_usable() and not instance.spot
    assert instance.price_per_hour == pytest.approx(1.006)
    assert raw["InstanceType"] == "g5.xlarge" and "InstanceLifecycle" not in raw
    assert raw["MetadataOptions"]["HttpTokens"] == "required"
    # its own role, for this run only (tests/faults/test_aws_hardening.py checks what it may do)
    assert f":instance-profile/trainctl/runs/trainctl-run-{instance.run_id}-" in raw["IamInstanceProfile"]["Arn"]
    assert [g["GroupId"] for g in raw["SecurityGroups"]] == [set_up.security_group_id]
    behaviour = ec2.describe_instance_attribute(InstanceId=instance.id, Attribute="instanceInitiatedShutdownBehavior")
    assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    volume = ec2.describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": [instance.id]}])["Volumes"][0]
    assert volume["Size"] == 150


def test_spot_is_one_time_and_cannot_be_stopped(provider, ec2, set_up, store_url):
    plan = provider.create_dryrun(run_spec(store_url, spot=True))
    assert plan.request["InstanceMarketOptions"] == {
        "MarketType": "spot",
        "SpotOptions": {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"},
    }
    assert "spot-instances-request" in [t["ResourceType"] for t in plan.request["TagSpecifications"]]
    instance = provider.create(plan.spec)
    assert instance.spot and raw_instances(ec2)[0]["InstanceLifecycle"] == "spot"
    with pytest.raises(ProviderError, match="one-time spot instance.*cannot stop"):
        provider.stop(instance.id)
    assert provider.describe(instance.id).state.is_usable()
    assert provider.terminate(instance.id).state in (InstanceState.TERMINATED, InstanceState.TERMINATING)


def test_instance_and_volumes_carry_our_tags(provider, ec2, set_up, store_url):
    instance = provider.create(run_spec(store_url, tags={"team": "vision"}, name="mnist"))
    raw = raw_instances(ec2)[0]
    expected = {
        TAG_MANAGED_BY: "trainctl-lightning",
        TAG_RUN_ID: "mnist-20250101-120000-ab12",
        TAG_STORE: store_url,
        "team": "vision",
        "Name": "mnist",
    }
    assert expected.items() <= tags_of(raw).items()
    assert "trainctl:owner" in tags_of(raw)
    volumes = ec2.describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": [instance.id]}])["Volumes"]
    assert volumes and all(expected.items() <= tags_of(v).items() for v in volumes)


def test_user_data_runs_the_agent_for_the_run_and_fits_ec2s_limit(provider, ec2, set_up, store_url):
    spec = run_spec(store_url, env={"WANDB_PROJECT": "mnist"})
    plan = provider.create_dryrun(spec)
    instance = provider.create(spec)
    encoded = ec2.describe_instance_attribute(InstanceId=instance.id, Attribute="userData")["UserData"]["Value"]
    script = base64.b64decode(encoded).decode()
    assert len(script.encode()) == plan.request["UserData"]["bytes"] < USER_DATA_LIMIT
    run_url = spec.run_url
    assert script.startswith("#!/bin/bash")
    assert f"RUN_URL={run_url}" in script
    assert '-m trainctl_lightning.agent run --run-url "$RUN_URL" --workdir "$WORKDIR"' in script
    assert "MAX_RUNTIME_MIN=60" in script and 'SHUTDOWN_CMD -h "+$MAX_RUNTIME_MIN"' in script
    assert "trap power_off EXIT" in script
    assert "export WANDB_PROJECT=mnist" in script and "export AWS_DEFAULT_REGION=us-east-1" in script
    assert "testing" not in script  # the launcher's credentials never reach the instance


def test_an_instance_without_max_runtime_still_gets_the_default_cap(provider, ec2, set_up, store_url):
    plan = provider.create_dryrun(run_spec(store_url, max_runtime_s=None))
    assert any("24.00 h after boot (the default cap" in r for r in plan.resources)
    instance = provider.create(run_spec(store_url, max_runtime_s=None))
    encoded = ec2.describe_instance_attribute(InstanceId=instance.id, Attribute="userData")["UserData"]["Value"]
    assert "MAX_RUNTIME_MIN=1440" in base64.b64decode(encoded).decode()


def test_user_data_over_16_kb_is_refused_before_launch(provider, ec2, set_up, store_url):
    with pytest.raises(ConfigError, match="16384-byte user-data limit"):
        provider.create(run_spec(store_url, env={"BIG": "x" * 20000}))
    assert not raw_instances(ec2)


def test_default_image_comes_from_the_deep_learning_ami_parameter(s3, ami, ec2, security_group):
    ssm = s3.server.client("ssm")
    # moto reserves /aws/..., as AWS does: the parameter name is configurable for that reason
    ssm.put_parameter(Name="/trainctl-test/dlami/ami-id", Value=ami, Type="String")
    provider = AWSProvider(endpoint_url=s3.endpoint, ami_parameter="/trainctl-test/dlami/ami-id")
    assert provider.create_dryrun(InstanceSpec()).request["ImageId"] == ami
    assert AWSProvider(endpoint_url=s3.endpoint).ami_parameter == DLAMI_PARAMETER
    with pytest.raises(ConfigError, match="no AMI in SSM parameter /nope.*--image"):
        AWSProvider(endpoint_url=s3.endpoint, ami_parameter="/nope").create_dryrun(InstanceSpec())
    with pytest.raises(ConfigError, match="AMI 'ami-00000000deadbeef' does not exist in us-east-1"):
        provider.create(InstanceSpec(image="ami-00000000deadbeef"))
    assert not raw_instances(ec2)


# ----------------------------------------------------------------------------- preflight
def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_unknown_instance_type_names_close_gpu_types(provider, ec2):
    with pytest.raises(ConfigError) as exc:
        provider.create(InstanceSpec(instance_type="g5.xlargee"))
    message = _one_line(exc)
    assert "'g5.xlargee' is not offered in us-east-1" in message and "g5.xlarge" in message
    assert not raw_instances(ec2)


def test_missing_credentials_is_one_line_and_creates_nothing(provider, ec2, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError) as exc:
        provider.create(InstanceSpec())
    assert "no AWS credentials" in _one_line(exc) and "AWS_PROFILE" in str(exc.value)
    assert not raw_instances(ec2)


def test_missing_region_says_boto3_ignores_aws_region(s3, ami, ec2, monkeypatch):
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    provider = AWSProvider(endpoint_url=s3.endpoint, ami_resolver=lambda region: ami)
    with pytest.raises(ConfigError) as exc:
        provider.create(InstanceSpec())
    message = _one_line(exc)
    assert "AWS_DEFAULT_REGION" in message and "--region" in message and "ignores AWS_REGION" in message
    assert not raw_instances(ec2)


def test_unknown_profile_is_one_line(s3):
    with pytest.raises(ConfigError) as exc:
        AWSProvider(profile="no-such-profile", endpoint_url=s3.endpoint).create_dryrun(InstanceSpec())
    assert "'no-such-profile'" in _one_line(exc)


def test_bad_options_and_secrets_are_refused(provider, ec2, store_url):
    with pytest.raises(ConfigError, match="unknown aws option 'subnet'.*did you mean 'subnet_id'"):
        provider.create_dryrun(InstanceSpec(options={"subnet": "subnet-1"}))
    with pytest.raises(ConfigError, match="security_group_ids must be a list of sg-"):
        provider.create_dryrun(InstanceSpec(options={"security_group_ids": ["default"]}))
    with pytest.raises(ConfigError, match="run_url as an s3:// URL"):
        provider.create_dryrun(InstanceSpec(run_url="file:///tmp/run"))
    with pytest.raises(ConfigError, match="WANDB_API_KEY looks like a secret"):
        provider.create_dryrun(InstanceSpec(env={"WANDB_API_KEY": "x"}))
    # a run with the shared profile needs it to read the store: without `aws setup`, say so
    with pytest.raises(ConfigError, match="trainctl aws setup"):
        provider.create_dryrun(run_spec(store_url, options={"run_credentials": False}))
    with pytest.raises(ConfigError, match="run_credentials must be true or false"):
        provider.create_dryrun(run_spec(store_url, options={"run_credentials": "yes"}))
    assert not raw_instances(ec2)


def test_aws_errors_say_what_to_do():
    from botocore.exceptions import ClientError

    def error(code: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "m"}}, "RunInstances")

    assert isinstance(explain_aws_error(error("AuthFailure"), "launch"), ConfigError)
    assert "on-demand instead of spot" in str(explain_aws_error(error("InsufficientInstanceCapacity"), "launch", "us-east-1"))
    assert "Service Quotas" in str(explain_aws_error(error("VcpuLimitExceeded"), "launch"))
    assert "need that permission" in str(explain_aws_error(error("UnauthorizedOperation"), "launch"))


def test_store_preflight(provider, store_url):
    provider.check_store(store_url)
    with pytest.raises(ConfigError, match="s3://"):
        provider.check_store("file:///tmp/store")
    with pytest.raises(StoreError, match="does not exist"):
        provider.check_store("s3://no-such-bucket-here/store")


# ----------------------------------------------------------------------------- list, stop, terminate
def test_only_tagged_instances_are_listed_or_touched(provider, ec2, ami):
    ours = provider.create(InstanceSpec())
    theirs = untagged_instance(ec2, ami)
    assert [i.id for i in provider.list(include_terminated=True)] == [ours.id]
    for call in (provider.describe, provider.stop, provider.terminate):
        with pytest.raises(InstanceNotFoundError, match=theirs):
            call(theirs)
    assert theirs in not_terminated(ec2)


def test_list_is_newest_first_and_hides_terminated(provider, ec2):
    first = provider.create(InstanceSpec(name="first"))
    # moto keeps launch times to the second: launch the second instance in a later second, so
    # newest first is a real order, and not the order EC2 returns them in (oldest first)
    first_launched = datetime.fromisoformat(provider.describe(first.id).created_at)
    wait_until(lambda: datetime.now(timezone.utc).replace(microsecond=0) > first_launched, timeout=5, what="the next second")
    second = provider.create(InstanceSpec(name="second"))
    assert provider.describe(second.id).created_at > provider.describe(first.id).created_at
    assert [i["InstanceId"] for i in raw_instances(ec2)] == [first.id, second.id]  # so an unsorted list() fails
    assert [i.id for i in provider.list()] == [second.id, first.id]
    provider.terminate(first.id)
    assert [i.id for i in provider.list()] == [second.id]
    assert provider.describe(first.id).state is InstanceState.TERMINATED


def test_stop_keeps_the_instance_and_refuses_a_terminated_one(provider):
    instance = provider.create(InstanceSpec())
    assert provider.stop(instance.id).state in (InstanceState.STOPPING, InstanceState.STOPPED)
    assert provider.stop(instance.id).state in (InstanceState.STOPPING, InstanceState.STOPPED)  # again: same
    provider.terminate(instance.id)
    with pytest.raises(ProviderError, match="terminated"):
        provider.stop(instance.id)


# ----------------------------------------------------------------------------- cleanup
@pytest.mark.parametrize("step", LAUNCH_STEPS)
def test_a_failed_launch_terminates_what_it_created(provider, ec2, set_up, store_url, step):
    provider._fail_after = step
    with pytest.raises(ProviderError) as exc:
        provider.create(run_spec(store_url))
    created = [i["InstanceId"] for i in raw_instances(ec2)]
    assert len(created) == 1
    assert f"failed at {step}" in str(exc.value) and f"terminated {created[0]}" in str(exc.value)
    assert not_terminated(ec2) == []


def test_a_failed_cleanup_names_the_instance_to_delete_by_hand(provider, ec2, monkeypatch):
    real_client = provider.client

    class TerminateRefused:
        def __init__(self, client):
            self._client = client

        def __getattr__(self, name):
            return getattr(self._client, name)

        def terminate_instances(self, **kwargs):
            raise ProviderError("AWS said no")

    monkeypatch.setattr(provider, "client", lambda service, region=None: TerminateRefused(real_client(service, region)))
    provider._fail_after = "wait_visible"
    with pytest.raises(ProviderError) as exc:
        provider.create(InstanceSpec())
    [leaked] = not_terminated(ec2)
    message = str(exc.value)
    assert "terminating it failed too (AWS said no)" in message
    assert f"aws ec2 terminate-instances --region us-east-1 --instance-ids {leaked}" in message
    ec2.terminate_instances(InstanceIds=[leaked])


# ----------------------------------------------------------------------------- the agent
def test_start_agent_checks_the_run_the_instance_boots_for(provider, set_up, store_url):
    spec = run_spec(store_url)
    instance = provider.create(spec)
    run_id = instance.run_id
    provider.start_agent(instance, AgentLaunch(run_id=run_id, run_url=spec.run_url))
    other = AgentLaunch(run_id="other-run", run_url=run_url_in(store_url, "other-run"))
    with pytest.raises(ProviderError, match=f"already ran its user data for run {run_id}.*SSM"):
        provider.start_agent(instance, other)
    with pytest.raises(ConfigError, match="cannot forward WANDB_API_KEY"):
        provider.start_agent(instance, AgentLaunch(run_id=run_id, run_url=spec.run_url, forward_env={"WANDB_API_KEY": "s"}))
    bare = provider.create(InstanceSpec())
    with pytest.raises(NotImplementedError, match="AWSProvider.*SSM"):
        provider.start_agent(bare, other)
    provider.terminate(instance.id)
    with pytest.raises(ProviderError, match="terminated"):
        provider.start_agent(instance, AgentLaunch(run_id=run_id, run_url=spec.run_url))


def test_release_from_agent_runs_the_configured_power_off(tmp_path, monkeypatch):
    marker = tmp_path / "powered-off"
    AWSProvider(shutdown_command=[sys.executable, "-c", f"open({str(marker)!r}, 'w').write('x')"]).release_from_agent("i-1")
    assert marker.exists()
    monkeypatch.setenv("TRAINCTL_SHUTDOWN_CMD", f"{sys.executable} -c 'raise SystemExit(4)'")
    with pytest.raises(ProviderError, match="could not power off i-2"):
        get_provider("aws").release_from_agent("i-2")


# ----------------------------------------------------------------------------- the boot script
def _bootstrap(tmp_path: Path, script: str, python: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    path = tmp_path / "user-data.sh"
    path.write_text(script)
    log_file = tmp_path / "boot.log"
    full_env = {
        **os.environ,
        **(env or {}),
        "TRAINCTL_BOOTSTRAP_DRY": "1",
        "TRAINCTL_PYTHON": python,
        "TRAINCTL_WORKDIR": str(tmp_path / "work"),
        "TRAINCTL_BOOTSTRAP_LOG": str(log_file),
    }
    proc = subprocess.run(["bash", str(path)], env=full_env, capture_output=True, text=True, timeout=120)
    return proc.returncode, log_file.read_text()


def test_boot_script_schedules_the_cap_runs_the_agent_and_powers_off(tmp_path):
    argv_file = tmp_path / "argv.json"
    fake_python = tmp_path / "python"
    fake_python.write_text(
        f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(argv_file)!r}, 'w'))\nsys.exit(3)\n"
    )
    fake_python.chmod(fake_python.stat().st_mode | stat.S_IEXEC)
    script = render_user_data("s3://bucket/store/run-1", max_runtime_s=90 * 60, region="eu-west-1")

    rc, log = _bootstrap(tmp_path, script, str(fake_python))
    assert rc == 3  # the agent's status, after the power-off was requested
    workdir = str(tmp_path / "work")
    assert json.loads(argv_file.read_text()) == [
        "-m", "trainctl_lightning.agent", "run", "--run-url", "s3://bucket/store/run-1", "--workdir", workdir,
    ]  # fmt: skip
    cap = log.index("dry run: shutdown -h +90")
    agent = log.index("starting the agent for s3://bucket/store/run-1")
    off = log.index("dry run: shutdown -h now")
    assert cap < agent < off
    assert "agent exited with status 3" in log


def test_boot_script_runs_the_real_agent_against_the_store(tmp_path, s3, store_url):
    """The path an EC2 instance takes, minus the install: the agent runs the job and releases the instance."""
    run_id = "boot-20250101-000000-0001"
    run_url = run_url_in(store_url, run_id)
    jobs = JobStore(run_url)
    spec = JobSpec(
        run_id=run_id,
        run_url=run_url,
        created_at=utc_now(),
        module="platform",
        env_mode=EnvMode.REUSE,
        provider="aws",
        instance_id="i-0123456789abcdef0",
        terminate_instance_after=True,
        log_interval_s=0.2,
        heartbeat_interval_s=0.5,
    )
    jobs.write_spec(spec)
    jobs.write_state(JobState(run_id=run_id, phase=JobPhase.QUEUED, updated_at=utc_now()))

    rc, log = _bootstrap(tmp_path, render_user_data(run_url, region="us-east-1"), sys.executable, s3.env())
    state = jobs.read_state()
    assert rc == 0, log
    assert state.phase is JobPhase.SUCCEEDED and state.exit_code == 0
    import platform

    assert platform.platform().encode() in jobs.read_logs()
    assert log.rstrip().endswith("dry run: shutdown -h now trainctl: job ended")


# ----------------------------------------------------------------------------- gc
def _state(store_url: str, run_id: str, phase: JobPhase) -> None:
    JobStore(run_url_in(store_url, run_id)).write_state(JobState(run_id=run_id, phase=phase, updated_at=utc_now()))


def test_gc_finds_instances_without_a_live_run(provider, ec2, ami, set_up, store_url):
    done = provider.create(run_spec(store_url, run_id="done-1"))
    live = provider.create(run_spec(store_url, run_id="live-1"))
    missing = provider.create(run_spec(store_url, run_id="missing-1"))
    bare = provider.create(InstanceSpec())
    theirs = untagged_instance(ec2, ami)
    _state(store_url, "done-1", JobPhase.SUCCEEDED)
    _state(store_url, "live-1", JobPhase.RUNNING)

    # young instances with no record yet may still be booting
    young = {item.instance.id: item for item in find_garbage(provider).items}
    assert young[done.id].garbage and not young[missing.id].garbage and not young[bare.id].garbage

    report = collect_garbage(provider, boot_grace_s=0)
    verdicts = {item.instance.id: item for item in report.items}
    assert theirs not in verdicts
    assert {i.instance.id for i in report.garbage} == {done.id, missing.id, bare.id}
    assert verdicts[done.id].job_state == "succeeded" and verdicts[done.id].run_url == run_url_in(store_url, "done-1")
    assert verdicts[live.id].reason == "run is running"
    assert set(not_terminated(ec2)) == {done.id, live.id, missing.id, bare.id, theirs}  # only listed

    report = collect_garbage(provider, yes=True, boot_grace_s=0)
    assert all(item.terminated for item in report.garbage)
    assert set(not_terminated(ec2)) == {live.id, theirs}


def test_gc_keeps_what_it_cannot_check(provider, set_up, store_url):
    # a missing bucket or an empty store reads like "no run record": never enough to terminate
    unreadable = provider.create(run_spec("s3://no-such-bucket-here/store", run_id="x-1"))
    empty = provider.create(run_spec(store_url, run_id="y-1"))
    report = collect_garbage(provider, yes=True, boot_grace_s=0)
    verdicts = {item.instance.id: item for item in report.items}
    assert not report.garbage
    assert all("cannot tell that the run is gone" in item.reason for item in report.items)
    assert "bucket 'no-such-bucket-here' of s3://no-such-bucket-here/store does not exist" in verdicts[unreadable.id].reason
    assert f"the store {store_url} is empty or missing" in verdicts[empty.id].reason
    assert set(verdicts) == {unreadable.id, empty.id}
    assert all(provider.describe(i).state.is_usable() for i in (unreadable.id, empty.id))


def test_gc_keeps_runless_instances_where_jobs_can_still_start(provider):
    """On providers that reuse instances (local), an instance without a run is not garbage."""
    bare = provider.describe(provider.create(InstanceSpec()).id)
    assert not classify(bare, boot_grace_s=0).garbage
    assert classify(bare, boot_grace_s=0, runless_is_garbage=True).garbage


@pytest.mark.slow
def test_gc_cli_lists_then_terminates_an_orphan(provider, ec2, ami, set_up, store_url, s3):
    orphan = provider.create(run_spec(store_url, run_id="orphan-1"))  # its run was never written
    _state(store_url, "earlier-1", JobPhase.SUCCEEDED)  # the store itself is there and readable
    theirs = untagged_instance(ec2, ami)
    args = ["gc", "--provider", "aws", "--grace-minutes", "0", "--output", "json"]

    listed = subprocess.run([*TRAINCTL, *args], capture_output=True, text=True, env={**os.environ, **s3.env()}, timeout=120)
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert [g["instance"]["id"] for g in data["garbage"]] == [orphan.id] and not data["terminate"]
    assert orphan.id in not_terminated(ec2)

    table = subprocess.run(
        [*TRAINCTL, *args[:-2]], capture_output=True, text=True, env={**os.environ, **s3.env(), "COLUMNS": "200"}, timeout=120
    )
    assert orphan.id in table.stdout and "--yes" in table.stdout

    done = subprocess.run(
        [*TRAINCTL, *args, "--yes"], capture_output=True, text=True, env={**os.environ, **s3.env()}, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["garbage"][0]["terminated"] is True
    assert not_terminated(ec2) == [theirs]


# ----------------------------------------------------------------------------- aws setup
def test_aws_setup_is_idempotent_and_least_privilege(s3, ec2):
    iam = s3.server.client("iam")
    first = setup_aws(f"s3://{s3.bucket}/runs", endpoint_url=s3.endpoint)
    assert {s.action for s in first.steps} == {"created"}
    assert first.prefix == "runs"
    second = setup_aws(f"s3://{s3.bucket}/runs", endpoint_url=s3.endpoint)
    assert {s.action for s in second.steps} == {"found"}
    assert second.security_group_id == first.security_group_id

    [policy_name] = iam.list_role_policies(RoleName=ROLE_NAME)["PolicyNames"]
    document = iam.get_role_policy(RoleName=ROLE_NAME, PolicyName=policy_name)["PolicyDocument"]
    resources = {r for s in document["Statement"] for r in ([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])}
    assert resources == {f"arn:aws:s3:::{s3.bucket}", f"arn:aws:s3:::{s3.bucket}/runs/*"}
    actions = {a for s in document["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert all(a.startswith("s3:") for a in actions) and "s3:*" not in actions
    assert TAG_MANAGED_BY in {t["Key"] for t in iam.list_role_tags(RoleName=ROLE_NAME)["Tags"]}

    [group] = ec2.describe_security_groups(GroupIds=[first.security_group_id])["SecurityGroups"]
    assert group["IpPermissions"] == [] and TAG_MANAGED_BY in tags_of(group)

    # a different prefix updates the bucket's policy, and nothing else
    third = setup_aws(s3.bucket, prefix="other", endpoint_url=s3.endpoint)
    assert {(s.resource, s.action) for s in third.steps if s.action != "found"} == {("role policy", "updated")}


def test_aws_setup_never_adopts_a_role_it_did_not_create(s3):
    s3.server.client("iam").create_role(RoleName=ROLE_NAME, AssumeRolePolicyDocument="{}")
    with pytest.raises(ConfigError, match="was not created by trainctl"):
        setup_aws(s3.bucket, endpoint_url=s3.endpoint)


def test_aws_setup_cli(s3):
    args = [*TRAINCTL, "aws", "setup", "--bucket", s3.bucket]
    env = {**os.environ, **s3.env(), "COLUMNS": "200"}
    first = subprocess.run([*args, "--output", "json"], capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 0, first.stderr
    data = json.loads(first.stdout)
    assert {s["action"] for s in data["steps"]} == {"created"} and data["options"]["iam_instance_profile"] == ROLE_NAME
    again = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0 and "found" in again.stdout and "created" not in again.stdout


# ----------------------------------------------------------------------------- launch() through AWS
def test_launch_through_the_aws_provider_hands_the_job_off_via_s3(s3, ec2, ami, set_up, store_url, tmp_path, monkeypatch):
    """What `trainctl launch --provider aws` leaves behind before the instance boots: the job,
    the code and a wheel of this trainctl in S3, and one tagged instance whose user data runs the
    agent for that run; no credentials anywhere."""
    from trainctl_lightning import launch as api

    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("print('hi')\n")
    monkeypatch.chdir(project)
    with pytest.raises(ConfigError, match="cannot forward SECRET_TOKEN"):
        monkeypatch.setenv("SECRET_TOKEN", "hunter2")
        api.launch(
            "train.py", provider="aws", store=store_url, image=ami, instance_type="g5.xlarge", env=["SECRET_TOKEN"], detach=True
        )
    assert raw_instances(ec2) == []

    run = api.launch("train.py", provider="aws", store=store_url, image=ami, instance_type="g5.xlarge", spot=True, detach=True)
    spec = JobStore(run.run_url).read_spec()
    assert spec.provider == "aws" and spec.instance_id == run.instance_id and spec.spot
    assert run.state().phase is JobPhase.QUEUED and not run.state().lost
    [inst] = raw_instances(ec2)
    tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
    assert tags[TAG_RUN_ID] == run.run_id and tags[TAG_MANAGED_BY] == "trainctl-lightning"
    script = base64.b64decode(
        ec2.describe_instance_attribute(InstanceId=inst["InstanceId"], Attribute="userData")["UserData"]["Value"]
    ).decode()
    assert f"RUN_URL={run.run_url}" in script
    wheel = re.search(r"INSTALL=(s3://\S+\.whl)", script).group(1)
    assert wheel.startswith(f"{store_url}/_dist/") and fsspec.filesystem("s3").exists(wheel)
    # the instance installs it only with the hash the launcher computed (test_bootstrap runs that check)
    recorded = re.search(r"INSTALL_SHA256=([0-9a-f]{64})\s", script).group(1)
    assert hashlib.sha256(fsspec.filesystem("s3").cat_file(wheel)).hexdigest() == recorded
    assert "hunter2" not in script and "testing" not in script
    api.terminate(run.instance_id)
    assert api.terminate(run.instance_id).state is InstanceState.TERMINATED
