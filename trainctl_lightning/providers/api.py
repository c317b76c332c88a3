"""The provider interface: how a machine is obtained and how a job is started on it.

A provider creates, lists, stops and terminates *instances* and starts the trainctl agent
(``python -m trainctl_lightning.agent``) for a job on one. Everything else (the job spec, the
code bundle, logs, status, checkpoints) goes through the run store, so providers differ only
in those few primitives. The shape follows TorchX's schedulers: ``create()`` is
``_create(create_dryrun(spec))``, and the dry run's ``describe()`` shows exactly what would be
created without creating it.

Every resource a provider creates carries the tags in :func:`standard_tags`; ``list`` returns
only resources with ``trainctl:managed-by``, never anything found by name.
"""

from __future__ import annotations

import builtins
import getpass
import logging
import os
import socket
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any, ClassVar

from trainctl_lightning.errors import ConfigError, InstanceNotFoundError
from trainctl_lightning.limits import MAX_RUNTIME_LIMIT_S, check_limit
from trainctl_lightning.store.layout import TAG_MANAGED_BY, TAG_NODE, TAG_OWNER, TAG_RUN_ID

__all__ = [
    "MANAGED_BY",
    "AgentLaunch",
    "CreatePlan",
    "Instance",
    "InstanceSpec",
    "InstanceState",
    "Provider",
    "current_owner",
    "standard_tags",
]

MANAGED_BY = "trainctl-lightning"
log = logging.getLogger("trainctl_lightning.providers")


def current_owner() -> str:
    """``user@host`` of whoever is launching; tagged on every resource so it can be traced back."""
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers; the uid still identifies the caller
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def standard_tags(extra: dict[str, str] | None = None, run_id: str | None = None) -> dict[str, str]:
    """The tags every trainctl resource carries, plus the user's own (which cannot replace ours)."""
    tags = dict(extra or {})
    tags[TAG_MANAGED_BY] = MANAGED_BY
    tags.setdefault(TAG_OWNER, current_owner())
    if run_id:
        tags[TAG_RUN_ID] = run_id
    return tags


class InstanceState(str, Enum):
    """Lifecycle of an instance, as its provider reports it."""

    PENDING = "pending"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    TERMINATING = "terminating"
    TERMINATED = "terminated"
    UNKNOWN = "unknown"

    def is_terminal(self) -> bool:
        """True once the instance is gone for good (and no longer costs anything)."""
        return self is InstanceState.TERMINATED

    def is_usable(self) -> bool:
        """True when a job can be started on it now (or as soon as it finishes booting)."""
        return self in (InstanceState.PENDING, InstanceState.RUNNING)


@dataclass(frozen=True)
class InstanceSpec:
    """What a user asks a provider for. ``None`` means the provider's default."""

    instance_type: str | None = None
    """Machine type, e.g. ``g5.xlarge`` on AWS; the local provider has one type, ``local``."""
    spot: bool = False
    """Ask for spot/preemptible capacity (cheaper; may be reclaimed with a short notice)."""
    image: str | None = None
    """Machine image (AWS: an AMI id); default: the provider's GPU-ready image."""
    disk_gb: int | None = None
    """Root disk size in GB."""
    region: str | None = None
    """Cloud region; default: the provider's configured region."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables for every job on the instance (no secrets: they are stored)."""
    max_runtime_s: float | None = None
    """Hard limit on the instance's life, enforced on the instance itself where the provider can."""
    tags: dict[str, str] = field(default_factory=dict)
    """Extra tags; trainctl's own (:func:`standard_tags`) are always added."""
    name: str | None = None
    """Human-readable name shown in listings."""
    run_url: str | None = None
    """The run the instance is created for (set by the launcher); providers that start the
    agent at boot (AWS) hand it to the agent, others ignore it."""
    store_url: str | None = None
    """The store that run lives in (default: the run URL's parent); tagged so ``trainctl gc``
    can read the run's state."""
    options: dict[str, Any] = field(default_factory=dict)
    """Provider-specific options (AWS: subnet_id, security_group_ids, key_name, install, ...)."""
    nodes: int = 1
    """Instances of this spec created together for one multi-node run (:meth:`Provider.create_nodes`):
    all or none, each tagged with its node index (``trainctl:node``)."""

    def __post_init__(self) -> None:
        from trainctl_lightning.jobs.spec import check_nodes

        check_nodes(self.nodes)
        if self.disk_gb is not None and (isinstance(self.disk_gb, bool) or not isinstance(self.disk_gb, int) or self.disk_gb < 1):
            raise ConfigError(f"disk_gb must be a positive whole number of GB, got {self.disk_gb!r}")
        if self.max_runtime_s is not None:
            check_limit("InstanceSpec.max_runtime_s", self.max_runtime_s, maximum=MAX_RUNTIME_LIMIT_S)
        for key, value in self.env.items():
            if not isinstance(key, str) or not key or "=" in key or not isinstance(value, str):
                raise ConfigError(f"env must map names to string values, got {key!r}: {value!r}")


