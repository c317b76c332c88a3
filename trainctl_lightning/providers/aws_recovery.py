"""Managed runs on AWS: an EC2 Auto Scaling group of one, built from the run's launch template.

With the aws option ``recover`` (``InstanceSpec.options["recover"]``), ``AWSProvider`` does not
call RunInstances. It creates

* a **launch template** holding exactly what RunInstances would have been given (the boot script
  from :func:`~.aws_bootstrap.render_user_data`, the run's own instance profile from
  :mod:`.aws_run_role`, IMDSv2, the root volume, the tags of instance, volumes and network
  interface), and
* an **Auto Scaling group** with min = max = desired = 1 over the run's subnets (every default
  subnet of the default VPC: one per availability zone), whose tags propagate to its instances.

AWS then replaces an instance that is reclaimed or lost, with the launcher offline; the new one
boots the same user data, so its agent finds the run in the store and resumes. When the run is
over, the agent on the instance deletes the group (``ForceDelete``, which terminates the
instance) and the template (:func:`release_group_from_instance`), with rights its per-run role
holds on that group and template only (:func:`group_policy_statements`). ``trainctl terminate``
/ cancel delete group, template and role from the launcher, and ``trainctl gc`` deletes groups
whose run is over (:func:`list_groups`, :func:`delete_group`).

Limits enforced on the cloud side:

* each instance powers itself off at the max runtime (the boot script's timer, as without
  ``recover``);
* the run as a whole: with ``max_hours``, a scheduled action sets the group to 0 instances at
  creation + ``max_hours``; gc then deletes the empty group;
* max restarts: counted by the agent on each new instance from the run's attempts in the store,
  which ends the run (and so deletes the group) when they are used up. AWS itself has no count.

Why an Auto Scaling group and not an EC2 Fleet of type ``maintain``: both replace lost capacity,
but a group has a name we choose (so the per-run role can be scoped to it by ARN, and the agent
and gc find it without a list), scheduled actions (the run's lifetime), ``ForceDelete`` (one
call ends group and instances), and its tags propagate to the instances. A fleet's id is
AWS-made, has no scheduled lifetime other than ``ValidUntil``, and ``DeleteFleets`` must be
told to terminate instances.

The request shape, on real AWS (``AWSProvider.instances_distribution = True``, the default)::

    CreateAutoScalingGroup(
        AutoScalingGroupName=<name>, MinSize=1, MaxSize=1, DesiredCapacity=1,
        VPCZoneIdentifier="subnet-a,subnet-b,...",
        MixedInstancesPolicy={
            "LaunchTemplate": {"LaunchTemplateSpecification": {"LaunchTemplateName": <name>, "Version": "$Latest"},
                               "Overrides": [{"InstanceType": t} for t in instance_types]},
            "InstancesDistribution": {"OnDemandBaseCapacity": 0,
                                      "OnDemandPercentageAboveBaseCapacity": 0 if spot else 100,
                                      "SpotAllocationStrategy": "capacity-optimized"}},
        Tags=[{..., "PropagateAtLaunch": True}])

and the template then carries no ``InstanceMarketOptions`` (AWS refuses a spot template in a
mixed instances policy: the distribution says spot or not).

What moto 5.2 does (tests/test_aws_recovery.py checks it): it creates the template and the group,
starts the instance, propagates the tags, replaces an instance terminated through
``ec2.terminate_instances`` or ``terminate_instance_in_auto_scaling_group``, stores scheduled
actions (never runs them), and deletes group and instances with ``ForceDelete``. A
``MixedInstancesPolicy`` with ``InstancesDistribution`` gets a 500. So the tests run with
``AWSProvider.instances_distribution = False``: the group's policy has only the template and the
overrides, and spot is asked for in the template's ``InstanceMarketOptions``, which moto accepts
(real AWS would refuse that combination; it is the test shape only). moto also ignores the
template's spot options, metadata options and instance profile on the instances it starts.

Not done yet: ``on_demand_fallback``. An Auto Scaling group has no automatic spot-to-on-demand
fallback; it would need the launcher (or a Lambda) to switch ``OnDemandPercentageAboveBaseCapacity``
to 100 after failed spot launches. The option is checked and shown in the plan, and does nothing.

Internal: not part of the public API; it may change without notice.
"""

