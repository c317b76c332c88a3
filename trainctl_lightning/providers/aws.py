"""AWS: one EC2 instance per run, started by its user data, found again only by its tags.

The job hand-off needs no inbound port: ``create`` is given the run's ``s3://`` URL
(``InstanceSpec.run_url``) and the instance's user data (:mod:`.aws_bootstrap`)
installs trainctl-lightning, runs the agent for that run and powers off, which terminates the
instance (``InstanceInitiatedShutdownBehavior=terminate``). The instance reads and writes the
store with its instance profile (``trainctl aws setup`` creates one), never with a secret.

No leaks, by construction (the SkyPilot way):

* everything is tagged at creation (instance, volumes, network interface, spot request), and
  ``list``/``stop``/``terminate`` only ever see instances tagged ``trainctl:managed-by``;
* a hard max runtime is scheduled on the instance before anything else runs;
* a launch that fails after ``run_instances`` terminates the instance it created, and says so,
  or names the instance to delete by hand when it cannot.

boto3 is imported by this module only.

Example::

    provider = AWSProvider(region="us-east-1")
    spec = InstanceSpec(instance_type="g5.xlarge", spot=True, max_runtime_s=6 * 3600,
                        run_url="s3://my-bucket/runs/mnist-20250101-120000-ab12")
    print(provider.create_dryrun(spec))   # what would be created, and the estimated price
    instance = provider.create(spec)
"""

from __future__ import annotations

import base64
import builtins
import copy
import difflib
import http.client
import logging
import os
import shlex
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, ClassVar

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ProfileNotFound,
)

from trainctl_lightning.errors import (
    ConfigError,
    InstanceNotFoundError,
    ProviderError,
    TrainctlError,
)
from trainctl_lightning.jobs.spec import looks_secret, validate_run_id
from trainctl_lightning.providers.api import (
    MANAGED_BY,
    AgentLaunch,
    CreatePlan,
    Instance,
    InstanceSpec,
    InstanceState,
    Provider,
    standard_tags,
)
from trainctl_lightning.providers.aws_bootstrap import (
    render_user_data,
    summarize_user_data,
)
from trainctl_lightning.providers.aws_cluster import (
    CLUSTER_PURPOSE,
    TAG_CREATED_AT,
    ClusterPlan,
    check_efa,
    check_subnets,
    cluster_resources,
    create_placement_group,
    create_security_group,
    delete_cluster,
    delete_cluster_resource,
    live_run_instances,
    network_interfaces,
)
from trainctl_lightning.providers.aws_recovery import (
    RECOVERY_GROUP_ENV,
    TAG_RECOVERY_GROUP,
    RecoverOptions,
    check_recover_options,
    delete_group,
    group_request,
    lifetime_action,
    list_groups,
    release_group_from_instance,
    template_request,
    wait_first_instance,
)
from trainctl_lightning.providers.aws_run_role import (
    RUN_KEY_PARAMETER_ENV,
    RUN_ROLE_PATH,
    RunRole,
    create_run_role,
    delete_run_role,
    fetch_run_key,
    list_run_roles,
    put_run_key,
    run_key_parameter,
    run_role_for,
)
from trainctl_lightning.store.layout import (
    TAG_MANAGED_BY,
    TAG_NAME,
    TAG_NODE,
    TAG_PURPOSE,
    TAG_STORE,
    run_id_of,
    run_url_in,
    store_url_of,
)
from trainctl_lightning.timeutil import utc_now

__all__ = [
    "DEFAULT_DISK_GB",
    "DEFAULT_INSTANCE_PROFILE",
    "DEFAULT_INSTANCE_TYPE",
    "DEFAULT_MAX_RUNTIME_S",
    "DLAMI_PARAMETER",
    "LAUNCH_STEPS",
    "NODE_STEPS",
    "ON_DEMAND_PRICES",
    "OPTIONS",
    "RECOVERY_STEPS",
    "SECURITY_GROUP_PURPOSE",
    "TAG_CLUSTER",
    "AWSCreatePlan",
    "AWSProvider",
    "explain_aws_error",
    "no_region_error",
]

log = logging.getLogger(__name__)

DEFAULT_INSTANCE_TYPE = "g4dn.xlarge"
DEFAULT_DISK_GB = 100
#: AWS's public SSM parameter naming the latest Deep Learning Base AMI (NVIDIA driver, CUDA,
#: Ubuntu 22.04) in each region.
DLAMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
#: Instance profile and security group that ``trainctl aws setup`` creates and ``create`` uses
#: when the options name none.
DEFAULT_INSTANCE_PROFILE = "trainctl-lightning-instance"
SECURITY_GROUP_PURPOSE = "instances"

#: Approximate on-demand prices in USD per hour: AWS's EC2 On-Demand pricing page, us-east-1,
#: Linux, as listed in 2024. Other regions differ, and AWS has cut some since (P4/P5 in 2025):
#: an estimate shown before launch, never a bill.
ON_DEMAND_PRICES: dict[str, float] = {
    "g4dn.xlarge": 0.526,
    "g4dn.2xlarge": 0.752,
    "g4dn.4xlarge": 1.204,
    "g4dn.8xlarge": 2.176,
    "g4dn.12xlarge": 3.912,
    "g5.xlarge": 1.006,
    "g5.2xlarge": 1.212,
    "g5.4xlarge": 1.624,
    "g5.8xlarge": 2.448,
    "g5.12xlarge": 5.672,
    "g5.48xlarge": 16.288,
    "g6.xlarge": 0.805,
    "g6.2xlarge": 0.978,
    "g6.4xlarge": 1.323,
    "g6.12xlarge": 4.602,
    "g6e.xlarge": 1.861,
    "p3.2xlarge": 3.06,
    "p3.8xlarge": 12.24,
    "p3.16xlarge": 24.48,
    "p4d.24xlarge": 32.773,
    "p5.48xlarge": 98.32,
}
_GPU_FAMILIES = ("g4dn.", "g4ad.", "g5.", "g5g.", "g6.", "g6e.", "gr6.", "p3.", "p3dn.", "p4d.", "p4de.", "p5.", "p5e.", "p5en.")

_STATES = {
    "pending": InstanceState.PENDING,
    "running": InstanceState.RUNNING,
    "stopping": InstanceState.STOPPING,
    "stopped": InstanceState.STOPPED,
    "shutting-down": InstanceState.TERMINATING,
    "terminated": InstanceState.TERMINATED,
}
_LIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]

#: ``InstanceSpec.options`` this provider understands.
OPTIONS: dict[str, str] = {
    "install": "what the instance pip-installs for trainctl-lightning: a requirement or the s3:// URL of a wheel",
    "install_sha256": "SHA-256 of the s3:// wheel in install (required with one): the instance refuses any other bytes",
    "subnet_id": "subnet to launch in (default: the default VPC's); a multi-node run may list several of one "
    "availability zone (the first is used)",
    "security_group_ids": "list of security group ids (default: the one `trainctl aws setup` made in the VPC; never the VPC's default group)",
    "key_name": "EC2 key pair for SSH (optional: nothing needs SSH)",
    "iam_instance_profile": f"instance profile name or ARN (default: a per-run one, else {DEFAULT_INSTANCE_PROFILE})",
    "run_credentials": "true (default): a run's instance gets its own IAM role, scoped to that run's objects "
    "(aws_run_role.py); false: the shared instance profile from `trainctl aws setup`",
    "efa": "true: a multi-node run's instances get Elastic Fabric Adapters (one per network card; the instance type "
    "must support EFA); default false",
    "recover": "a managed run: {max_restarts, max_hours, instance_types, on_demand_fallback}; an Auto Scaling group "
    "of one replaces a lost instance (aws_recovery.py)",
}

#: Steps of ``_create`` after which a test may inject a failure (``provider._fail_after``).
LAUNCH_STEPS = ("run_instances", "wait_visible", "check_tags")
#: The same for a managed run (aws option ``recover``): after the template, the group, its first instance.
RECOVERY_STEPS = ("launch_template", "group", "first_instance")
#: The same for a multi-node run (``create_nodes``): each resource in the order it is made.
NODE_STEPS = ("placement_group", "security_group", "run_role", "run_instances", "wait_visible", "tag_nodes")
#: On each instance of a multi-node run: the name of its placement group and security group.
TAG_CLUSTER = "trainctl:cluster"
#: Stands for the run's own security group in a multi-node plan's request (made by ``create_nodes``).
RUN_SECURITY_GROUP = "<the run's security group>"
_CREDENTIAL_CODES = {
    "AuthFailure",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "ExpiredTokenException",
    "RequestExpired",
}
_CAPACITY_CODES = {"InsufficientInstanceCapacity", "SpotMaxPriceTooLow", "InsufficientCapacity", "Unsupported"}
_QUOTA_CODES = {"VcpuLimitExceeded", "MaxSpotInstanceCountExceeded", "InstanceLimitExceeded"}