@dataclass
class Instance:
    """What a provider reports about one instance."""

    id: str
    provider: str
    state: InstanceState
    instance_type: str
    spot: bool = False
    region: str | None = None
    created_at: str | None = None
    """UTC ISO-8601 creation time."""
    name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    price_per_hour: float | None = None
    """Estimated on-demand or spot price in USD, when known."""
    address: str | None = None
    """Where the machine can be reached (IP or host name), when it has one."""
    details: dict[str, Any] = field(default_factory=dict)
    """Provider-specific facts (local: working directory, agent pids; AWS: AMI, subnet, ...)."""

    @property
    def run_id(self) -> str | None:
        return self.tags.get(TAG_RUN_ID)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Instance:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["state"] = InstanceState(known.get("state", "unknown"))
        return cls(**known)


@dataclass
class CreatePlan:
    """A dry run of ``create``: everything that would be created, and how, with nothing created.

    ``request`` is what ``_create`` will send (for AWS, the ``run_instances`` arguments with the
    user data summarised); ``resources`` lists each resource in words.
    """

    provider: str
    spec: InstanceSpec
    instance_type: str
    region: str | None
    tags: dict[str, str]
    resources: list[str] = field(default_factory=list)
    request: dict[str, Any] = field(default_factory=dict)
    price_per_hour: float | None = None

    def describe(self) -> str:
        lines = [f"provider {self.provider} would create:"]
        lines += [f"  - {r}" for r in self.resources]
        lines.append(f"  instance type: {self.instance_type}" + (" (spot)" if self.spec.spot else ""))
        if self.spec.nodes > 1:
            lines.append(f"  nodes: {self.spec.nodes} instances, created together (all or none)")
        if self.region:
            lines.append(f"  region: {self.region}")
        if self.price_per_hour is not None:
            lines.append(f"  estimated price: ${self.price_per_hour:.3f}/hour")
        lines.append("  tags: " + ", ".join(f"{k}={v}" for k, v in sorted(self.tags.items())))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.describe()

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "instance_type": self.instance_type,
            "spot": self.spec.spot,
            "nodes": self.spec.nodes,
            "region": self.region,
            "tags": self.tags,
            "resources": self.resources,
            "request": self.request,
            "price_per_hour": self.price_per_hour,
        }


@dataclass(frozen=True)
class AgentLaunch:
    """How to start the agent for one run on an instance.

    Only the run's URL travels: the agent reads the job spec from the store. ``forward_env``
    holds variables forwarded from the launcher's environment (credentials for the store, say);
    providers pass them to the agent's process and never write them anywhere.
    """

    run_id: str
    run_url: str
    forward_env: dict[str, str] = field(default_factory=dict)
    run_key: str = field(default="", repr=False)
    """The run's signing key (:mod:`trainctl_lightning.runkey`): the agent gets it as
    ``$TRAINCTL_RUN_KEY``, out of band. Never written to the store, logs or user data in clear."""
    node: int = 0
    """A multi-node run: the node this agent runs (``$TRAINCTL_NODE``; 0 is the lead)."""

    def __repr__(self) -> str:  # forward_env and run_key are secrets
        return f"AgentLaunch(run_id={self.run_id!r}, run_url={self.run_url!r}, forward_env=<{len(self.forward_env)} names>)"


