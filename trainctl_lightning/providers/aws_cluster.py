"""Multi-node runs on AWS: the placement group and security group made for one run, and their end.

A multi-node run (``InstanceSpec.nodes > 1``) gets, besides its instances:

* a **cluster placement group**, so that its instances sit close together in one availability
  zone (low latency, full bisection bandwidth between them);
* a **security group** in the subnet's VPC whose only inbound rule admits all traffic from its
  own members (a self-reference): torchrun's rendezvous, NCCL/gloo and EFA between the nodes,
  nothing from outside. Outbound stays EC2's default (all), which S3 and pip need; EFA also needs
  outbound traffic to the group's own members, which that covers.

Both carry trainctl's tags, the run's id and store, :data:`TAG_PURPOSE` = :data:`CLUSTER_PURPOSE`,
and :data:`TAG_CREATED_AT` (what ``trainctl gc`` measures a young launch's grace by: neither
resource has a creation time in the EC2 API). They are found again by those tags only, never by
name, and deleted once no instance of their run is left up: by ``terminate`` of the run's last
instance, by a failed launch, and by ``trainctl gc`` (the instances usually power themselves off).

EC2 refuses to delete a security group while a network interface still uses it (its instances
are shutting down) and a placement group while it holds instances: both are retried for a bound
(:func:`delete_cluster`), then left to ``trainctl gc``.

Internal: not part of the public API; it may change without notice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from trainctl_lightning.errors import ConfigError, ProviderError
from trainctl_lightning.providers.api import MANAGED_BY
from trainctl_lightning.store.layout import TAG_MANAGED_BY, TAG_PURPOSE, TAG_RUN_ID, TAG_STORE

__all__ = [
    "CLUSTER_PURPOSE",
    "PLACEMENT_GROUP",
    "SECURITY_GROUP",
    "TAG_CREATED_AT",
    "ClusterPlan",
    "check_efa",
    "check_subnets",
    "cluster_resources",
    "create_placement_group",
    "create_security_group",
    "delete_cluster",
    "delete_cluster_resource",
    "live_run_instances",
    "network_interfaces",
]

log = logging.getLogger(__name__)

#: ``trainctl:purpose`` of a multi-node run's placement group and security group.
CLUSTER_PURPOSE = "multi-node"
#: When trainctl created the resource (UTC ISO 8601, the launcher's clock).
TAG_CREATED_AT = "trainctl:created-at"
PLACEMENT_GROUP = "placement-group"
SECURITY_GROUP = "security-group"
#: Instance states in which an instance still holds its network interfaces and placement.
_UP_STATES = ["pending", "running", "stopping", "stopped"]
#: Errors EC2 answers while the run's instances still hold the group (they are shutting down).
_IN_USE_CODES = {"DependencyViolation", "InvalidPlacementGroup.InUse"}
_GONE_CODES = {"InvalidGroup.NotFound", "InvalidPlacementGroup.Unknown", "InvalidPlacementGroup.NotFound"}


@dataclass(frozen=True)
class ClusterPlan:
    """What a multi-node run's ``create_nodes`` makes besides the instances (see the module doc)."""

    name: str
    """Name of the placement group and the security group (the run role's: one per run URL)."""
    run_id: str
    subnet_id: str
    availability_zone: str
    vpc_id: str
    tags: dict[str, str] = field(default_factory=dict)
    """The tags of both groups: trainctl's, the run's, the purpose."""
    efa_interfaces: int = 0
    """Elastic Fabric Adapters per instance (one per network card, up to the type's maximum); 0: none."""
    extra_security_groups: tuple[str, ...] = ()
    """The user's own groups (aws option ``security_group_ids``), added to the run's."""

    def describe(self) -> list[str]:
        lines = [
            f"cluster placement group {self.name} (all instances in {self.availability_zone}), deleted after the run",
            f"security group {self.name} in {self.vpc_id}: inbound all traffic from its own members only, nothing "
            "from outside; outbound all (S3, pip); deleted after the run",
            f"subnet {self.subnet_id} ({self.availability_zone}) for every node",
        ]
        if self.efa_interfaces:
            lines.append(f"{self.efa_interfaces} EFA network interface(s) per instance (InterfaceType efa)")
        if self.extra_security_groups:
            lines.append(f"also in your security groups {', '.join(self.extra_security_groups)} (aws option security_group_ids)")
        return lines


def _tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in sorted(tags.items())]


