"""Per-run credentials on AWS: an IAM role and instance profile made for one run, and deleted after it.

The role ``trainctl aws setup`` makes lets an instance read and write every run under the store
prefix, so a job (or one of its dependencies) could rewrite another run's results. Instances of a
run launched by trainctl get their own role instead, whose only S3 rights are:

* read, write and delete ``<store>/<run id>/*`` (list that prefix);
* read ``<store>/_code/blobs/*`` (the code, content-addressed, shared by runs) and
  ``<store>/_dist/*`` (the wheel of trainctl the instance installs, hash-checked as well).

Why a role per run and not a session policy on the shared role: a session policy would be applied
by the agent on the instance, which the job it runs could skip (it can read the instance
profile's own credentials from the metadata service). The per-run role is the instance profile,
so nothing on the instance holds broader credentials. It costs three IAM calls at launch and
needs the launcher to be allowed ``iam:CreateRole``, ``iam:PutRolePolicy``,
``iam:CreateInstanceProfile``, ``iam:AddRoleToInstanceProfile``, ``iam:PassRole`` and the
matching deletes on ``role/trainctl/runs/*`` and ``instance-profile/trainctl/runs/*``.

The role and profile live under the IAM path :data:`RUN_ROLE_PATH`, carry trainctl's tags and the
run's, and are deleted when trainctl terminates the instance, when a launch fails, and by
``trainctl gc`` once no live instance runs the run (the instance usually powers itself off).

Internal: not part of the public API; it may change without notice.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from trainctl_lightning.providers.aws_recovery import group_policy_statements
from trainctl_lightning.store.layout import CODE_BLOBS, DIST, TAG_MANAGED_BY, TAG_RUN_ID, TAG_STORE, split_run_url

__all__ = [
    "RUN_KEY_PARAMETER_ENV",
    "RUN_ROLE_PATH",
    "RunRole",
    "create_run_role",
    "delete_run_key",
    "delete_run_role",
    "fetch_run_key",
    "list_run_roles",
    "put_run_key",
    "run_key_parameter",
    "run_role_for",
]

log = logging.getLogger(__name__)

#: IAM path of every per-run role and instance profile (lists and permissions select on it).
RUN_ROLE_PATH = "/trainctl/runs/"
_TRUST_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
}
_POLICY_NAME = "trainctl-run-store"
#: Exported by the boot script: the SSM parameter holding the run's key (its name, not the key).
RUN_KEY_PARAMETER_ENV = "TRAINCTL_RUN_KEY_PARAMETER"


def run_key_parameter(role_name: str) -> str:
    """The SSM parameter (a SecureString) that carries the run's key to its instance: readable by
    the run's own role only, never in the store or the user data, deleted with the role."""
    return f"{RUN_ROLE_PATH}{role_name}/run-key"


@dataclass(frozen=True)
class RunRole:
    """The role (and same-named instance profile) a run's instance gets."""

    name: str
    """``trainctl-run-<run id, cut>-<hash of the run URL>``: at most 64 characters, one per run URL."""
    run_id: str
    store_url: str
    policy: dict[str, Any] = field(compare=False)
    """The inline policy: the run's objects, read-only code blobs and wheels; nothing else."""
    tags: dict[str, str] = field(default_factory=dict, compare=False)

    def describe(self) -> str:
        return (
            f"IAM role and instance profile {RUN_ROLE_PATH}{self.name} for this run only: read/write "
            f"{self.store_url}/{self.run_id}/*, read-only {CODE_BLOBS} and {DIST} (deleted after the run)"
        )


def run_role_for(run_url: str, tags: dict[str, str], partition: str = "aws", *, recovery: bool = False) -> RunRole:
    """The role for ``run_url`` (``s3://bucket/prefix/<run id>``), with its policy; creates nothing.

    With ``recovery`` (a managed run, :mod:`.aws_recovery`), the role may also delete the run's
    Auto Scaling group and launch template, which carry the role's name, and nothing else.
    """
    store_url, run_id = split_run_url(run_url)
    bucket, _, prefix = store_url[len("s3://") :].partition("/")
    prefix = prefix.strip("/")
    base = f"{prefix}/" if prefix else ""
    digest = hashlib.sha256(run_url.encode()).hexdigest()[:8]
    name = f"trainctl-run-{run_id[:38]}-{digest}"
    arn = f"arn:{partition}:s3:::{bucket}"
    run_prefix = f"{base}{run_id}"
    policy: dict[str, Any] = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "ListTheRun",
                "Effect": "Allow",
                "Action": "s3:ListBucket",
                "Resource": arn,
                "Condition": {
                    "StringLike": {"s3:prefix": [run_prefix, f"{run_prefix}/*", f"{base}{CODE_BLOBS}/*", f"{base}{DIST}/*"]}
                },
            },
            {"Sid": "LocateTheStore", "Effect": "Allow", "Action": "s3:GetBucketLocation", "Resource": arn},
            {
                "Sid": "ReadWriteTheRun",
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"],
                "Resource": f"{arn}/{run_prefix}/*",
            },
            {
                "Sid": "ReadTheRunKey",
                "Effect": "Allow",
                "Action": "ssm:GetParameter",
                "Resource": f"arn:{partition}:ssm:*:*:parameter{run_key_parameter(name)}",
            },
            {
                "Sid": "ReadCodeAndWheels",
                "Effect": "Allow",
                "Action": "s3:GetObject",
                "Resource": [f"{arn}/{base}{CODE_BLOBS}/*", f"{arn}/{base}{DIST}/*"],
            },
        ],
    }
    if recovery:
        policy["Statement"] += group_policy_statements(name, partition)
    return RunRole(
        name=name,
        run_id=run_id,
        store_url=store_url,
        policy=policy,
        tags={**tags, TAG_RUN_ID: run_id, TAG_STORE: store_url},
    )