class Provider(ABC):
    """One way of getting machines. Subclasses implement the abstract primitives.

    Optional capabilities raise ``NotImplementedError`` naming the class.
    """

    #: Registry name (``--provider NAME``).
    name: ClassVar[str]
    #: Store URL protocols an instance of this provider can reach.
    store_protocols: ClassVar[tuple[str, ...]] = ("s3",)
    #: Whether ``AgentLaunch.forward_env`` can reach the agent without being stored anywhere
    #: (local: passed to the process; AWS: no, user data is readable by anyone who can describe it).
    forwards_env: ClassVar[bool] = True
    #: Whether a managed run (``--recover``) gets its replacement instances from the cloud's own
    #: machinery, built when the instance is created (aws: an Auto Scaling group, from the aws
    #: option ``recover``); otherwise the provider's ``start_agent`` supervises the run (local).
    replaces_instances: ClassVar[bool] = False
    #: Whether its instances install trainctl-lightning at boot (from ``options["install"]``,
    #: which the launcher fills with a wheel of a source checkout; see ``jobs/dist.py``).
    installs_trainctl: ClassVar[bool] = False

    # ------------------------------------------------------------ templates (do not override)

    def create(self, spec: InstanceSpec | None = None) -> Instance:
        """Create an instance; ``create_dryrun(spec)`` shows what this would do."""
        return self._create(self.create_dryrun(spec or InstanceSpec()))

    def create_nodes(self, spec: InstanceSpec) -> builtins.list[Instance]:
        """Create ``spec.nodes`` instances for one multi-node run, all or none: when one cannot be
        created, those that were are terminated before the error is raised. Node ``k`` is the
        ``k``-th instance returned and carries the tag ``trainctl:node=k``."""
        return self._create_nodes(self.create_dryrun(spec))

    def describe(self, instance_id: str) -> Instance:
        """The instance with this id, terminated ones included.

        Raises:
            InstanceNotFoundError: trainctl created no instance with this id here.
        """
        for inst in self.list(include_terminated=True):
            if inst.id == instance_id:
                return inst
        raise InstanceNotFoundError(
            f"no {self.name} instance {instance_id!r} created by trainctl; `trainctl ls --provider {self.name}` lists them"
        )

    # ------------------------------------------------------------ primitives

    @abstractmethod
    def create_dryrun(self, spec: InstanceSpec) -> CreatePlan:
        """Validate ``spec`` and say what ``create`` would do. Creates nothing.

        Raises:
            ConfigError: the spec is invalid for this provider (unknown instance type, ...).
        """

    @abstractmethod
    def _create(self, plan: CreatePlan) -> Instance:
        """Create what ``plan`` describes; on any failure, remove what was created."""

    def _create_nodes(self, plan: CreatePlan) -> builtins.list[Instance]:
        """Create the instances of a multi-node ``plan``; the default creates them one by one and
        terminates those created when one fails. Providers with a native all-or-nothing request
        (AWS: ``MinCount = MaxCount = N`` in a placement group) override it."""
        created: builtins.list[Instance] = []
        try:
            for node in range(plan.spec.nodes):
                one = replace(plan.spec, nodes=1, tags={**plan.spec.tags, TAG_NODE: str(node)})
                created.append(self._create(self.create_dryrun(one)))
        except BaseException:
            self._terminate_all([i.id for i in created])
            raise
        return created

    def _terminate_all(self, instance_ids: builtins.list[str]) -> None:
        """Terminate each instance, logging (not raising) one that cannot be: the caller is already
        raising the error that matters."""
        for instance_id in instance_ids:
            try:
                self.terminate(instance_id)
            except Exception as exc:
                log.error("trainctl: could not terminate %s (%s); run `trainctl terminate %s`", instance_id, exc, instance_id)

    @abstractmethod
    def list(self, include_terminated: bool = False) -> list[Instance]:
        """Instances this package created (found by tag), newest first."""

    @abstractmethod
    def stop(self, instance_id: str) -> Instance:
        """Stop the instance (jobs on it get SIGTERM); its disk is kept."""

    @abstractmethod
    def terminate(self, instance_id: str) -> Instance:
        """Terminate the instance and everything on it. Idempotent: terminating a terminated
        instance returns its record."""

    @abstractmethod
    def start_agent(self, instance: Instance, launch: AgentLaunch) -> None:
        """Start the agent for ``launch.run_url`` on ``instance``; return once it has started."""

    def fetch_run_key(self) -> str | None:
        """On the instance, for the agent: the run's key when this provider delivers it out of band
        at boot (AWS: an SSM parameter only the run's role can read); None when it comes in the
        agent's environment (``AgentLaunch.run_key``) or not at all."""
        return None

    def own_instance_id(self) -> str | None:
        """On the instance, for the agent: this instance's id, when the provider can tell (AWS: the
        metadata service); None otherwise (local: the agent gets ``$TRAINCTL_NODE`` instead). A
        multi-node run's agent without ``$TRAINCTL_NODE`` finds its node index from it."""
        return None

    def node_address(self) -> str:
        """On the instance, for the agent: the address other nodes of a multi-node run reach this
        one at (AWS: the private IPv4 from the metadata service; local: loopback)."""
        return "127.0.0.1"

    def release_from_agent(self, instance_id: str, *, run_over: bool = True) -> None:
        """Called by the agent *on the instance* once a job that owns its instance has ended:
        end the instance from the inside (local: mark it terminated; AWS: shut down, which
        terminates). Must not depend on the launcher being alive.

        ``run_over=False``: a managed run's attempt ended and a replacement is due (the run is
        ``recovering``); the provider's replacement machinery must still start it."""
        raise NotImplementedError(f"{type(self).__name__} cannot release an instance from its agent")

    def check_store(self, store_url: str) -> None:
        """Refuse a store the provider's instances cannot reach, before anything is created."""
        import fsspec

        protocol = fsspec.core.split_protocol(store_url)[0] or "file"
        if protocol not in self.store_protocols:
            allowed = ", ".join(f"{p}://" for p in self.store_protocols)
            raise ConfigError(
                f"the {self.name} provider's instances cannot reach the store {store_url!r}: use a {allowed} store URL (--store)"
            )