from __future__ import annotations

import base64
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from trainctl_lightning.errors import ConfigError, ProviderError
from trainctl_lightning.store.layout import TAG_MANAGED_BY, TAG_RUN_ID, TAG_STORE

__all__ = [
    "LIFETIME_ACTION",
    "RECOVERY_GROUP_ENV",
    "RECOVER_KEYS",
    "TAG_RECOVERY_GROUP",
    "RecoverOptions",
    "check_recover_options",
    "delete_group",
    "group_policy_statements",
    "group_request",
    "lifetime_action",
    "list_groups",
    "release_group_from_instance",
    "template_request",
    "wait_first_instance",
]

log = logging.getLogger(__name__)

#: Tag on the template, the group and (propagated) its instances: the group's name.
TAG_RECOVERY_GROUP = "trainctl:recovery-group"
#: Exported by the boot script of a managed run: the group (and template) the instance belongs to.
RECOVERY_GROUP_ENV = "TRAINCTL_RECOVERY_GROUP"
#: The scheduled action that empties the group at the end of the run's ``max_hours``.
LIFETIME_ACTION = "trainctl-run-lifetime"
#: Keys of the ``recover`` option, with what each means.
RECOVER_KEYS: dict[str, str] = {
    "max_restarts": "how many times the run may start again on a new instance (a whole number >= 0)",
    "max_hours": "the run's total lifetime in hours, all instances together (a positive number, or null)",
    "instance_types": "the instance types AWS may pick from (default: the spec's instance type)",
    "on_demand_fallback": "true/false: fall back to on-demand when there is no spot capacity (not enforced yet)",
}


@dataclass(frozen=True)
class RecoverOptions:
    """The checked ``recover`` option."""

    max_restarts: int
    max_hours: float | None
    instance_types: list[str] = field(default_factory=list)
    on_demand_fallback: bool = False


def check_recover_options(raw: Any, default_type: str) -> RecoverOptions:
    """Check the ``recover`` option; one line naming the bad value otherwise.

    Raises:
        ConfigError: not a mapping, an unknown key, or a value of the wrong kind.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"aws option recover must be a mapping with {', '.join(RECOVER_KEYS)}, got {raw!r}")
    for key in raw:
        if key not in RECOVER_KEYS:
            raise ConfigError(f"unknown key {key!r} in aws option recover: it knows {', '.join(RECOVER_KEYS)}")
    restarts = raw.get("max_restarts")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0:
        raise ConfigError(f"aws option recover.max_restarts must be a whole number >= 0, got {restarts!r}")
    hours = raw.get("max_hours")
    if hours is not None and (isinstance(hours, bool) or not isinstance(hours, (int, float)) or not 0 < hours < 24 * 366):
        raise ConfigError(f"aws option recover.max_hours must be a positive number of hours (or null), got {hours!r}")
    types = raw.get("instance_types") or [default_type]
    if not isinstance(types, (list, tuple)) or not all(isinstance(t, str) and t for t in types):
        raise ConfigError(f"aws option recover.instance_types must be a list of instance types, got {raw['instance_types']!r}")
    if len(set(types)) != len(types) or len(types) > 20:
        raise ConfigError(f"aws option recover.instance_types must be at most 20 distinct types, got {list(types)!r}")
    fallback = raw.get("on_demand_fallback", False)
    if not isinstance(fallback, bool):
        raise ConfigError(f"aws option recover.on_demand_fallback must be true or false, got {fallback!r}")
    return RecoverOptions(restarts, None if hours is None else float(hours), list(types), fallback)


def group_policy_statements(group_name: str, partition: str = "aws") -> list[dict[str, Any]]:
    """What a run's role needs to end its own group from the instance: delete that group (by its
    name, in the ARN) and the template tagged with that name; nothing else."""
    return [
        {
            "Sid": "EndTheRunsGroup",
            "Effect": "Allow",
            "Action": "autoscaling:DeleteAutoScalingGroup",
            "Resource": f"arn:{partition}:autoscaling:*:*:autoScalingGroup:*:autoScalingGroupName/{group_name}",
        },
        {
            "Sid": "DeleteTheRunsTemplate",
            "Effect": "Allow",
            "Action": "ec2:DeleteLaunchTemplate",
            "Resource": f"arn:{partition}:ec2:*:*:launch-template/*",
            "Condition": {"StringEquals": {f"aws:ResourceTag/{TAG_RECOVERY_GROUP}": group_name}},
        },
    ]


def _tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in sorted(tags.items())]


def template_request(
    name: str, run_instances: dict[str, Any], user_data: str, tags: dict[str, str], *, spot_in_template: bool
) -> dict[str, Any]:
    """CreateLaunchTemplate's arguments, from the RunInstances request the run would have made."""
    data: dict[str, Any] = {
        key: run_instances[key]
        for key in (
            "ImageId",
            "InstanceType",
            "InstanceInitiatedShutdownBehavior",
            "MetadataOptions",
            "BlockDeviceMappings",
            "SecurityGroupIds",
            "KeyName",
            "IamInstanceProfile",
        )
        if key in run_instances
    }
    # a template's user data goes base64-encoded (RunInstances encodes it itself)
    data["UserData"] = base64.b64encode(user_data.encode()).decode()
    types = ["instance", "volume", "network-interface"]
    if spot_in_template and "InstanceMarketOptions" in run_instances:
        data["InstanceMarketOptions"] = run_instances["InstanceMarketOptions"]
        types.append("spot-instances-request")
    data["TagSpecifications"] = [{"ResourceType": t, "Tags": _tag_list(tags)} for t in types]
    return {
        "LaunchTemplateName": name,
        "VersionDescription": f"trainctl-lightning run {tags.get(TAG_RUN_ID)}",
        "LaunchTemplateData": data,
        "TagSpecifications": [{"ResourceType": "launch-template", "Tags": _tag_list(tags)}],
    }


