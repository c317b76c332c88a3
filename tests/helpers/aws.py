"""What the AWS tests share on moto's server: an image, the security group `trainctl aws setup`
makes, and what the console would show of instances and IAM."""

from __future__ import annotations

import uuid
from typing import Any

from trainctl_lightning.providers.api import MANAGED_BY
from trainctl_lightning.providers.aws import SECURITY_GROUP_PURPOSE
from trainctl_lightning.store.layout import TAG_MANAGED_BY, TAG_PURPOSE

__all__ = [
    "moto_ami",
    "not_terminated",
    "placement_groups",
    "raw_instances",
    "serve_placement_groups",
    "trainctl_security_group",
]


def moto_ami(ec2: Any) -> str:
    """One of moto's Ubuntu images (asking for all 1,300 takes seconds)."""
    images = ec2.describe_images(Owners=["amazon"], Filters=[{"Name": "name", "Values": ["ubuntu/images/*"]}])["Images"]
    return str(images[0]["ImageId"])


def trainctl_security_group(ec2: Any, vpc_id: str | None = None) -> str:
    """The tagged, inbound-closed group `trainctl aws setup` makes in ``vpc_id`` (default VPC), alone."""
    if vpc_id is None:
        vpc_id = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    tags = [{"Key": TAG_MANAGED_BY, "Value": MANAGED_BY}, {"Key": TAG_PURPOSE, "Value": SECURITY_GROUP_PURPOSE}]
    return str(
        ec2.create_security_group(
            GroupName=f"trainctl-lightning-{vpc_id}",
            Description="trainctl-lightning instances (test)",
            VpcId=vpc_id,
            TagSpecifications=[{"ResourceType": "security-group", "Tags": tags}],
        )["GroupId"]
    )


def raw_instances(ec2: Any) -> list[dict[str, Any]]:
    """Every instance on the server, tagged or not."""
    return [i for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]]


def not_terminated(ec2: Any) -> list[str]:
    return [i["InstanceId"] for i in raw_instances(ec2) if i["State"]["Name"] not in ("terminated", "shutting-down")]


# ----------------------------------------------------------------------------- placement groups on moto
# moto 5.2 implements no placement-group action (CreatePlacementGroup, DescribePlacementGroups and
# DeletePlacementGroup answer 500) and ignores RunInstances' Placement.GroupName. These stand-ins
# are added to the moto server running in this process (the wire format, botocore's parsing and
# every other EC2 call stay moto's own): a table of groups with their tags, kept on moto's EC2
# backend (so moto's reset empties it), with the checks real EC2 makes that our code relies on:
# an unknown group is refused at RunInstances, a group is not deleted while an instance that is
# not terminated is in it (InvalidPlacementGroup.InUse), and each instance records its group.

_PATCHED: dict[str, Any] = {}


def _groups(response: Any) -> dict[str, dict[str, Any]]:
    backend = response.ec2_backend
    if not hasattr(backend, "_trainctl_placement_groups"):
        backend._trainctl_placement_groups = {}
    return backend._trainctl_placement_groups  # type: ignore[no-any-return]


def _members(response: Any, name: str) -> list[Any]:
    return [
        i
        for r in response.ec2_backend.all_reservations()
        for i in r.instances
        if i.placement.group_name == name and i.state != "terminated"
    ]


def _create_placement_group(self: Any) -> Any:
    from moto.core.responses import ActionResult
    from moto.ec2.exceptions import EC2ClientError

    name, strategy = self._get_param("GroupName"), self._get_param("Strategy")
    groups = _groups(self)
    if name in groups:
        raise EC2ClientError("InvalidPlacementGroup.Duplicate", f"The placement group '{name}' already exists.")
    if strategy not in ("cluster", "spread", "partition"):
        raise EC2ClientError("InvalidParameterValue", f"Invalid strategy {strategy!r}")
    tags = self._parse_tag_specification().get("placement-group", {})
    group = {
        "GroupName": name,
        "GroupId": f"pg-{uuid.uuid4().hex[:17]}",
        "Strategy": strategy,
        "State": "available",
        "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
    }
    groups[name] = group
    return ActionResult({"PlacementGroup": group})


def _describe_placement_groups(self: Any) -> Any:
    from moto.core.responses import ActionResult

    filters = self._filters_from_querystring()
    names = self._get_param("GroupNames", [])
    found = []
    for group in _groups(self).values():
        tags = {t["Key"]: t["Value"] for t in group["Tags"]}
        if names and group["GroupName"] not in names:
            continue
        ok = True
        for key, values in filters.items():
            if key.startswith("tag:"):
                ok = ok and tags.get(key[4:]) in values
            elif key in ("group-name", "strategy", "state"):
                ok = ok and group[{"group-name": "GroupName", "strategy": "Strategy", "state": "State"}[key]] in values
            else:
                raise NotImplementedError(f"placement group filter {key!r}")
        if ok:
            found.append(group)
    return ActionResult({"PlacementGroups": found})


def _delete_placement_group(self: Any) -> Any:
    from moto.core.responses import EmptyResult
    from moto.ec2.exceptions import EC2ClientError

    name = self._get_param("GroupName")
    if name not in _groups(self):
        raise EC2ClientError("InvalidPlacementGroup.Unknown", f"The Placement Group '{name}' is unknown.")
    if _members(self, name):
        raise EC2ClientError("InvalidPlacementGroup.InUse", f"The placement group '{name}' is in use.")
    del _groups(self)[name]
    return EmptyResult()


def _run_instances(self: Any) -> Any:
    from moto.ec2.exceptions import EC2ClientError

    name = self._get_param("Placement.GroupName")
    if name and name not in _groups(self):
        raise EC2ClientError("InvalidPlacementGroup.Unknown", f"The Placement Group '{name}' is unknown.")
    result = _PATCHED["run_instances"](self)
    if name:
        for instance in result.result.instances:
            instance.placement.group_name = name
    return result


def serve_placement_groups() -> None:
    """Add the placement-group stand-ins to moto's EC2 in this process (idempotent)."""
    from moto.ec2.responses import EC2Response

    if _PATCHED:
        return
    _PATCHED["run_instances"] = EC2Response.run_instances
    EC2Response.create_placement_group = _create_placement_group  # type: ignore[attr-defined]
    EC2Response.describe_placement_groups = _describe_placement_groups  # type: ignore[attr-defined]
    EC2Response.delete_placement_group = _delete_placement_group  # type: ignore[attr-defined]
    EC2Response.run_instances = _run_instances  # type: ignore[method-assign]


def placement_groups(ec2: Any) -> list[dict[str, Any]]:
    """Every placement group on the server, tagged or not."""
    return list(ec2.describe_placement_groups()["PlacementGroups"])
