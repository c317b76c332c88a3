"""``trainctl aws``: AWS-only commands (``setup``)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from trainctl_lightning.cli.common import OutputOption, handle_errors
from trainctl_lightning.cli.output import Format, emit_json, stdout

__all__ = ["app", "setup"]

app = typer.Typer(help="AWS-only commands: set up what the aws provider needs.", no_args_is_help=True)


@app.command("setup")
@handle_errors
def setup(
    bucket: str = typer.Option(
        ..., "--bucket", help="The run store's bucket (or s3://bucket/prefix); instances may use nothing else."
    ),
    prefix: Optional[str] = typer.Option(None, "--prefix", help="Restrict instances to keys under this prefix of the bucket."),
    region: Optional[str] = typer.Option(None, "--region", help="AWS region; default: AWS_DEFAULT_REGION or the profile's."),
    aws_profile: Optional[str] = typer.Option(None, "--aws-profile", help="Named AWS profile; default: AWS_PROFILE."),
    vpc_id: Optional[str] = typer.Option(None, "--vpc-id", help="VPC of the security group; default: the default VPC."),
    output: Format = OutputOption,
) -> None:
    """Create, idempotently, the instance profile (least-privilege access to the bucket) and a security group with no inbound rule."""
    from trainctl_lightning.providers.aws_setup import setup_aws

    result = setup_aws(bucket, prefix=prefix, region=region, profile=aws_profile, vpc_id=vpc_id)
    if output is Format.json:
        emit_json(result.to_dict())
        return
    where = f"s3://{result.bucket}/{result.prefix or ''}"
    table = Table(title=f"aws setup in {result.region} for {where}", title_justify="left")
    for col in ("RESOURCE", "NAME", "ACTION", "ID"):
        table.add_column(col, overflow="fold")
    for step in result.steps:
        table.add_row(step.resource, step.name, step.action, step.id or "-")
    stdout.print(table)
    stdout.print(
        f"instances use instance profile {result.instance_profile} and security group {result.security_group_id} by default",
        highlight=False,
    )