def explain_aws_error(exc: BaseException, action: str, region: str | None = None, profile: str | None = None) -> TrainctlError:
    """Turn a boto3 exception into one line that says what to do.

    Credentials and configuration problems become :class:`ConfigError`; everything else
    :class:`ProviderError`.
    """
    if isinstance(exc, TrainctlError):
        return exc
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return ConfigError(
            f"no AWS credentials to {action}: set AWS_PROFILE (or --profile) or AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or run `aws configure`"
        )
    if isinstance(exc, ProfileNotFound):
        return ConfigError(
            f"AWS profile {profile or os.environ.get('AWS_PROFILE')!r} is not in ~/.aws/config or ~/.aws/credentials: "
            "fix --profile / AWS_PROFILE (`aws configure list-profiles` lists them)"
        )
    if isinstance(exc, NoRegionError):
        return no_region_error(action)
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        message = exc.response.get("Error", {}).get("Message", str(exc))
        where = f" in {region}" if region else ""
        if code in _CREDENTIAL_CODES:
            return ConfigError(
                f"AWS rejected the credentials ({code}) to {action}: refresh them (`aws sts get-caller-identity` checks)"
            )
        if code in ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException"):
            return ProviderError(f"not allowed to {action}{where} ({code}): the credentials need that permission; {message}")
        if code in _CAPACITY_CODES:
            return ProviderError(
                f"cannot {action}{where}: AWS has no capacity ({code}: {message}); try another instance type, region "
                "or subnet (availability zone), or on-demand instead of spot"
            )
        if code in _QUOTA_CODES:
            return ProviderError(
                f"cannot {action}{where}: an account quota is reached ({code}: {message}); ask for more in the Service "
                "Quotas console (EC2 'Running On-Demand G and VT instances' / 'All G and VT Spot Instance Requests')"
            )
        return ProviderError(f"cannot {action}{where}: {code}: {message}")
    if isinstance(exc, BotoCoreError):
        return ProviderError(f"cannot reach AWS to {action}: {exc}")
    return ProviderError(f"cannot {action}: {type(exc).__name__}: {exc}")


def no_region_error(action: str) -> ConfigError:
    hint = ""
    if os.environ.get("AWS_REGION"):
        hint = f" (AWS_REGION={os.environ['AWS_REGION']} is set, but boto3 ignores AWS_REGION)"
    return ConfigError(f"no AWS region to {action}: pass --region or set AWS_DEFAULT_REGION{hint}")


def _error_code(exc: BaseException) -> str:
    return exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""


def _tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in sorted(tags.items())]


def _tag_dict(raw: list[dict[str, str]] | None) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in raw or []}


def _with_security_group(kwargs: dict[str, Any], group_id: str) -> dict[str, Any]:
    """A multi-node RunInstances with the run's security group id in place of its placeholder."""
    out = copy.deepcopy(kwargs)

    def swap(groups: list[str]) -> list[str]:
        return [group_id if g == RUN_SECURITY_GROUP else g for g in groups]

    if "SecurityGroupIds" in out:
        out["SecurityGroupIds"] = swap(out["SecurityGroupIds"])
    for interface in out.get("NetworkInterfaces", []):
        interface["Groups"] = swap(interface["Groups"])
    return out


