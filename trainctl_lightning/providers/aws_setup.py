"""``trainctl aws setup``: create, once, what the AWS provider's instances need.

* an IAM role that EC2 can assume, with an inline least-privilege policy per run-store bucket
  (list the bucket or prefix; get, put and delete objects under it; nothing else);
* an instance profile holding that role (:data:`~.aws.DEFAULT_INSTANCE_PROFILE`, which
  ``AWSProvider.create`` uses when the options name none);
* a security group with no inbound rule in the default VPC (or ``vpc_id``), tagged so that
  ``create`` finds it by tag.

Running it again finds what exists and changes only what differs. A role, profile or group of
the same name that trainctl did not create is never adopted: that is an error.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import asdict, dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from trainctl_lightning.errors import ConfigError, TrainctlError
from trainctl_lightning.providers.api import MANAGED_BY, standard_tags
from trainctl_lightning.providers.aws import (
    DEFAULT_INSTANCE_PROFILE,
    SECURITY_GROUP_PURPOSE,
    AWSProvider,
    explain_aws_error,
)
from trainctl_lightning.store.layout import TAG_MANAGED_BY, TAG_PURPOSE

__all__ = ["ROLE_NAME", "SECURITY_GROUP_NAME", "SetupResult", "SetupStep", "bucket_policy", "setup_aws"]

ROLE_NAME = DEFAULT_INSTANCE_PROFILE
SECURITY_GROUP_NAME = "trainctl-lightning"
_TRUST_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
}


@dataclass
class SetupStep:
    """One resource ``setup_aws`` looked at."""

    resource: str
    """``iam role``, ``role policy``, ``instance profile`` or ``security group``."""
    name: str
    action: str
    """``created``, ``found`` (already as wanted) or ``updated``."""
    id: str | None = None
    """ARN or resource id."""


@dataclass
class SetupResult:
    region: str
    bucket: str
    prefix: str | None
    instance_profile: str
    security_group_id: str
    steps: list[SetupStep] = field(default_factory=list)

    @property
    def options(self) -> dict[str, Any]:
        """The aws options that use what was set up (``create`` also finds them by itself)."""
        return {"iam_instance_profile": self.instance_profile, "security_group_ids": [self.security_group_id]}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["options"] = self.options
        return data


def bucket_policy(bucket: str, prefix: str | None = None, partition: str = "aws") -> dict[str, Any]:
    """The least-privilege policy for a run store at ``s3://bucket/prefix``."""
    prefix = (prefix or "").strip("/")
    objects = f"arn:{partition}:s3:::{bucket}/{prefix + '/' if prefix else ''}*"
    listing: dict[str, Any] = {
        "Sid": "ListRunStore",
        "Effect": "Allow",
        "Action": "s3:ListBucket",
        "Resource": f"arn:{partition}:s3:::{bucket}",
    }
    if prefix:
        listing["Condition"] = {"StringLike": {"s3:prefix": [prefix, f"{prefix}/*"]}}
    return {
        "Version": "2012-10-17",
        "Statement": [
            listing,
            {
                "Sid": "LocateRunStore",
                "Effect": "Allow",
                "Action": "s3:GetBucketLocation",
                "Resource": f"arn:{partition}:s3:::{bucket}",
            },
            {
                "Sid": "ReadWriteRunStore",
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"],
                "Resource": objects,
            },
        ],
    }


def _policy_name(bucket: str) -> str:
    return f"trainctl-store-{bucket}"[:128]


def _document(raw: Any) -> Any:
    """IAM returns policy documents URL-encoded; boto3 decodes them, some endpoints do not."""
    if isinstance(raw, str):
        return json.loads(urllib.parse.unquote(raw))
    return raw


def _ours(tags: list[dict[str, str]] | None) -> bool:
    return any(t.get("Key") == TAG_MANAGED_BY and t.get("Value") == MANAGED_BY for t in tags or [])


def setup_aws(
    bucket: str,
    *,
    prefix: str | None = None,
    region: str | None = None,
    profile: str | None = None,
    endpoint_url: str | None = None,
    session: Any = None,
    vpc_id: str | None = None,
) -> SetupResult:
    """Create (or find) the role, instance profile and security group for a run store bucket.

    Args:
        bucket: the run store's bucket (``s3://BUCKET/...``); the role may use nothing else.
        prefix: restrict the role to keys under this prefix of the bucket.
        vpc_id: VPC of the security group; default: the region's default VPC.

    Raises:
        ConfigError: no credentials or region, a bad bucket name, no default VPC, or a same-named
            resource that trainctl did not create.
        ProviderError: AWS refused a call (permissions, say).
    """
    if bucket.startswith("s3://"):
        bucket, _, url_prefix = bucket[len("s3://") :].partition("/")
        prefix = prefix or url_prefix or None
    if not bucket or "/" in bucket:
        raise ConfigError(f"bucket must be a bucket name (or s3://bucket/prefix), got {bucket!r}")
    provider = AWSProvider(region=region, profile=profile, endpoint_url=endpoint_url, session=session)
    region = provider.region or ""
    if not region:
        from trainctl_lightning.providers.aws import no_region_error

        raise no_region_error("set up AWS")
    provider._check_credentials(f"set up AWS in {region}")
    try:
        partition = provider.session.get_partition_for_region(region)
    except Exception:  # older botocore, or a region it does not know yet
        partition = "aws"
    result = SetupResult(region=region, bucket=bucket, prefix=prefix, instance_profile=ROLE_NAME, security_group_id="")
    tags = [{"Key": k, "Value": v} for k, v in sorted(standard_tags().items())]
    step = "set up the IAM role"
    try:
        iam = provider.client("iam", region)
        result.steps.append(_ensure_role(iam, tags))
        step = "set up the role's policy"
        result.steps.append(_ensure_policy(iam, bucket_policy(bucket, prefix, partition), _policy_name(bucket)))
        step = "set up the instance profile"
        result.steps.extend(_ensure_instance_profile(iam, tags))
        step = "set up the security group"
        sg = _ensure_security_group(provider.client("ec2", region), vpc_id, region, tags)
        result.security_group_id = sg.id or ""
        result.steps.append(sg)
    except TrainctlError:
        raise
    except Exception as exc:
        raise explain_aws_error(exc, step, region, profile) from None
    return result