def _tag_dict(raw: list[dict[str, str]] | None) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in raw or []}


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def check_subnets(ec2: Any, region: str, subnet_ids: list[str], instance_type: str) -> tuple[str, str, str]:
    """The one subnet a multi-node run launches in: ``(subnet id, availability zone, VPC id)``.

    With no subnet given, the default VPC's default subnet in the first availability zone (by
    name) that offers ``instance_type``. Several given must all be in one zone (a cluster
    placement group lives in one); the first is used.

    Raises:
        ConfigError: a subnet that does not exist, subnets in several zones, no default subnet,
            or no zone offering the type.
    """
    if subnet_ids:
        try:
            subnets = ec2.describe_subnets(SubnetIds=subnet_ids)["Subnets"]
        except ClientError as exc:
            if not _code(exc).startswith("InvalidSubnet"):
                raise
            subnets = []
        found = {s["SubnetId"]: s for s in subnets}
        missing = [s for s in subnet_ids if s not in found]
        if missing:
            raise ConfigError(
                f"aws option subnet_id: {', '.join(missing)} is not a subnet in {region}: pass one from "
                f"`aws ec2 describe-subnets --region {region}`"
            )
        zones = sorted({found[s]["AvailabilityZone"] for s in subnet_ids})
        if len(zones) > 1:
            where = ", ".join(f"{s} in {found[s]['AvailabilityZone']}" for s in subnet_ids)
            raise ConfigError(
                f"aws option subnet_id spans availability zones ({where}): a multi-node run's instances share one "
                "cluster placement group, which lives in one zone; pass subnets of one zone"
            )
        first = found[subnet_ids[0]]
        return first["SubnetId"], first["AvailabilityZone"], first["VpcId"]
    subnets = ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
    if not subnets:
        raise ConfigError(f"{region} has no default subnets for a multi-node run: pass the aws option subnet_id")
    offered = {
        o["Location"]
        for o in ec2.describe_instance_type_offerings(
            LocationType="availability-zone", Filters=[{"Name": "instance-type", "Values": [instance_type]}]
        )["InstanceTypeOfferings"]
    }
    for subnet in sorted(subnets, key=lambda s: (s["AvailabilityZone"], s["SubnetId"])):
        if subnet["AvailabilityZone"] in offered:
            return subnet["SubnetId"], subnet["AvailabilityZone"], subnet["VpcId"]
    raise ConfigError(
        f"no availability zone of {region} with a default subnet offers {instance_type}: pass the aws option subnet_id"
    )


def check_efa(ec2: Any, instance_type: str, efa: bool) -> int:
    """How many EFA interfaces each instance gets (0 without ``efa``), after checking the type can
    sit in a cluster placement group and, with ``efa``, supports EFA.

    Raises:
        ConfigError: the type supports neither (the message names types that do EFA).
    """
    info = ec2.describe_instance_types(InstanceTypes=[instance_type])["InstanceTypes"][0]
    strategies = (info.get("PlacementGroupInfo") or {}).get("SupportedStrategies") or []
    if "cluster" not in strategies:
        raise ConfigError(
            f"instance type {instance_type} cannot be placed in a cluster placement group (it supports "
            f"{', '.join(strategies) or 'none'}): pick another type for a multi-node run"
        )
    if not efa:
        return 0
    network = info.get("NetworkInfo") or {}
    if not network.get("EfaSupported"):
        capable = [
            t["InstanceType"]
            for t in ec2.describe_instance_types(
                Filters=[
                    {"Name": "network-info.efa-supported", "Values": ["true"]},
                    {"Name": "instance-type", "Values": ["g4dn.*", "g5.*", "g6.*", "g6e.*", "p4d.*", "p5.*"]},
                ]
            )["InstanceTypes"]
        ]
        hint = f" (EFA types include {', '.join(sorted(capable)[:6])})" if capable else ""
        raise ConfigError(
            f"instance type {instance_type} does not support EFA (aws option efa=true): pick a type that does{hint}, or drop efa"
        )
    cards = int(network.get("MaximumNetworkCards") or 1)
    most = int((network.get("EfaInfo") or {}).get("MaximumEfaInterfaces") or 1)
    return max(1, min(cards, most))


def network_interfaces(plan: ClusterPlan, group_ids: list[str]) -> list[dict[str, Any]]:
    """RunInstances' ``NetworkInterfaces`` for EFA: one EFA per network card (card 0 is the primary,
    device 0; the others device 1, as AWS documents for p4d/p5)."""
    return [
        {
            "NetworkCardIndex": card,
            "DeviceIndex": 0 if card == 0 else 1,
            "InterfaceType": "efa",
            "SubnetId": plan.subnet_id,
            "Groups": group_ids,
            "DeleteOnTermination": True,
        }
        for card in range(plan.efa_interfaces)
    ]


def create_placement_group(ec2: Any, plan: ClusterPlan) -> str:
    """Create the run's cluster placement group (tagged); returns its name."""
    ec2.create_placement_group(
        GroupName=plan.name,
        Strategy="cluster",
        TagSpecifications=[{"ResourceType": "placement-group", "Tags": _tag_list(plan.tags)}],
    )
    return plan.name


def create_security_group(ec2: Any, plan: ClusterPlan) -> str:
    """Create the run's security group (tagged) and its one inbound rule: all traffic from itself."""
    group_id = str(
        ec2.create_security_group(
            GroupName=plan.name,
            Description=f"trainctl-lightning multi-node run {plan.run_id}: traffic between its nodes only",
            VpcId=plan.vpc_id,
            TagSpecifications=[{"ResourceType": "security-group", "Tags": _tag_list(plan.tags)}],
        )["GroupId"]
    )
    ec2.authorize_security_group_ingress(
        GroupId=group_id,
        IpPermissions=[{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group_id, "Description": "the run's own nodes"}]}],
    )
    return group_id