@dataclass(repr=False)
class AWSCreatePlan(CreatePlan):
    """A :class:`CreatePlan` that also carries the user data (``request`` shows only its size and digest)."""

    user_data: str | None = field(default=None, compare=False)
    run_role: RunRole | None = field(default=None, compare=False)
    """The per-run IAM role ``_create`` makes first (``request`` names it), or None."""
    recover: RecoverOptions | None = field(default=None, compare=False)
    """A managed run: ``request`` holds the template, group and lifetime requests instead of RunInstances."""
    cluster: ClusterPlan | None = field(default=None, compare=False)
    """A multi-node run (``spec.nodes > 1``): the placement group and security group ``create_nodes``
    makes first; ``request`` is the one RunInstances for every node, naming them."""

    def run_instances_kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.request)
        if self.user_data is not None:
            kwargs["UserData"] = self.user_data
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if self.cluster is not None:
            data["cluster"] = {
                "placement_group": {"GroupName": self.cluster.name, "Strategy": "cluster"},
                "security_group": {
                    "GroupName": self.cluster.name,
                    "VpcId": self.cluster.vpc_id,
                    "Ingress": [{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": RUN_SECURITY_GROUP}]}],
                },
                "subnet_id": self.cluster.subnet_id,
                "availability_zone": self.cluster.availability_zone,
                "efa_interfaces": self.cluster.efa_interfaces,
                "tags": self.cluster.tags,
            }
        return data


#: The hard cap on an instance's life when none is given: generous for training, but never unbounded.
DEFAULT_MAX_RUNTIME_S = 24 * 3600.0


class AWSProvider(Provider):
    """EC2 instances in one region, with boto3.

    Args:
        region: AWS region; default: ``AWS_DEFAULT_REGION`` or the profile's region.
        profile: named profile from ``~/.aws/config``; default: ``AWS_PROFILE`` or the default chain.
        endpoint_url: a different EC2/SSM/IAM endpoint (tests: moto's server).
        ami_resolver: ``callable(region) -> AMI id`` used when a spec names no image; default:
            the Deep Learning AMI from ``ami_parameter`` in SSM.
        session: a ready ``boto3.Session`` (then ``profile`` is ignored).
        ami_parameter: SSM parameter holding the default AMI id.
        shutdown_command: what :meth:`release_from_agent` runs on the instance; default:
            ``$TRAINCTL_SHUTDOWN_CMD``, else ``shutdown -h now``.
    """

    name: ClassVar[str] = "aws"
    store_protocols: ClassVar[tuple[str, ...]] = ("s3",)
    forwards_env: ClassVar[bool] = False
    replaces_instances: ClassVar[bool] = True
    installs_trainctl: ClassVar[bool] = True
    #: The agent starts from user data at boot, so an instance serves the run it was created for
    #: and no other (``trainctl gc`` treats one created without a run as garbage).
    one_run_per_instance: ClassVar[bool] = True

    def __init__(
        self,
        region: str | None = None,
        profile: str | None = None,
        endpoint_url: str | None = None,
        ami_resolver: Callable[[str], str] | None = None,
        session: Any = None,
        ami_parameter: str = DLAMI_PARAMETER,
        shutdown_command: Sequence[str] | None = None,
    ) -> None:
        if ami_resolver is not None and not callable(ami_resolver):
            raise ConfigError(f"AWSProvider(ami_resolver={ami_resolver!r}): pass a callable(region) -> AMI id")
        self._region = region
        self.profile = profile
        self.endpoint_url = endpoint_url
        self.ami_resolver = ami_resolver
        self.ami_parameter = ami_parameter
        self.shutdown_command = list(shutdown_command) if shutdown_command else None
        self._session = session
        self._clients: dict[tuple[str, str], Any] = {}
        #: Test hook: the name of a step in LAUNCH_STEPS after which ``_create`` fails.
        self._fail_after: str | None = None
        #: How long ``_create`` waits for a new instance to become visible to DescribeInstances.
        self.visible_timeout_s = 60.0

    def __repr__(self) -> str:
        return f"AWSProvider(region={self._region!r}, profile={self.profile!r})"

    # ------------------------------------------------------------ sessions and clients
    @property
    def session(self) -> Any:
        if self._session is None:
            try:
                self._session = boto3.Session(profile_name=self.profile)
            except ProfileNotFound as exc:
                raise explain_aws_error(exc, "open the AWS session", profile=self.profile) from None
        return self._session

    @property
    def region(self) -> str | None:
        """The region in use: the one given, else the session's (``AWS_DEFAULT_REGION``, profile)."""
        return self._region or self.session.region_name

    def client(self, service: str, region: str | None = None) -> Any:
        """A boto3 client for ``service`` in ``region`` (default: :attr:`region`), cached.

        Raises:
            ConfigError: no region is configured, or the profile does not exist.
        """
        region = region or self.region
        if not region:
            raise no_region_error(f"use {service}")
        key = (service, region)
        if key not in self._clients:
            config = Config(retries={"mode": "standard", "max_attempts": 5}, user_agent_extra="trainctl-lightning")
            self._clients[key] = self.session.client(service, region_name=region, endpoint_url=self.endpoint_url, config=config)
        return self._clients[key]

    def _check_credentials(self, action: str) -> None:
        try:
            credentials = self.session.get_credentials()
        except BotoCoreError as exc:
            raise explain_aws_error(exc, action, profile=self.profile) from None
        if credentials is None:
            raise explain_aws_error(NoCredentialsError(), action)

    # ------------------------------------------------------------ dry run
    def create_dryrun(self, spec: InstanceSpec) -> AWSCreatePlan:
        """Check everything a launch needs, and return the ``run_instances`` request; creates nothing.

        Raises:
            ConfigError: no credentials or region, an unknown option, an instance type not
                offered in the region, an AMI that does not exist, a disk smaller than the AMI.
        """
        region = spec.region or self.region
        if not region:
            raise no_region_error("launch an instance")
        action = f"launch an instance in {region}"
        self._check_credentials(action)
        options = self._check_options(spec.options)
        multi = spec.nodes > 1
        subnet_ids = options.pop("subnet_ids", [])
        if multi:
            self._check_nodes_spec(spec, options)
        elif len(subnet_ids) > 1 or options.get("efa"):
            what = "subnet_id lists several subnets" if len(subnet_ids) > 1 else "efa is set"
            raise ConfigError(f"aws option {what}, which only a multi-node run (nodes > 1) uses: pass one subnet, drop efa")
        for key in ("run_url", "store_url"):
            value = getattr(spec, key)
            if value is not None and (not isinstance(value, str) or not value.startswith("s3://")):
                raise ConfigError(
                    f"the aws provider needs {key} as an s3:// URL (instances read the store from S3), got {value!r}"
                )
        for name in spec.env:
            if looks_secret(name):
                raise ConfigError(
                    f"env {name} looks like a secret, and EC2 user data is readable by anyone who can describe the "
                    "instance: give the instance access through its instance profile instead"
                )
        instance_type = spec.instance_type or DEFAULT_INSTANCE_TYPE
        recover = check_recover_options(options["recover"], instance_type) if "recover" in options else None
        if recover is not None:
            self._check_recover_spec(spec, options)
        ec2 = self.client("ec2", region)
        subnet, zone, vpc_id, efa_interfaces = "", "", "", 0
        try:
            for checked_type in recover.instance_types if recover else [instance_type]:
                self._check_instance_type(ec2, checked_type, region)
            subnets = self._recovery_subnets(ec2, region, options.get("subnet_id")) if recover else []
            image_id = spec.image or self._resolve_ami(region)
            root_device, min_disk = self._check_image(ec2, image_id, region)
            disk_gb = spec.disk_gb or max(DEFAULT_DISK_GB, min_disk)
            if disk_gb < min_disk:
                raise ConfigError(
                    f"disk_gb={disk_gb} is smaller than image {image_id}'s {min_disk} GB root snapshot: ask for at least {min_disk}"
                )
            per_run = bool(spec.run_url) and not options.get("iam_instance_profile") and options.get("run_credentials", True)
            profile = None if per_run else self._instance_profile(options, region, spec.run_url)
            if multi:  # the run's own group (made by create_nodes), and the user's if any
                subnet, zone, vpc_id = check_subnets(ec2, region, subnet_ids, instance_type)
                efa_interfaces = check_efa(ec2, instance_type, bool(options.get("efa")))
                security_groups = [RUN_SECURITY_GROUP, *(options.get("security_group_ids") or [])]
            else:
                security_groups = options.get("security_group_ids") or self._default_security_groups(
                    ec2, region, options.get("subnet_id")
                )
        except TrainctlError:
            raise
        except Exception as exc:
            raise explain_aws_error(exc, action, region, self.profile) from None

        run_url = spec.run_url
        run_id = validate_run_id(run_id_of(run_url)) if run_url else None
        store_url = spec.store_url or (store_url_of(run_url) if run_url else None)
        tags = standard_tags(spec.tags, run_id=run_id)
        tags.setdefault(TAG_NAME, spec.name or (f"trainctl-{run_id}" if run_id else "trainctl"))
        if store_url:
            tags[TAG_STORE] = store_url
        run_role = (
            run_role_for(run_url, standard_tags(spec.tags), self._partition(region), recovery=recover is not None)
            if per_run and run_url
            else None
        )
        env = dict(spec.env)
        if run_role is not None:
            env[RUN_KEY_PARAMETER_ENV] = run_key_parameter(run_role.name)  # the parameter's name, not the key
            if recover is not None:
                env[RECOVERY_GROUP_ENV] = run_role.name  # the group and template carry the role's name
                tags[TAG_RECOVERY_GROUP] = run_role.name
        # never an instance without a cap: the default one is generous, --max-hours sets another
        max_runtime_s = spec.max_runtime_s if spec.max_runtime_s is not None else DEFAULT_MAX_RUNTIME_S
        user_data = None
        if run_url:
            user_data = render_user_data(
                run_url,
                install=options.get("install"),
                install_sha256=options.get("install_sha256"),
                max_runtime_s=max_runtime_s,
                env=env,  # with the run key's parameter name, not the key: the key goes to SSM in start_agent
                region=region,
            )
        else:
            minutes = max(1, -(-int(max_runtime_s) // 60))
            user_data = f"#!/bin/bash\nshutdown -h +{minutes} 'trainctl: max runtime reached'\n"

        resource_types = ["instance", "volume", "network-interface"] + (["spot-instances-request"] if spec.spot else [])
        request: dict[str, Any] = {
            "ImageId": image_id,
            "InstanceType": instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            # the same token makes a retried run_instances return the instance already launched
            "ClientToken": uuid.uuid4().hex,
            "InstanceInitiatedShutdownBehavior": "terminate",
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
            "BlockDeviceMappings": [
                {"DeviceName": root_device, "Ebs": {"VolumeSize": disk_gb, "VolumeType": "gp3", "DeleteOnTermination": True}}
            ],
            "TagSpecifications": [{"ResourceType": t, "Tags": _tag_list(tags)} for t in resource_types],
        }
        if spec.spot:
            request["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"},
            }
        if options.get("subnet_id"):
            request["SubnetId"] = options["subnet_id"]
        if security_groups:
            request["SecurityGroupIds"] = list(security_groups)
        if options.get("key_name"):
            request["KeyName"] = options["key_name"]
        if run_role is not None:
            request["IamInstanceProfile"] = {"Name": run_role.name}  # made by _create, just before
        elif profile:
            request["IamInstanceProfile"] = {"Arn": profile} if profile.startswith("arn:") else {"Name": profile}
        if user_data is not None:
            request["UserData"] = summarize_user_data(user_data)

        price, price_note = self._price(ec2, instance_type, spec.spot)
        resources = [
            f"{'spot (one-time, terminated on interruption)' if spec.spot else 'on-demand'} EC2 instance {instance_type} "
            f"from {image_id} in {region}",
            f"{disk_gb} GB gp3 root volume, deleted with the instance",
            "powers off = terminates (InstanceInitiatedShutdownBehavior=terminate); IMDSv2 only",
        ]
        if run_url:
            resources.append(f"user data: runs the agent for {run_url}, then powers off")
            if options.get("install_sha256"):
                resources.append(
                    f"installs trainctl from {options['install']} only if its sha256 is {options['install_sha256'][:16]}..."
                )
        resources.append(
            f"hard max runtime: powered off {max_runtime_s / 3600:.2f} h after boot"
            + ("" if spec.max_runtime_s is not None else " (the default cap; --max-hours sets another)")
        )
        if run_role is not None:
            resources.append(run_role.describe())
        elif profile:
            resources.append(f"instance profile {profile} (shared: every run in the store)")
        if recover is not None and run_role is not None and user_data is not None:
            request, recovery_resources = self._recovery_requests(spec, request, user_data, tags, run_role, recover, subnets)
            resources = recovery_resources + resources[1:]
        cluster = None
        if multi and run_url and run_id and store_url:
            cluster = ClusterPlan(
                name=run_role_for(run_url, {}).name,  # one per run URL, like the run's role
                run_id=run_id,
                subnet_id=subnet,
                availability_zone=zone,
                vpc_id=vpc_id,
                tags={
                    **standard_tags(spec.tags, run_id=run_id),
                    TAG_STORE: store_url,
                    TAG_PURPOSE: CLUSTER_PURPOSE,
                    TAG_NAME: run_role_for(run_url, {}).name,
                },
                efa_interfaces=efa_interfaces,
                extra_security_groups=tuple(options.get("security_group_ids") or ()),
            )
            tags[TAG_CLUSTER] = cluster.name
            request = self._nodes_request(spec, request, cluster, tags)
            market = "spot (one-time, terminated on interruption)" if spec.spot else "on-demand"
            resources = [
                f"{spec.nodes} {market} EC2 instances {instance_type} from {image_id} in {zone}, launched together by one "
                f"RunInstances (MinCount = MaxCount = {spec.nodes}: all or none), node k tagged {TAG_NODE}=k",
                *cluster.describe(),
                *resources[1:],
            ]
            if price is not None:
                resources.append(f"estimated price for all nodes: {spec.nodes} x ${price:.3f} = ${spec.nodes * price:.3f}/hour")
        if price_note:
            resources.append(price_note)
        return AWSCreatePlan(
            provider=self.name,
            spec=spec,
            instance_type=instance_type,
            region=region,
            tags=tags,
            resources=resources,
            request=request,
            price_per_hour=price,
            user_data=user_data,
            run_role=run_role,
            recover=recover,
            cluster=cluster,
        )

    def _check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        checked = dict(options)
        for key in options:
            if key not in OPTIONS:
                close = difflib.get_close_matches(key, OPTIONS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"unknown aws option {key!r}{hint}: the aws provider knows {', '.join(sorted(OPTIONS))}")
        groups = options.get("security_group_ids")
        if isinstance(groups, str):
            groups = [g.strip() for g in groups.split(",") if g.strip()]
        if groups is not None:
            if not isinstance(groups, (list, tuple)) or not all(isinstance(g, str) and g.startswith("sg-") for g in groups):
                raise ConfigError(
                    f"aws option security_group_ids must be a list of sg-... ids, got {options['security_group_ids']!r}"
                )
            checked["security_group_ids"] = list(groups)
        if "run_credentials" in options and not isinstance(options["run_credentials"], bool):
            raise ConfigError(f"aws option run_credentials must be true or false, got {options['run_credentials']!r}")
        subnets = options.get("subnet_id")
        if isinstance(subnets, (list, tuple)):
            if not subnets or not all(isinstance(s, str) and s.startswith("subnet-") for s in subnets):
                raise ConfigError(f"aws option subnet_id must be a subnet-... id or a list of them, got {subnets!r}")
            checked["subnet_ids"] = list(subnets)
            checked["subnet_id"] = subnets[0]
        elif "subnet_id" in options:
            checked["subnet_ids"] = [subnets]
        if "efa" in options and not isinstance(options["efa"], bool):
            raise ConfigError(f"aws option efa must be true or false, got {options['efa']!r}")
        for key in ("subnet_id", "key_name", "iam_instance_profile", "install", "install_sha256"):
            if key in checked and not (isinstance(checked[key], str) and checked[key]):
                raise ConfigError(f"aws option {key} must be a non-empty string, got {options[key]!r}")
        return checked

    def _check_nodes_spec(self, spec: InstanceSpec, options: dict[str, Any]) -> None:
        """A multi-node run needs a run (its agents find each other through it), and no ``recover``."""
        if not spec.run_url:
            raise ConfigError(
                f"nodes={spec.nodes} needs a run (InstanceSpec.run_url): a multi-node run's instances start its agent at "
                "boot; `trainctl launch --nodes N` sets it"
            )
        if "recover" in options:
            raise ConfigError(
                f"aws option recover is for one instance, not nodes={spec.nodes}: a managed multi-node run is not "
                "supported yet; drop recover (or --recover), or run on one node"
            )

    def _nodes_request(
        self, spec: InstanceSpec, request: dict[str, Any], cluster: ClusterPlan, tags: dict[str, str]
    ) -> dict[str, Any]:
        """The one RunInstances of a multi-node run: N instances in the placement group and the run's
        security group (through EFA interfaces when asked), spot for all or none (``request`` says)."""
        nodes = dict(request)
        nodes["MinCount"] = nodes["MaxCount"] = spec.nodes
        nodes["Placement"] = {"GroupName": cluster.name}
        groups = list(nodes.pop("SecurityGroupIds", []))
        nodes.pop("SubnetId", None)
        if cluster.efa_interfaces:  # the subnet and groups then go on the interfaces (EC2 refuses both)
            nodes["NetworkInterfaces"] = network_interfaces(cluster, groups)
        else:
            nodes["SubnetId"] = cluster.subnet_id
            nodes["SecurityGroupIds"] = groups
        types = [t["ResourceType"] for t in request["TagSpecifications"]]
        nodes["TagSpecifications"] = [{"ResourceType": t, "Tags": _tag_list(tags)} for t in types]
        return nodes

    def _check_recover_spec(self, spec: InstanceSpec, options: dict[str, Any]) -> None:
        """A managed run needs a run, and the run's own role: the instance deletes its group with it."""
        if not spec.run_url:
            raise ConfigError("aws option recover needs a run (InstanceSpec.run_url): `trainctl launch --recover` sets it")
        if options.get("iam_instance_profile") or not options.get("run_credentials", True):
            raise ConfigError(
                "aws option recover needs the run's own IAM role (its instance deletes the run's Auto Scaling group "
                "with it when the run ends): drop iam_instance_profile and run_credentials=false"
            )

    def _recovery_subnets(self, ec2: Any, region: str, subnet_id: str | None) -> list[str]:
        """The subnets a managed run's group may launch in: the one named, else every default subnet
        of the default VPC (one per availability zone), so AWS can look for capacity in each.

        Raises:
            ConfigError: no subnet to launch in.
        """
        if subnet_id:
            return [subnet_id]  # checked by _default_security_groups, or by AWS with explicit groups
        subnets = ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
        if not subnets:
            raise ConfigError(
                f"{region} has no default subnets for the run's Auto Scaling group: pass the aws option subnet_id "
                f"(`aws ec2 describe-subnets --region {region}` lists them)"
            )
        return [s["SubnetId"] for s in sorted(subnets, key=lambda s: (s.get("AvailabilityZone", ""), s["SubnetId"]))]

    #: Send the group's ``InstancesDistribution`` (spot share and allocation strategy), as real AWS
    #: needs. moto 5.2 answers 500 to it: tests set False, and spot then goes in the template
    #: (see :mod:`.aws_recovery`).
    instances_distribution: bool = True

    def _recovery_requests(
        self,
        spec: InstanceSpec,
        run_instances: dict[str, Any],
        user_data: str,
        tags: dict[str, str],
        role: RunRole,
        recover: RecoverOptions,
        subnets: list[str],
    ) -> tuple[dict[str, Any], list[str]]:
        """The template, group and lifetime requests of a managed run (user data summarised), and what they create."""
        template = template_request(
            role.name, run_instances, user_data, tags, spot_in_template=spec.spot and not self.instances_distribution
        )
        template["LaunchTemplateData"]["UserData"] = summarize_user_data(user_data)
        group = group_request(role.name, subnets, recover, tags, spot=spec.spot, distribution=self.instances_distribution)
        request: dict[str, Any] = {"CreateLaunchTemplate": template, "CreateAutoScalingGroup": group}
        if recover.max_hours is not None:
            action = lifetime_action(role.name, recover.max_hours, datetime.now(timezone.utc))
            action["StartTime"] = f"at creation + {recover.max_hours:g} h"
            request["PutScheduledUpdateGroupAction"] = action
        market = "spot, capacity-optimised" if spec.spot else "on-demand"
        resources = [
            f"launch template {role.name}: what one instance of the run is ({', '.join(recover.instance_types)} from "
            f"{run_instances['ImageId']}), deleted when the run ends",
            f"EC2 Auto Scaling group {role.name} of one {market} instance over {len(subnets)} subnet(s) "
            f"({', '.join(subnets)}): AWS replaces the instance when it is reclaimed or lost, up to "
            f"{recover.max_restarts} restart(s) (counted by the run's agent)",
            "the instance deletes the group and the template when the run ends; `trainctl gc` deletes any left",
        ]
        if recover.max_hours is not None:
            resources.append(f"the group goes to 0 instances {recover.max_hours:g} h after creation (scheduled action)")
        if recover.on_demand_fallback:
            resources.append("on_demand_fallback: not enforced yet (an Auto Scaling group has no automatic fallback)")
        if not self.instances_distribution:
            resources.append("InstancesDistribution left out (test endpoint): spot, if asked, is in the template")
        return request, resources

    def _check_instance_type(self, ec2: Any, instance_type: str, region: str) -> None:
        found = ec2.describe_instance_type_offerings(
            LocationType="region", Filters=[{"Name": "instance-type", "Values": [instance_type]}]
        )["InstanceTypeOfferings"]
        if found:
            return
        offered: list[str] = []
        for page in ec2.get_paginator("describe_instance_type_offerings").paginate(LocationType="region"):
            offered += [o["InstanceType"] for o in page["InstanceTypeOfferings"]]
        gpu = sorted({t for t in offered if t.startswith(_GPU_FAMILIES)})
        close = difflib.get_close_matches(instance_type, gpu, n=5, cutoff=0.6) or [t for t in ON_DEMAND_PRICES if t in gpu][:6]
        suggestion = f"; GPU types offered there include {', '.join(close)}" if close else ""
        raise ConfigError(f"instance type {instance_type!r} is not offered in {region}{suggestion}")

    def _resolve_ami(self, region: str) -> str:
        if self.ami_resolver is not None:
            ami = self.ami_resolver(region)
            if not isinstance(ami, str) or not ami.startswith("ami-"):
                raise ConfigError(f"the AMI resolver returned {ami!r} for {region}, not an ami-... id")
            return ami
        try:
            return self.client("ssm", region).get_parameter(Name=self.ami_parameter)["Parameter"]["Value"]
        except ClientError as exc:
            if _error_code(exc) == "ParameterNotFound":
                raise ConfigError(
                    f"no AMI in SSM parameter {self.ami_parameter} in {region}: pass an AMI id (image / --image)"
                ) from None
            raise

    def _check_image(self, ec2: Any, image_id: str, region: str) -> tuple[str, int]:
        """The image's root device name and root snapshot size (GB)."""
        try:
            images = ec2.describe_images(ImageIds=[image_id])["Images"]
        except ClientError as exc:
            if _error_code(exc).startswith("InvalidAMIID"):
                images = []
            else:
                raise
        if not images:
            raise ConfigError(f"AMI {image_id!r} does not exist in {region} (AMIs are per region): pass one from {region}")
        image = images[0]
        root = image.get("RootDeviceName") or "/dev/sda1"
        size = 0
        for mapping in image.get("BlockDeviceMappings", []):
            if mapping.get("DeviceName") == root:
                size = int(mapping.get("Ebs", {}).get("VolumeSize") or 0)
        return root, size

    def _instance_profile(self, options: dict[str, Any], region: str, run_url: str | None) -> str | None:
        if options.get("iam_instance_profile"):
            return options["iam_instance_profile"]
        try:
            self.client("iam", region).get_instance_profile(InstanceProfileName=DEFAULT_INSTANCE_PROFILE)
            return DEFAULT_INSTANCE_PROFILE
        except ClientError as exc:
            if _error_code(exc) not in ("NoSuchEntity", "NoSuchEntityException"):
                raise
        if run_url:
            raise ConfigError(
                f"the instance needs an instance profile to read {run_url}: run `trainctl aws setup --bucket BUCKET` "
                "once, or pass the aws option iam_instance_profile=NAME"
            )
        return None

    def _default_security_groups(self, ec2: Any, region: str, subnet_id: str | None) -> list[str]:
        """The security group ``trainctl aws setup`` made in the launch's VPC (the subnet's, else
        the default VPC).

        Never EC2's fallback, the VPC's default group: that one lets every member of the group in,
        and is shared with whatever else runs in the VPC.

        Raises:
            ConfigError: no such subnet, no default VPC, or no trainctl security group in the VPC.
        """
        if subnet_id:
            try:
                subnets = ec2.describe_subnets(SubnetIds=[subnet_id])["Subnets"]
            except ClientError as exc:
                if not _error_code(exc).startswith("InvalidSubnet"):
                    raise
                subnets = []
            if not subnets:
                raise ConfigError(
                    f"aws option subnet_id={subnet_id!r} is not a subnet in {region}: pass one from "
                    f"`aws ec2 describe-subnets --region {region}`"
                )
            vpc_id = subnets[0]["VpcId"]
            where = f"subnet {subnet_id}'s VPC {vpc_id}"
            setup = f"`trainctl aws setup --bucket BUCKET --vpc-id {vpc_id}`"
        else:
            vpcs = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
            if not vpcs:
                raise ConfigError(
                    f"{region} has no default VPC: pass the aws options subnet_id and security_group_ids, or run "
                    "`trainctl aws setup --bucket BUCKET --vpc-id VPC` and pass subnet_id"
                )
            vpc_id = vpcs[0]["VpcId"]
            where = f"the default VPC {vpc_id}"
            setup = "`trainctl aws setup --bucket BUCKET`"
        groups = ec2.describe_security_groups(
            Filters=[
                {"Name": f"tag:{TAG_MANAGED_BY}", "Values": [MANAGED_BY]},
                {"Name": f"tag:{TAG_PURPOSE}", "Values": [SECURITY_GROUP_PURPOSE]},
                {"Name": "vpc-id", "Values": [vpc_id]},
            ]
        )["SecurityGroups"]
        if not groups:
            raise ConfigError(
                f"no trainctl security group in {where} ({region}), and trainctl never falls back to the VPC's "
                f"default group: run {setup} once, or pass the aws option security_group_ids=[sg-...]"
            )
        return [sorted(g["GroupId"] for g in groups)[0]]

    def _price(self, ec2: Any, instance_type: str, spot: bool) -> tuple[float | None, str]:
        listed = ON_DEMAND_PRICES.get(instance_type)
        if spot:
            try:
                history = ec2.describe_spot_price_history(
                    InstanceTypes=[instance_type], ProductDescriptions=["Linux/UNIX"], MaxResults=20
                )["SpotPriceHistory"]
            except (ClientError, BotoCoreError) as exc:
                log.info("no spot price for %s: %s", instance_type, exc)
                history = []
            if history:
                return min(float(h["SpotPrice"]) for h in history), "estimated price: the latest spot price in the region"
            if listed is not None:
                return listed, "estimated price: on-demand list price (spot is usually cheaper; approx., us-east-1 2024)"
        elif listed is not None:
            return listed, "estimated price: on-demand list price (approx., us-east-1 2024)"
        return None, f"no price known for {instance_type}"

    # ------------------------------------------------------------ create
    def _create(self, plan: CreatePlan) -> Instance:
        """Launch what ``plan`` describes; if anything fails once the instance exists, terminate it."""
        if not isinstance(plan, AWSCreatePlan):
            raise ConfigError(f"AWSProvider._create needs the plan from AWSProvider.create_dryrun, got {type(plan).__name__}")
        region = plan.region or self.region
        if plan.recover is not None:
            return self._create_group(plan, region)
        ec2 = self.client("ec2", region)
        action = f"launch {plan.instance_type} in {region}"
        kwargs = plan.run_instances_kwargs()
        role = plan.run_role
        if role is not None:
            iam = self.client("iam", region)
            try:
                kwargs["IamInstanceProfile"] = {"Arn": create_run_role(iam, role)}
            except ClientError as exc:
                raise explain_aws_error(
                    exc, f"create the run's IAM role {role.name} (aws option run_credentials=false skips it)", region
                ) from None
        try:
            response = self._run_instances(ec2, kwargs)
        except ClientError as exc:  # EC2 answered: nothing was launched
            self._delete_run_role(role, region)
            raise explain_aws_error(exc, action, region) from None
        except BaseException as exc:  # no answer: the launch may or may not have happened
            message = self._cleanup_unknown(ec2, kwargs["ClientToken"], region, exc)
            if "nothing was launched" in message or "terminated what it launched" in message:
                self._delete_run_role(role, region)
            if not isinstance(exc, Exception):
                raise
            raise ProviderError(message) from exc
        instance_id = response["Instances"][0]["InstanceId"]
        step = "run_instances"
        try:
            self._maybe_fail(step)
            step = "wait_visible"
            raw = self._wait_visible(ec2, instance_id)
            self._maybe_fail(step)
            step = "check_tags"
            self._check_tags(ec2, raw, plan.tags)
            self._maybe_fail(step)
        except BaseException as exc:  # Ctrl-C mid-launch must not leak the instance either
            message = self._cleanup(ec2, instance_id, region, step, exc)
            if "terminating it failed too" not in message:
                self._delete_run_role(role, region)
            if not isinstance(exc, Exception):
                raise
            raise ProviderError(message) from exc
        log.info("launched %s (%s) in %s", instance_id, plan.instance_type, region)
        return self._to_instance(raw, region)

    def _create_group(self, plan: AWSCreatePlan, region: str | None) -> Instance:
        """A managed run: role, template, group (and its lifetime), then the group's first instance.
        If anything fails, everything made so far is deleted (or named, to delete by hand)."""
        role = plan.run_role
        if role is None or plan.user_data is None:
            raise ConfigError(
                "AWSProvider._create: a managed run's plan has no run role or user data (make it with create_dryrun)"
            )
        ec2, autoscaling = self.client("ec2", region), self.client("autoscaling", region)
        iam = self.client("iam", region)
        try:
            profile_arn = create_run_role(iam, role)
        except ClientError as exc:
            raise explain_aws_error(exc, f"create the run's IAM role {role.name}", region) from None
        template = copy.deepcopy(plan.request["CreateLaunchTemplate"])
        template["LaunchTemplateData"]["UserData"] = base64.b64encode(plan.user_data.encode()).decode()
        template["LaunchTemplateData"]["IamInstanceProfile"] = {"Arn": profile_arn}
        step = "create the launch template"
        try:
            ec2.create_launch_template(**template)
            self._maybe_fail("launch_template")
            step = "create the Auto Scaling group"
            self._create_auto_scaling_group(autoscaling, plan.request["CreateAutoScalingGroup"])
            if plan.recover is not None and plan.recover.max_hours is not None:
                step = "schedule the group's end"
                autoscaling.put_scheduled_update_group_action(
                    **lifetime_action(role.name, plan.recover.max_hours, datetime.now(timezone.utc))
                )
            self._maybe_fail("group")
            step = "wait for the group's first instance"
            instance_id = wait_first_instance(autoscaling, role.name, self.visible_timeout_s)
            raw = self._wait_visible(ec2, instance_id)
            self._check_tags(ec2, raw, plan.tags)
            self._maybe_fail("first_instance")
        except BaseException as exc:  # Ctrl-C mid-launch must not leak the group either
            message = self._cleanup_group(role, region, step, exc)
            if not isinstance(exc, Exception):
                raise
            if isinstance(exc, ClientError):
                raise ProviderError(f"{explain_aws_error(exc, step, region)}; {message}") from None
            raise ProviderError(f"{exc}; {message}") from exc
        log.info("launched %s (%s) in %s, in Auto Scaling group %s", instance_id, raw.get("InstanceType"), region, role.name)
        return self._to_instance(raw, region)

    #: How long deleting a multi-node run's security group and placement group is retried while its
    #: instances shut down (EC2 refuses both until their network interfaces are gone).
    cluster_release_wait_s = 300.0
    cluster_release_poll_s = 5.0

    def _create_nodes(self, plan: CreatePlan) -> builtins.list[Instance]:
        """A multi-node run: placement group, security group, the run's role, then ONE RunInstances
        of ``MinCount = MaxCount = N`` (EC2 launches all or none), then each instance tagged with its
        node index, in launch-index order. If any step fails, everything made so far is deleted
        (instances terminated, then the security group, the placement group, the role), or named,
        to delete by hand.

        Raises:
            ProviderError: a step failed (the message says which, and what was cleaned up).
        """
        if not isinstance(plan, AWSCreatePlan):
            raise ConfigError(
                f"AWSProvider._create_nodes needs the plan from AWSProvider.create_dryrun, got {type(plan).__name__}"
            )
        if plan.cluster is None:  # one node: the single-instance launch, tagged node 0
            return super()._create_nodes(plan)
        cluster = replace(plan.cluster, tags={**plan.cluster.tags, TAG_CREATED_AT: utc_now()})
        region = plan.region or self.region
        ec2 = self.client("ec2", region)
        made: dict[str, Any] = {"instances": []}
        kwargs = plan.run_instances_kwargs()
        step = "placement_group"
        try:
            made["placement_group"] = create_placement_group(ec2, cluster)
            self._maybe_fail(step)
            step = "security_group"
            made["security_group"] = group_id = create_security_group(ec2, cluster)
            self._maybe_fail(step)
            step = "run_role"
            if plan.run_role is not None:
                made["run_role"] = plan.run_role
                kwargs["IamInstanceProfile"] = {"Arn": create_run_role(self.client("iam", region), plan.run_role)}
            self._maybe_fail(step)
            kwargs = _with_security_group(kwargs, group_id)
            step = "run_instances"
            response = self._run_instances(ec2, kwargs)
            launched = sorted(response["Instances"], key=lambda raw: (raw.get("AmiLaunchIndex", 0), raw["InstanceId"]))
            made["instances"] = [raw["InstanceId"] for raw in launched]
            self._maybe_fail(step)
            step = "wait_visible"
            raws = [self._wait_visible(ec2, instance_id) for instance_id in made["instances"]]
            self._maybe_fail(step)
            step = "tag_nodes"
            for node, raw in enumerate(raws):
                self._check_tags(ec2, raw, plan.tags)
                node_tags = {TAG_NODE: str(node), TAG_NAME: f"{plan.tags.get(TAG_NAME, cluster.name)}-node{node}"}
                ec2.create_tags(Resources=[raw["InstanceId"]], Tags=_tag_list(node_tags))
            self._maybe_fail(step)
            raws = [self._wait_visible(ec2, instance_id) for instance_id in made["instances"]]
        except BaseException as exc:  # Ctrl-C mid-launch must not leak anything either
            message = self._cleanup_nodes(ec2, region, made, kwargs.get("ClientToken"), step, exc)
            if not isinstance(exc, Exception):
                raise
            if isinstance(exc, ClientError):
                raise ProviderError(f"{explain_aws_error(exc, f'launch the run (step {step})', region)}; {message}") from None
            raise ProviderError(f"{exc}; {message}") from exc
        log.info(
            "launched %s (%d x %s) in %s, placement group %s",
            ", ".join(made["instances"]),
            len(raws),
            plan.instance_type,
            region,
            cluster.name,
        )
        return [self._to_instance(raw, region) for raw in raws]

    def _cleanup_nodes(
        self, ec2: Any, region: str | None, made: dict[str, Any], token: str | None, step: str, exc: BaseException
    ) -> str:
        """Delete what a failed multi-node launch made, in reverse; say what was deleted or is left."""
        what = f"launching the run's nodes failed at {step}"
        instances = list(made["instances"])
        left: list[str] = []
        done: list[str] = []
        try:
            if not instances and step == "run_instances" and token and not isinstance(exc, ClientError):
                # no answer: the launch may or may not have happened
                instances = [
                    i["InstanceId"]
                    for r in ec2.describe_instances(Filters=[{"Name": "client-token", "Values": [token]}])["Reservations"]
                    for i in r["Instances"]
                ]
            if instances:
                ec2.terminate_instances(InstanceIds=instances)
                done.append(f"terminated {', '.join(instances)}")
        except Exception as cleanup_exc:
            left.append(
                f"instances ({cleanup_exc}): aws ec2 terminate-instances --region {region} --instance-ids "
                f"{' '.join(instances) or f'<those with client token {token}>'}"
            )
        for kind, key in (("security-group", "security_group"), ("placement-group", "placement_group")):
            if key not in made:
                continue
            if left:  # the instances may still hold it
                left.append(f"{kind} {made[key]}")
                continue
            try:
                delete_cluster_resource(ec2, kind, made[key], self.cluster_release_wait_s, self.cluster_release_poll_s)
                done.append(f"deleted {kind} {made[key]}")
            except Exception as cleanup_exc:
                left.append(f"{kind} {made[key]} ({cleanup_exc})")
        role = made.get("run_role")
        if role is not None:
            if left:
                left.append(f"IAM role {role.name}")
            else:
                self._delete_run_role(role, region)  # logs what it cannot delete
                done.append(f"deleted the run's role {role.name}")
        summary = "; ".join(done) if done else "nothing had been made"
        if left:
            return (
                f"{what}; {summary}; and could not clean up, delete by hand: {'; '.join(left)} "
                "(`trainctl gc --provider aws --yes` deletes them once the instances are gone)"
            )
        return f"{what}; {summary}"

    def _create_auto_scaling_group(self, autoscaling: Any, request: dict[str, Any]) -> None:
        """CreateAutoScalingGroup, retried while the new launch template is not visible to Auto Scaling yet."""
        deadline = time.monotonic() + self.profile_wait_s
        while True:
            try:
                autoscaling.create_auto_scaling_group(**request)
                return
            except ClientError as exc:
                if _error_code(exc) != "ValidationError" or "launch template" not in str(exc).lower():
                    raise
                if time.monotonic() + 2.0 > deadline:
                    raise
                time.sleep(2.0)

    def _cleanup_group(self, role: RunRole, region: str | None, step: str, exc: BaseException) -> str:
        what = f"creating the run's Auto Scaling group failed at: {step}"
        try:
            delete_group(self.client("autoscaling", region), self.client("ec2", region), role.name)
        except Exception as cleanup_exc:
            return (
                f"{what}, and deleting what was made failed too ({cleanup_exc}): delete them by hand: "
                f"aws autoscaling delete-auto-scaling-group --force-delete --auto-scaling-group-name {role.name}; "
                f"aws ec2 delete-launch-template --launch-template-name {role.name} (`trainctl gc --provider aws --yes` "
                "deletes them too)"
            )
        self._delete_run_role(role, region)
        return f"{what}; deleted the group, its instances, the template and the run's role"

    #: How long ``_create`` retries RunInstances while IAM has not yet propagated a new instance profile.
    profile_wait_s = 60.0

    def _run_instances(self, ec2: Any, kwargs: dict[str, Any]) -> Any:
        """RunInstances, retried (same client token) while EC2 does not see a new instance profile yet.

        IAM is eventually consistent: a profile made seconds ago is often refused as "Invalid IAM
        Instance Profile" for a few seconds. Any other error goes up at once.
        """
        deadline = time.monotonic() + self.profile_wait_s
        delay = 1.0
        while True:
            try:
                return ec2.run_instances(**kwargs)
            except ClientError as exc:
                message = exc.response.get("Error", {}).get("Message", "")
                if _error_code(exc) != "InvalidParameterValue" or "iam instance profile" not in message.lower():
                    raise
                if time.monotonic() + delay > deadline:
                    raise
                log.info("the new instance profile is not visible to EC2 yet: retrying in %.0f s", delay)
                time.sleep(delay)
                delay = min(delay * 2, 8.0)

    def _delete_run_role(self, role: RunRole | None, region: str | None) -> None:
        if role is None:
            return
        try:
            delete_run_role(self.client("iam", region), role.name, self.client("ssm", region))
        except Exception as exc:  # the launch error matters more: say what is left
            log.error(
                "trainctl: could not delete the run's IAM role %s (%s); `trainctl gc --provider aws --yes` deletes it",
                role.name,
                exc,
            )

    def _partition(self, region: str) -> str:
        try:
            return str(self.session.get_partition_for_region(region))
        except Exception:  # older botocore, or a region it does not know yet
            return "aws"

    # ------------------------------------------------------------ per-run credentials
    def list_run_credentials(self) -> list[dict[str, Any]]:
        """The per-run IAM roles trainctl made (``name``, ``run_id``, ``store_url``, ``created_at``)."""
        try:
            return list_run_roles(self.client("iam"))
        except Exception as exc:
            raise explain_aws_error(exc, "list the per-run IAM roles", self.region, self.profile) from None

    def delete_run_credentials(self, name: str) -> bool:
        """Delete a per-run IAM role and its instance profile; False if there was none (or not ours)."""
        try:
            return delete_run_role(self.client("iam"), name, self.client("ssm"))
        except Exception as exc:
            raise explain_aws_error(exc, f"delete the IAM role {name}", self.region, self.profile) from None

    def _maybe_fail(self, step: str) -> None:
        steps = LAUNCH_STEPS + RECOVERY_STEPS + NODE_STEPS
        if self._fail_after is not None and self._fail_after not in steps:
            raise ConfigError(f"_fail_after={self._fail_after!r} is not a launch step: one of {', '.join(steps)}")
        if self._fail_after == step:
            raise ProviderError(f"injected failure after {step} (test hook)")

    def _wait_visible(self, ec2: Any, instance_id: str) -> dict[str, Any]:
        """The instance's description, once DescribeInstances knows it (EC2 is eventually consistent)."""
        deadline = time.monotonic() + self.visible_timeout_s
        while True:
            try:
                for reservation in ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]:
                    for raw in reservation["Instances"]:
                        return raw
            except ClientError as exc:
                if _error_code(exc) != "InvalidInstanceID.NotFound":
                    raise
            if time.monotonic() > deadline:
                raise ProviderError(f"{instance_id} was launched but is not visible after {self.visible_timeout_s:.0f} s")
            time.sleep(1.0)

    def _check_tags(self, ec2: Any, raw: dict[str, Any], tags: dict[str, str]) -> None:
        """Make sure the instance and each of its volumes carry our tags (add what is missing)."""
        missing = {k: v for k, v in tags.items() if _tag_dict(raw.get("Tags")).get(k) != v}
        resources = [raw["InstanceId"]] if missing else []
        for mapping in raw.get("BlockDeviceMappings", []):
            volume_id = mapping.get("Ebs", {}).get("VolumeId")
            if volume_id:
                volume = ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]
                if _tag_dict(volume.get("Tags")).get(TAG_MANAGED_BY) != MANAGED_BY:
                    resources.append(volume_id)
        if resources:
            ec2.create_tags(Resources=resources, Tags=_tag_list(tags))

    def _cleanup(self, ec2: Any, instance_id: str, region: str | None, step: str, exc: BaseException) -> str:
        what = f"launching {instance_id} failed at {step} ({exc})"
        try:
            ec2.terminate_instances(InstanceIds=[instance_id])
        except Exception as cleanup_exc:
            return (
                f"{what}, and terminating it failed too ({cleanup_exc}): terminate it by hand: "
                f"aws ec2 terminate-instances --region {region} --instance-ids {instance_id}"
            )
        return f"{what}; terminated {instance_id} (its volumes are deleted with it)"

    def _cleanup_unknown(self, ec2: Any, token: str, region: str | None, exc: BaseException) -> str:
        what = f"run_instances got no answer ({exc})"
        try:
            found = [
                i["InstanceId"]
                for r in ec2.describe_instances(Filters=[{"Name": "client-token", "Values": [token]}])["Reservations"]
                for i in r["Instances"]
            ]
            if found:
                ec2.terminate_instances(InstanceIds=found)
        except Exception as cleanup_exc:
            return (
                f"{what}, and looking for what it launched failed ({cleanup_exc}): check for an instance with "
                f"client token {token} in {region} (`trainctl gc --provider aws` lists instances with no live run)"
            )
        return f"{what}; terminated what it launched: {', '.join(found)}" if found else f"{what}; nothing was launched"

    # ------------------------------------------------------------ list, stop, terminate
    def list(self, include_terminated: bool = False) -> list[Instance]:
        """Instances tagged ``trainctl:managed-by`` in the region, newest first."""
        region = self.region
        states = _LIVE_STATES + (["terminated"] if include_terminated else [])
        filters = [
            {"Name": f"tag:{TAG_MANAGED_BY}", "Values": [MANAGED_BY]},
            {"Name": "instance-state-name", "Values": states},
        ]
        found: list[dict[str, Any]] = []
        try:
            for page in self.client("ec2", region).get_paginator("describe_instances").paginate(Filters=filters):
                for reservation in page["Reservations"]:
                    found += reservation["Instances"]
        except Exception as exc:
            raise explain_aws_error(exc, f"list instances in {region}", region, self.profile) from None
        found.sort(key=lambda raw: (raw["LaunchTime"], raw["InstanceId"]), reverse=True)
        return [self._to_instance(raw, region) for raw in found]

    def _get(self, instance_id: str) -> Instance:
        """The instance with this id, only if it carries our tag."""
        region = self.region
        try:
            reservations = self.client("ec2", region).describe_instances(
                InstanceIds=[instance_id], Filters=[{"Name": f"tag:{TAG_MANAGED_BY}", "Values": [MANAGED_BY]}]
            )["Reservations"]
        except ClientError as exc:
            if _error_code(exc) in ("InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"):
                reservations = []
            else:
                raise explain_aws_error(exc, f"describe {instance_id}", region, self.profile) from None
        except Exception as exc:
            raise explain_aws_error(exc, f"describe {instance_id}", region, self.profile) from None
        for reservation in reservations:
            for raw in reservation["Instances"]:
                return self._to_instance(raw, region)
        raise InstanceNotFoundError(
            f"no aws instance {instance_id!r} created by trainctl in {region} (none with that id carries the "
            f"{TAG_MANAGED_BY} tag); `trainctl ls --provider aws` lists them"
        )

    def stop(self, instance_id: str) -> Instance:
        """Stop an on-demand instance (its disk is kept). A one-time spot instance cannot be stopped.

        Raises:
            InstanceNotFoundError: trainctl created no instance with this id in the region.
            ProviderError: a spot instance, or one already terminated.
        """
        instance = self._get(instance_id)
        if instance.spot:
            raise ProviderError(
                f"{instance_id} is a one-time spot instance, which EC2 cannot stop: terminate it instead "
                "(its checkpoints are in the run store)"
            )
        if instance.state in (InstanceState.TERMINATING, InstanceState.TERMINATED):
            raise ProviderError(f"{instance_id} is {instance.state.value}: it cannot be stopped")
        if instance.state in (InstanceState.STOPPING, InstanceState.STOPPED):
            return instance
        try:
            self.client("ec2").stop_instances(InstanceIds=[instance_id])
        except Exception as exc:
            raise explain_aws_error(exc, f"stop {instance_id}", self.region, self.profile) from None
        return self._get(instance_id)

    def terminate(self, instance_id: str) -> Instance:
        """Terminate the instance (and its volumes). Idempotent.

        Raises:
            InstanceNotFoundError: trainctl created no instance with this id in the region (or it
                was terminated so long ago that EC2 forgot it).
        """
        instance = self._get(instance_id)
        group = instance.details.get("recovery_group")
        if group:  # a managed run: terminating only the instance would get it replaced
            self.terminate_group(str(group))
            return self._get(instance_id)
        if instance.state is not InstanceState.TERMINATED:
            try:
                self.client("ec2").terminate_instances(InstanceIds=[instance_id])
            except Exception as exc:
                raise explain_aws_error(exc, f"terminate {instance_id}", self.region, self.profile) from None
        store, run_id = instance.tags.get(TAG_STORE), instance.run_id
        if store and run_id:
            self._release_run(instance, run_id, store)
        return self._get(instance_id)

    def _release_run(self, instance: Instance, run_id: str, store: str) -> None:
        """Once no other instance of the run is up: delete the run's role and, for a multi-node
        run, its security group and placement group (retried while the instances shut down)."""
        region = self.region
        ec2 = self.client("ec2", region)
        cluster = instance.tags.get(TAG_CLUSTER)
        if cluster:  # a single-node run has no other node to wait for
            try:
                others = live_run_instances(ec2, run_id, store, exclude=(instance.id,))
            except Exception as exc:
                raise explain_aws_error(exc, f"list run {run_id}'s other instances", region, self.profile) from None
            if others:
                log.info("run %s still has %s up: its role and groups stay until the last one ends", run_id, ", ".join(others))
                return
        if store.startswith("s3://"):
            self._delete_run_role(run_role_for(run_url_in(store, run_id), {}), region)
        if not cluster:
            return
        try:
            deleted = delete_cluster(ec2, run_id, store, self.cluster_release_wait_s, self.cluster_release_poll_s)
            log.info("run %s ended: deleted %s", run_id, ", ".join(deleted) or "nothing (already gone)")
        except ProviderError as exc:  # the instances are terminated: what is left costs nothing, and gc deletes it
            log.error("trainctl: %s", exc)
        except Exception as exc:
            log.error("trainctl: %s", explain_aws_error(exc, f"delete run {run_id}'s placement and security groups", region))

    def list_cluster_resources(self) -> builtins.list[dict[str, Any]]:
        """Multi-node runs' placement groups and security groups, found by tag (see
        :func:`.aws_cluster.cluster_resources`), for ``trainctl gc``."""
        region = self.region
        try:
            return cluster_resources(self.client("ec2", region))
        except Exception as exc:
            raise explain_aws_error(
                exc, "list the placement and security groups of multi-node runs", region, self.profile
            ) from None

    def delete_cluster_resource(self, kind: str, ident: str, run_id: str, store_url: str | None) -> bool:
        """Delete one of a multi-node run's groups (retried while instances shut down); False if it
        was gone. Refused while an instance of its run is still up.

        Raises:
            ProviderError: an instance of the run is up, or EC2 refused.
        """
        region = self.region
        ec2 = self.client("ec2", region)
        try:
            live = live_run_instances(ec2, run_id, store_url)
            if live:
                raise ProviderError(f"run {run_id}'s {kind} {ident} is in use by its instances {', '.join(live)}: not deleted")
            return delete_cluster_resource(ec2, kind, ident, self.cluster_release_wait_s, self.cluster_release_poll_s)
        except TrainctlError:
            raise
        except Exception as exc:
            raise explain_aws_error(exc, f"delete run {run_id}'s {kind} {ident}", region, self.profile) from None

    def terminate_group(self, name: str) -> bool:
        """End a managed run's cloud side: its Auto Scaling group (with its instances), its launch
        template and its IAM role; whichever exist. Idempotent: False when none did.

        Only resources carrying trainctl's tags (and, for the role, its path) are touched.
        """
        region = self.region
        try:
            found = delete_group(self.client("autoscaling", region), self.client("ec2", region), name)
            found = delete_run_role(self.client("iam", region), name, self.client("ssm", region)) or found
        except Exception as exc:
            raise explain_aws_error(exc, f"delete the run's Auto Scaling group {name}", region, self.profile) from None
        return found

    def list_recovery_groups(self) -> builtins.list[dict[str, Any]]:
        """Managed runs' groups and templates (see :func:`.aws_recovery.list_groups`), for ``trainctl gc``."""
        region = self.region
        try:
            return list_groups(self.client("autoscaling", region), self.client("ec2", region))
        except Exception as exc:
            raise explain_aws_error(exc, "list the Auto Scaling groups of managed runs", region, self.profile) from None

    def delete_recovery_group(self, name: str) -> bool:
        """Delete a managed run's group, instances and template (not its role: gc judges that
        separately); False if there was none."""
        region = self.region
        try:
            return delete_group(self.client("autoscaling", region), self.client("ec2", region), name)
        except Exception as exc:
            raise explain_aws_error(exc, f"delete the Auto Scaling group {name}", region, self.profile) from None

    def _to_instance(self, raw: dict[str, Any], region: str | None) -> Instance:
        tags = _tag_dict(raw.get("Tags"))
        spot = raw.get("InstanceLifecycle") == "spot"
        launched = raw.get("LaunchTime")
        profile = (raw.get("IamInstanceProfile") or {}).get("Arn")
        details = {
            "image_id": raw.get("ImageId"),
            "availability_zone": (raw.get("Placement") or {}).get("AvailabilityZone"),
            "subnet_id": raw.get("SubnetId"),
            "vpc_id": raw.get("VpcId"),
            "private_ip": raw.get("PrivateIpAddress"),
            "public_ip": raw.get("PublicIpAddress"),
            "key_name": raw.get("KeyName"),
            "iam_instance_profile": profile,
            "spot_request_id": raw.get("SpotInstanceRequestId"),
            "state_reason": (raw.get("StateReason") or {}).get("Message"),
            # a managed run's instance: its group and the template (both named after the run's role)
            "recovery_group": tags.get(TAG_RECOVERY_GROUP),
            "launch_template": tags.get("aws:ec2launchtemplate:id"),
            # a multi-node run's instance: its node index and its placement/security groups' name
            "node": tags.get(TAG_NODE),
            "cluster": tags.get(TAG_CLUSTER),
        }
        return Instance(
            id=raw["InstanceId"],
            provider=self.name,
            state=_STATES.get(raw.get("State", {}).get("Name", ""), InstanceState.UNKNOWN),
            instance_type=raw.get("InstanceType", ""),
            spot=spot,
            region=region,
            created_at=launched.astimezone(timezone.utc).isoformat() if launched else None,
            name=tags.get(TAG_NAME),
            tags=tags,
            price_per_hour=None if spot else ON_DEMAND_PRICES.get(raw.get("InstanceType", "")),
            address=raw.get("PublicIpAddress") or raw.get("PrivateIpAddress"),
            details={k: v for k, v in details.items() if v not in (None, "")},
        )

    # ------------------------------------------------------------ agent
    def start_agent(self, instance: Instance, launch: AgentLaunch) -> None:
        """Check that ``instance`` was created for ``launch``'s run: its user data starts the agent at boot.

        Raises:
            ConfigError: ``launch`` forwards environment variables (AWS has no secret-free way to
                pass them; the instance profile gives the instance its store access).
            ProviderError: the instance is not pending/running, or its user data runs another run.
            NotImplementedError: the instance was created without a run (starting an agent on a
                running instance needs SSM Run Command, not supported yet).
        """
        current = self._get(instance.id)
        if launch.forward_env:
            raise ConfigError(
                f"AWSProvider cannot forward {', '.join(sorted(launch.forward_env))} to {instance.id}: user data is "
                "readable by anyone who can describe the instance; the instance reaches the store with its instance "
                "profile (`trainctl aws setup`), and other secrets need a secret store"
            )
        if not current.state.is_usable():
            raise ProviderError(f"{instance.id} is {current.state.value}: it cannot run {launch.run_id}")
        if current.run_id is None:
            raise NotImplementedError(
                f"{type(self).__name__} starts the agent from user data at boot: {instance.id} was created without a run, "
                "and starting one on a running instance needs SSM Run Command (not supported yet); create the instance "
                "for the run (InstanceSpec.run_url; `trainctl launch` does that)"
            )
        if current.run_id != launch.run_id:
            raise ProviderError(
                f"{instance.id} already ran its user data for run {current.run_id}; a second job ({launch.run_id}) on the "
                f"same instance needs SSM Run Command, which {type(self).__name__} does not support yet: create an instance "
                "per run"
            )
        if launch.run_key:
            self._deliver_run_key(current, launch)

    def _deliver_run_key(self, instance: Instance, launch: AgentLaunch) -> None:
        """Put the run's key where only the run's own role can read it (see ``aws_run_role``)."""
        role = run_role_for(
            launch.run_url, standard_tags({}, run_id=launch.run_id), self._partition(instance.region or self.region or "")
        )
        profile = str(instance.details.get("iam_instance_profile") or "")
        if not profile.endswith(f"instance-profile{RUN_ROLE_PATH}{role.name}"):
            # The shared profile can read every run's parameters, so a key there would prove nothing.
            log.warning(
                "trainctl: %s runs with a shared instance profile, so run %s's key cannot reach it privately: remote calls "
                "(RemoteStrategy, remote()) of this run will be refused; leave aws option run_credentials on for them",
                instance.id,
                launch.run_id,
            )
            return
        try:
            put_run_key(self.client("ssm", instance.region), role, launch.run_key)
        except Exception as exc:
            raise explain_aws_error(exc, f"store run {launch.run_id}'s key in SSM", instance.region, self.profile) from None

    def fetch_run_key(self) -> str | None:
        """On the instance: the run's key from the SSM parameter the boot script names, if any."""
        parameter = os.environ.get(RUN_KEY_PARAMETER_ENV)
        if not parameter:
            return None
        wait_s = float(os.environ.get("TRAINCTL_RUN_KEY_WAIT_S", "300"))
        try:
            return fetch_run_key(self.client("ssm"), parameter, wait_s)
        except TrainctlError:
            raise
        except Exception as exc:
            raise explain_aws_error(
                exc, f"read the run's key from SSM parameter {parameter}", self.region, self.profile
            ) from None

    def own_instance_id(self) -> str | None:
        """On the instance: its id, from the metadata service (IMDSv2; ``$TRAINCTL_IMDS_ENDPOINT`` overrides it).

        Raises:
            ProviderError: the metadata service does not answer (not on EC2, or IMDS disabled).
        """
        return self._metadata("/latest/meta-data/instance-id")

    def node_address(self) -> str:
        """On the instance: its private IPv4 (what the run's other nodes, in its security group, reach)."""
        return self._metadata("/latest/meta-data/local-ipv4")

    #: Attempts and per-attempt timeout for the metadata service (it answers fast, or is not there).
    metadata_attempts = 3
    metadata_timeout_s = 2.0

    def _metadata(self, path: str) -> str:
        from trainctl_lightning.agent.spot import DEFAULT_ENDPOINT, IMDS_ENDPOINT_ENV, MetadataClient

        endpoint = os.environ.get(IMDS_ENDPOINT_ENV) or DEFAULT_ENDPOINT
        client = MetadataClient(endpoint, timeout_s=self.metadata_timeout_s)
        problem = ""
        for attempt in range(self.metadata_attempts):
            try:
                status, body = client.get(path)
            except (OSError, http.client.HTTPException) as exc:
                problem = f"{type(exc).__name__}: {exc}"
                time.sleep(0.2 * (attempt + 1))
                continue
            value = body.decode(errors="replace").strip()
            if status == 200 and value:
                return value
            problem = f"HTTP {status}"
            break
        raise ProviderError(
            f"cannot read {path} from the instance metadata service at {endpoint} ({problem}): the agent of a "
            f"multi-node run must run on its EC2 instance, with the metadata service enabled (IMDSv2)"
        )

    def release_from_agent(self, instance_id: str, *, run_over: bool = True) -> None:
        """Power the instance off from the inside, which terminates it (no AWS permission needed).

        In a managed run (aws option ``recover``) whose run is over (``run_over``), first delete
        the run's Auto Scaling group and template, with the run's own role, so that AWS does not
        replace the instance; with ``run_over=False`` (a restart is due) only power off, and the
        group starts the replacement.

        Raises:
            ProviderError: the shutdown command failed.
        """
        if run_over and os.environ.get(RECOVERY_GROUP_ENV):
            try:
                group = release_group_from_instance(self.client("autoscaling"), self.client("ec2"))
                log.info("deleted the run's Auto Scaling group and launch template %s", group)
            except Exception as exc:  # power off all the same: the group's lifetime and gc end it
                log.error(
                    "trainctl: could not delete the run's Auto Scaling group %s (%s): AWS may start another instance; "
                    "`trainctl gc --provider aws --yes` deletes it",
                    os.environ.get(RECOVERY_GROUP_ENV),
                    explain_aws_error(exc, "delete the run's Auto Scaling group", self.region, self.profile),
                )
        command = self.shutdown_command
        if command is None:
            configured = os.environ.get("TRAINCTL_SHUTDOWN_CMD")
            command = shlex.split(configured) if configured else ["shutdown", "-h", "now"]
            if not configured and hasattr(os, "geteuid") and os.geteuid() != 0:
                command = ["sudo", "-n", *command]
        log.info("releasing %s: %s", instance_id, shlex.join(command))
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            raise ProviderError(
                f"could not power off {instance_id} with `{shlex.join(command)}`: {exc} {detail.decode(errors='replace').strip()}"
            ) from exc

    # ------------------------------------------------------------ store
    def check_store(self, store_url: str) -> None:
        """Refuse a store that is not S3, or whose bucket is not writable from here."""
        super().check_store(store_url)
        from trainctl_lightning.store import ObjectStore

        options = {"client_kwargs": {"endpoint_url": self.endpoint_url}} if self.endpoint_url else None
        ObjectStore(store_url, options).check_writable()