def group_request(
    name: str, subnets: list[str], options: RecoverOptions, tags: dict[str, str], *, spot: bool, distribution: bool
) -> dict[str, Any]:
    """CreateAutoScalingGroup's arguments: one instance, over ``subnets``, from template ``name``."""
    policy: dict[str, Any] = {
        "LaunchTemplate": {
            "LaunchTemplateSpecification": {"LaunchTemplateName": name, "Version": "$Latest"},
            "Overrides": [{"InstanceType": t} for t in options.instance_types],
        }
    }
    if distribution:
        policy["InstancesDistribution"] = {
            "OnDemandBaseCapacity": 0,
            "OnDemandPercentageAboveBaseCapacity": 0 if spot else 100,
            "SpotAllocationStrategy": "capacity-optimized",
        }
    return {
        "AutoScalingGroupName": name,
        "MinSize": 1,
        "MaxSize": 1,
        "DesiredCapacity": 1,
        "VPCZoneIdentifier": ",".join(subnets),
        "MixedInstancesPolicy": policy,
        # a replacement starts as soon as EC2 reports the instance gone
        "HealthCheckType": "EC2",
        "Tags": [
            {"ResourceId": name, "ResourceType": "auto-scaling-group", "Key": k, "Value": v, "PropagateAtLaunch": True}
            for k, v in sorted(tags.items())
        ],
    }


def lifetime_action(name: str, max_hours: float, start: datetime) -> dict[str, Any]:
    """PutScheduledUpdateGroupAction's arguments: the group goes to 0 instances after ``max_hours``."""
    return {
        "AutoScalingGroupName": name,
        "ScheduledActionName": LIFETIME_ACTION,
        "StartTime": start + timedelta(hours=max_hours),
        "MinSize": 0,
        "MaxSize": 0,
        "DesiredCapacity": 0,
    }