def _ensure_role(iam: Any, tags: list[dict[str, str]]) -> SetupStep:
    try:
        role = iam.get_role(RoleName=ROLE_NAME)["Role"]
    except iam.exceptions.NoSuchEntityException:
        role = iam.create_role(
            RoleName=ROLE_NAME,
            AssumeRolePolicyDocument=json.dumps(_TRUST_POLICY),
            Description="trainctl-lightning instances: read and write the run store",
            Tags=tags,
        )["Role"]
        return SetupStep("iam role", ROLE_NAME, "created", role["Arn"])
    role_tags = role.get("Tags")
    if role_tags is None:  # get_role leaves tags out on some endpoints
        role_tags = iam.list_role_tags(RoleName=ROLE_NAME).get("Tags", [])
    if not _ours(role_tags):
        raise ConfigError(
            f"IAM role {ROLE_NAME} exists but was not created by trainctl (no {TAG_MANAGED_BY} tag): "
            "delete or rename it, or pass your own iam_instance_profile option and skip setup"
        )
    return SetupStep("iam role", ROLE_NAME, "found", role["Arn"])


def _ensure_policy(iam: Any, policy: dict[str, Any], name: str) -> SetupStep:
    try:
        current = _document(iam.get_role_policy(RoleName=ROLE_NAME, PolicyName=name)["PolicyDocument"])
    except iam.exceptions.NoSuchEntityException:
        current = None
    if current == policy:
        return SetupStep("role policy", name, "found")
    iam.put_role_policy(RoleName=ROLE_NAME, PolicyName=name, PolicyDocument=json.dumps(policy))
    return SetupStep("role policy", name, "created" if current is None else "updated")


def _ensure_instance_profile(iam: Any, tags: list[dict[str, str]]) -> list[SetupStep]:
    try:
        profile = iam.get_instance_profile(InstanceProfileName=DEFAULT_INSTANCE_PROFILE)["InstanceProfile"]
        action = "found"
        if not _ours(profile.get("Tags")) and not _ours(
            iam.list_instance_profile_tags(InstanceProfileName=DEFAULT_INSTANCE_PROFILE).get("Tags")
        ):
            raise ConfigError(
                f"instance profile {DEFAULT_INSTANCE_PROFILE} exists but was not created by trainctl (no {TAG_MANAGED_BY} tag): "
                "delete it, or pass your own iam_instance_profile option and skip setup"
            )
    except iam.exceptions.NoSuchEntityException:
        profile = iam.create_instance_profile(InstanceProfileName=DEFAULT_INSTANCE_PROFILE, Tags=tags)["InstanceProfile"]
        action = "created"
    steps = [SetupStep("instance profile", DEFAULT_INSTANCE_PROFILE, action, profile["Arn"])]
    if ROLE_NAME not in [r["RoleName"] for r in profile.get("Roles", [])]:
        iam.add_role_to_instance_profile(InstanceProfileName=DEFAULT_INSTANCE_PROFILE, RoleName=ROLE_NAME)
        steps.append(SetupStep("profile role", f"{DEFAULT_INSTANCE_PROFILE} -> {ROLE_NAME}", "created"))
    return steps


def _ensure_security_group(ec2: Any, vpc_id: str | None, region: str, tags: list[dict[str, str]]) -> SetupStep:
    if vpc_id is None:
        vpcs = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise ConfigError(f"{region} has no default VPC: pass --vpc-id (and the subnet_id option when launching)")
        vpc_id = vpcs[0]["VpcId"]
    found = ec2.describe_security_groups(
        Filters=[
            {"Name": f"tag:{TAG_MANAGED_BY}", "Values": [MANAGED_BY]},
            {"Name": f"tag:{TAG_PURPOSE}", "Values": [SECURITY_GROUP_PURPOSE]},
            {"Name": "vpc-id", "Values": [vpc_id]},
        ]
    )["SecurityGroups"]
    if found:
        return SetupStep("security group", f"{SECURITY_GROUP_NAME} in {vpc_id}", "found", found[0]["GroupId"])
    try:
        group_id = ec2.create_security_group(
            GroupName=SECURITY_GROUP_NAME,
            Description="trainctl-lightning instances: no inbound access (jobs arrive through S3)",
            VpcId=vpc_id,
            TagSpecifications=[
                {"ResourceType": "security-group", "Tags": tags + [{"Key": TAG_PURPOSE, "Value": SECURITY_GROUP_PURPOSE}]}
            ],
        )["GroupId"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "InvalidGroup.Duplicate":
            raise ConfigError(
                f"a security group named {SECURITY_GROUP_NAME} already exists in {vpc_id} but is not tagged by trainctl: "
                "delete it, or pass your own security_group_ids option"
            ) from None
        raise
    # a new group has no inbound rule and allows all outbound traffic (S3, PyPI): nothing to add
    return SetupStep("security group", f"{SECURITY_GROUP_NAME} in {vpc_id}", "created", group_id)
