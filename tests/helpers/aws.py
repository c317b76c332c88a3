"""What the AWS tests share on moto's server: an image, the security group `trainctl aws setup`
makes, and what the console would show of instances and IAM."""

from __future__ import annotations

from typing import Any

from trainctl_lightning.providers.api import MANAGED_BY
from trainctl_lightning.providers.aws import SECURITY_GROUP_PURPOSE
from trainctl_lightning.store.layout import TAG_MANAGED_BY, TAG_PURPOSE

__all__ = ["moto_ami", "not_terminated", "raw_instances", "trainctl_security_group"]


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