def wait_first_instance(autoscaling: Any, name: str, timeout_s: float, sleep: Callable[[float], None] = time.sleep) -> str:
    """The id of the group's first instance, once the group has launched one.

    Raises:
        ProviderError: none within ``timeout_s`` (the last scaling activity's message says why).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        groups = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
        instances = groups[0].get("Instances", []) if groups else []
        if instances:
            return str(instances[0]["InstanceId"])
        if time.monotonic() > deadline:
            activities = autoscaling.describe_scaling_activities(AutoScalingGroupName=name, MaxRecords=1).get("Activities", [])
            why = f": {activities[0].get('StatusMessage') or activities[0].get('Description')}" if activities else ""
            raise ProviderError(f"Auto Scaling group {name} launched no instance within {timeout_s:.0f} s{why}")
        sleep(1.0)


def _ours(tags: dict[str, str]) -> bool:
    return TAG_MANAGED_BY in tags and TAG_RECOVERY_GROUP in tags


def delete_group(autoscaling: Any, ec2: Any, name: str) -> bool:
    """Delete group ``name`` (and its instances) and its template, whichever exist and carry
    trainctl's tags; True if any did."""
    found = False
    groups = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
    for group in groups:
        if not _ours({t["Key"]: t["Value"] for t in group.get("Tags", [])}):
            log.warning("trainctl: Auto Scaling group %s is not a trainctl recovery group: left alone", name)
            continue
        # ForceDelete: the instances go with it, and no replacement starts meanwhile
        autoscaling.delete_auto_scaling_group(AutoScalingGroupName=name, ForceDelete=True)
        found = True
    templates = ec2.describe_launch_templates(Filters=[{"Name": f"tag:{TAG_RECOVERY_GROUP}", "Values": [name]}])
    for template in templates["LaunchTemplates"]:
        if _ours({t["Key"]: t["Value"] for t in template.get("Tags", [])}):
            ec2.delete_launch_template(LaunchTemplateId=template["LaunchTemplateId"])
            found = True
    return found


def list_groups(autoscaling: Any, ec2: Any) -> list[dict[str, Any]]:
    """Every recovery group or template trainctl made, by group name: ``name``, ``run_id``,
    ``store_url``, ``created_at`` (UTC ISO), ``group`` (whether the group exists), ``desired``
    and ``instances`` (its capacity and live instance ids), ``template`` (the template's id or None)."""
    found: dict[str, dict[str, Any]] = {}
    for page in autoscaling.get_paginator("describe_auto_scaling_groups").paginate():
        for group in page["AutoScalingGroups"]:
            tags = {t["Key"]: t["Value"] for t in group.get("Tags", [])}
            if not _ours(tags):
                continue
            found[group["AutoScalingGroupName"]] = {
                "name": group["AutoScalingGroupName"],
                "run_id": tags.get(TAG_RUN_ID),
                "store_url": tags.get(TAG_STORE),
                "created_at": group["CreatedTime"].astimezone(timezone.utc).isoformat(),
                "group": True,
                "desired": group.get("DesiredCapacity"),
                "instances": [i["InstanceId"] for i in group.get("Instances", [])],
                "template": None,
            }
    filters = [{"Name": "tag-key", "Values": [TAG_RECOVERY_GROUP]}]
    for page in ec2.get_paginator("describe_launch_templates").paginate(Filters=filters):
        for template in page["LaunchTemplates"]:
            tags = {t["Key"]: t["Value"] for t in template.get("Tags", [])}
            if not _ours(tags):
                continue
            name = tags[TAG_RECOVERY_GROUP]
            entry = found.setdefault(
                name,
                {
                    "name": name,
                    "run_id": tags.get(TAG_RUN_ID),
                    "store_url": tags.get(TAG_STORE),
                    "created_at": template["CreateTime"].astimezone(timezone.utc).isoformat(),
                    "group": False,
                    "desired": None,
                    "instances": [],
                    "template": None,
                },
            )
            entry["template"] = template["LaunchTemplateId"]
    return sorted(found.values(), key=lambda g: g["name"])


def release_group_from_instance(autoscaling: Any, ec2: Any) -> str | None:
    """On the instance of a managed run that is over: delete its group (which terminates this
    instance) and template. Returns the group's name, or None outside a managed run."""
    name = os.environ.get(RECOVERY_GROUP_ENV)
    if not name:
        return None
    # by name: the role may delete these two and describe nothing (group_policy_statements)
    autoscaling.delete_auto_scaling_group(AutoScalingGroupName=name, ForceDelete=True)
    ec2.delete_launch_template(LaunchTemplateName=name)
    return name