def _ours(run_id: str | None = None, store_url: str | None = None) -> list[dict[str, Any]]:
    filters = [
        {"Name": f"tag:{TAG_MANAGED_BY}", "Values": [MANAGED_BY]},
        {"Name": f"tag:{TAG_PURPOSE}", "Values": [CLUSTER_PURPOSE]},
    ]
    if run_id is not None:
        filters.append({"Name": f"tag:{TAG_RUN_ID}", "Values": [run_id]})
    if store_url is not None:
        filters.append({"Name": f"tag:{TAG_STORE}", "Values": [store_url]})
    return filters


def cluster_resources(ec2: Any, run_id: str | None = None, store_url: str | None = None) -> list[dict[str, Any]]:
    """The placement groups and security groups of multi-node runs, found by tag (of one run when
    ``run_id`` is given): each ``{kind, id, name, run_id, store_url, created_at}``."""
    found: list[dict[str, Any]] = []
    for group in ec2.describe_placement_groups(Filters=_ours(run_id, store_url))["PlacementGroups"]:
        if group.get("State") == "deleted":
            continue
        tags = _tag_dict(group.get("Tags"))
        found.append(_record(PLACEMENT_GROUP, group["GroupName"], group["GroupName"], tags))
    for page in ec2.get_paginator("describe_security_groups").paginate(Filters=_ours(run_id, store_url)):
        for group in page["SecurityGroups"]:
            found.append(_record(SECURITY_GROUP, group["GroupId"], group.get("GroupName", ""), _tag_dict(group.get("Tags"))))
    return found


def _record(kind: str, ident: str, name: str, tags: dict[str, str]) -> dict[str, Any]:
    return {
        "kind": kind,
        "id": ident,
        "name": name,
        "run_id": tags.get(TAG_RUN_ID),
        "store_url": tags.get(TAG_STORE),
        "created_at": tags.get(TAG_CREATED_AT),
    }


def live_run_instances(ec2: Any, run_id: str, store_url: str | None, exclude: tuple[str, ...] = ()) -> list[str]:
    """The run's instances (by tag) that are not shutting down or terminated, less ``exclude``."""
    filters = [
        {"Name": f"tag:{TAG_MANAGED_BY}", "Values": [MANAGED_BY]},
        {"Name": f"tag:{TAG_RUN_ID}", "Values": [run_id]},
        {"Name": "instance-state-name", "Values": _UP_STATES},
    ]
    if store_url:
        filters.append({"Name": f"tag:{TAG_STORE}", "Values": [store_url]})
    found: list[str] = []
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        for reservation in page["Reservations"]:
            found += [i["InstanceId"] for i in reservation["Instances"] if i["InstanceId"] not in exclude]
    return found


def delete_cluster_resource(ec2: Any, kind: str, ident: str, wait_s: float, poll_s: float = 5.0) -> bool:
    """Delete one placement group (by name) or security group (by id), retried while EC2 says the
    run's instances still hold it, for at most ``wait_s``. False when it was already gone.

    Raises:
        ClientError: any other refusal, or still in use after ``wait_s``.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if kind == PLACEMENT_GROUP:
                ec2.delete_placement_group(GroupName=ident)
            elif kind == SECURITY_GROUP:
                ec2.delete_security_group(GroupId=ident)
            else:
                raise ValueError(f"not a cluster resource kind: {kind!r}")
            return True
        except ClientError as exc:
            if _code(exc) in _GONE_CODES:
                return False
            if _code(exc) not in _IN_USE_CODES or time.monotonic() + poll_s > deadline:
                raise
            log.info("%s %s is still held by the run's instances (shutting down): retrying in %.0f s", kind, ident, poll_s)
            time.sleep(poll_s)


def delete_cluster(ec2: Any, run_id: str, store_url: str | None, wait_s: float, poll_s: float = 5.0) -> list[str]:
    """Delete the run's security group, then its placement group (found by tag); returns what was
    deleted, as ``kind id``.

    Raises:
        ProviderError: one could not be deleted (the message names it and how to delete it by hand).
    """
    deleted: list[str] = []
    resources = cluster_resources(ec2, run_id, store_url)
    # the security group first: the ENIs holding it go with the instances, the placement group last
    for resource in sorted(resources, key=lambda r: r["kind"] != SECURITY_GROUP):
        try:
            if delete_cluster_resource(ec2, resource["kind"], resource["id"], wait_s, poll_s):
                deleted.append(f"{resource['kind']} {resource['id']}")
        except ClientError as exc:
            by_hand = (
                f"aws ec2 delete-security-group --group-id {resource['id']}"
                if resource["kind"] == SECURITY_GROUP
                else f"aws ec2 delete-placement-group --group-name {resource['id']}"
            )
            raise ProviderError(
                f"could not delete run {run_id}'s {resource['kind']} {resource['id']} ({_code(exc)}: "
                f"{exc.response.get('Error', {}).get('Message', exc)}); `trainctl gc --provider aws --yes` deletes it "
                f"once the run's instances are gone, or: {by_hand}"
            ) from None
    return deleted