def _tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in sorted(tags.items())]


def create_run_role(iam: Any, role: RunRole) -> str:
    """Create the role, its policy and its instance profile; returns the profile's ARN.

    A half-made role (a failure part way) is deleted before the error goes up.
    """
    tags = _tag_list(role.tags)
    try:
        iam.create_role(
            Path=RUN_ROLE_PATH,
            RoleName=role.name,
            AssumeRolePolicyDocument=json.dumps(_TRUST_POLICY),
            Description=f"trainctl-lightning run {role.run_id}: its own objects in the store only",
            Tags=tags,
        )
        iam.put_role_policy(RoleName=role.name, PolicyName=_POLICY_NAME, PolicyDocument=json.dumps(role.policy))
        profile = iam.create_instance_profile(InstanceProfileName=role.name, Path=RUN_ROLE_PATH, Tags=tags)
        iam.add_role_to_instance_profile(InstanceProfileName=role.name, RoleName=role.name)
    except BaseException:
        delete_run_role(iam, role.name)
        raise
    return str(profile["InstanceProfile"]["Arn"])


def put_run_key(ssm: Any, role: RunRole, key: str) -> None:
    """Store the run's key where only ``role`` can read it (SSM SecureString, KMS key ``aws/ssm``)."""
    ssm.put_parameter(
        Name=run_key_parameter(role.name),
        Description=f"trainctl-lightning run {role.run_id}: the key that signs its remote payload and result",
        Value=key,
        Type="SecureString",
        Overwrite=True,  # a relaunch of the same run brings the same key; the launcher is authoritative
    )
    ssm.add_tags_to_resource(ResourceType="Parameter", ResourceId=run_key_parameter(role.name), Tags=_tag_list(role.tags))


def delete_run_key(ssm: Any, name: str) -> bool:
    """Delete the run key parameter of role ``name``; False if there was none."""
    try:
        ssm.delete_parameter(Name=run_key_parameter(name))
    except ssm.exceptions.ParameterNotFound:
        return False
    return True


def fetch_run_key(ssm: Any, parameter: str, wait_s: float, *, sleep: Any = None) -> str:
    """On the instance: the run's key from ``parameter``, waiting up to ``wait_s`` for the launcher
    to put it there (it does so right after RunInstances returns, while the instance boots).

    Raises:
        ProviderError: the parameter did not appear in time.
    """
    import time

    from trainctl_lightning.errors import ProviderError

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return str(ssm.get_parameter(Name=parameter, WithDecryption=True)["Parameter"]["Value"])
        except ssm.exceptions.ParameterNotFound:
            if time.monotonic() > deadline:
                raise ProviderError(
                    f"the run's key is not in SSM parameter {parameter} after {wait_s:g}s: the launcher puts it there "
                    "after creating the instance; remote calls of this run will be refused (launch it again)"
                ) from None
            (sleep or time.sleep)(2.0)


def delete_run_role(iam: Any, name: str, ssm: Any = None) -> bool:
    """Delete a per-run role, its instance profile and (given ``ssm``) its key parameter, whatever
    part of them exists; True if any did.

    Only a role under :data:`RUN_ROLE_PATH` tagged by trainctl is touched.
    """
    found = False
    try:
        role = iam.get_role(RoleName=name)["Role"]
    except iam.exceptions.NoSuchEntityException:
        role = None
    if role is not None:
        tags = role.get("Tags")
        if tags is None:
            tags = iam.list_role_tags(RoleName=name).get("Tags", [])
        if role.get("Path") != RUN_ROLE_PATH or not any(t.get("Key") == TAG_MANAGED_BY for t in tags):
            log.warning("trainctl: IAM role %s is not a trainctl run role: left alone", name)
            return False
    try:
        profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    except iam.exceptions.NoSuchEntityException:
        profile = None
    if profile is not None and profile.get("Path") == RUN_ROLE_PATH:
        for attached in profile.get("Roles", []):
            iam.remove_role_from_instance_profile(InstanceProfileName=name, RoleName=attached["RoleName"])
        iam.delete_instance_profile(InstanceProfileName=name)
        found = True
    if role is not None:
        for policy in iam.list_role_policies(RoleName=name).get("PolicyNames", []):
            iam.delete_role_policy(RoleName=name, PolicyName=policy)
        iam.delete_role(RoleName=name)
        found = True
    if ssm is not None and delete_run_key(ssm, name):
        found = True
    return found


def list_run_roles(iam: Any) -> list[dict[str, Any]]:
    """Every per-run role trainctl made: ``name``, ``run_id``, ``store_url``, ``created_at`` (UTC ISO)."""
    found: list[dict[str, Any]] = []
    for page in iam.get_paginator("list_roles").paginate(PathPrefix=RUN_ROLE_PATH):
        for role in page["Roles"]:
            if role.get("Path") != RUN_ROLE_PATH:  # not every endpoint applies PathPrefix
                continue
            tags = {t["Key"]: t["Value"] for t in iam.list_role_tags(RoleName=role["RoleName"]).get("Tags", [])}
            if TAG_MANAGED_BY not in tags:
                continue
            found.append(
                {
                    "name": role["RoleName"],
                    "run_id": tags.get(TAG_RUN_ID),
                    "store_url": tags.get(TAG_STORE),
                    "created_at": role["CreateDate"].isoformat(),
                }
            )
    return found
