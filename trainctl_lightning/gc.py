"""Find (and terminate) instances that trainctl created and no live run needs any more.

An instance is garbage when the run it was created for has ended (its ``job-state.json`` says
succeeded, failed, cancelled, ...), when its agent has gone silent (the state is *lost*), or when
it is past its boot grace period with no run record in a store that holds others (or, on
providers that bind one run per instance, with no run at all). Anything uncertain (the store
cannot be read or is empty, say) is kept and reported, never terminated.

"Silent" and "past its grace" are measured on the store's clock (:func:`store_clock`), never by
comparing the launcher's clock with times the instance wrote: either may be hours off.

Only instances the provider lists, i.e. tagged ``trainctl:managed-by``, are ever considered.

Example::

    from trainctl_lightning.providers import get_provider
    report = collect_garbage(get_provider("aws"), yes=False)   # only lists
    for item in report.garbage:
        print(item.instance.id, item.reason)
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from trainctl_lightning import timeutil
from trainctl_lightning.errors import InstanceNotFoundError, TrainctlError
from trainctl_lightning.jobs.spec import JobPhase
from trainctl_lightning.providers.api import Instance, InstanceState, Provider
from trainctl_lightning.store import layout
from trainctl_lightning.store.layout import TAG_STORE, run_url_in
from trainctl_lightning.timeutil import parse_time

__all__ = [
    "DEFAULT_BOOT_GRACE_S",
    "GcCluster",
    "GcCredential",
    "GcGroup",
    "GcItem",
    "GcReport",
    "classify",
    "collect_garbage",
    "find_garbage",
    "store_clock",
]

#: Tag naming the store root of the instance's run, set at creation by providers that know it
#: (aws). With ``trainctl:run-id`` it gives the run's URL: ``run_url_in(store, run_id)``.
#: An instance younger than this with no run record (yet) may still be booting: kept.
DEFAULT_BOOT_GRACE_S = 30 * 60.0


@dataclass
class GcItem:
    """One instance and what gc decided about it."""

    instance: Instance
    garbage: bool
    reason: str
    """Why it is garbage, or why it is kept, in a few words."""
    run_url: str | None = None
    job_state: str | None = None
    """The run's state as shown by ``trainctl runs`` (``lost`` included), when there is one."""
    terminated: bool = False
    error: str | None = None
    """Why terminating it failed, when it did."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "instance": self.instance.to_dict(),
            "garbage": self.garbage,
            "reason": self.reason,
            "run_url": self.run_url,
            "job_state": self.job_state,
            "terminated": self.terminated,
            "error": self.error,
        }


@dataclass
class GcCredential:
    """A per-run IAM role (aws) and what gc decided about it."""

    name: str
    run_id: str | None
    garbage: bool
    reason: str
    deleted: bool = False
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GcGroup:
    """A managed run's Auto Scaling group and launch template (aws), and what gc decided about them."""

    name: str
    run_id: str | None
    garbage: bool
    reason: str
    job_state: str | None = None
    instances: list[str] = field(default_factory=list)
    deleted: bool = False
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GcCluster:
    """A multi-node run's placement group or security group (aws), and what gc decided about it."""

    kind: str
    """``placement-group`` or ``security-group``."""
    id: str
    run_id: str | None
    garbage: bool
    reason: str
    store_url: str | None = None
    deleted: bool = False
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GcReport:
    provider: str
    items: list[GcItem] = field(default_factory=list)
    terminated_requested: bool = False
    credentials: list[GcCredential] = field(default_factory=list)
    """Per-run credentials (providers that make them: aws); garbage once no live instance runs the run."""
    groups: list[GcGroup] = field(default_factory=list)
    """Managed runs' groups and templates (aws ``recover``); garbage once the run is over."""
    cluster: list[GcCluster] = field(default_factory=list)
    """Multi-node runs' placement groups and security groups (aws); garbage once no kept instance runs the run."""

    @property
    def garbage(self) -> list[GcItem]:
        return [i for i in self.items if i.garbage]

    @property
    def kept(self) -> list[GcItem]:
        return [i for i in self.items if not i.garbage]

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "terminate": self.terminated_requested,
            "garbage": [i.to_dict() for i in self.garbage],
            "kept": [i.to_dict() for i in self.kept],
            "credentials": [c.to_dict() for c in self.credentials],
            "groups": [g.to_dict() for g in self.groups],
            "cluster": [c.to_dict() for c in self.cluster],
        }


def _age_s(instance: Instance, now: datetime) -> float | None:
    if not instance.created_at:
        return None
    return (now - parse_time(instance.created_at)).total_seconds()


def store_clock(store_url: str) -> datetime:
    """The store's own "now": the modified time of a small probe object written now (then deleted).

    gc judges a run by how long its ``job-state.json`` has gone unrefreshed, and compares that
    object's modified time with this one: both stamped by the store, so neither the launcher's
    clock nor the instance's (which wrote ``updated_at``) matters.

    Raises:
        StoreError: the store cannot be written or read.
    """
    from trainctl_lightning.store import ObjectStore

    store = ObjectStore(store_url)
    probe = f".trainctl-clock-{uuid.uuid4().hex[:12]}"
    store.write(probe, b"trainctl gc clock probe\n")
    try:
        return store.modified(probe)
    finally:
        store.delete(probe)


class _Clocks:
    """Each store's clock, read once per gc pass (or the error that kept it from being read)."""

    def __init__(self) -> None:
        self._seen: dict[str, datetime | str] = {}

    def now(self, store_url: str) -> datetime | str:
        if store_url not in self._seen:
            try:
                self._seen[store_url] = store_clock(store_url)
            except TrainctlError as exc:
                self._seen[store_url] = str(exc)
        return self._seen[store_url]


def classify(
    instance: Instance,
    store_url: str | None = None,
    boot_grace_s: float = DEFAULT_BOOT_GRACE_S,
    now: datetime | None = None,
    runless_is_garbage: bool = False,
    clocks: _Clocks | None = None,
) -> GcItem:
    """Decide whether one instance is garbage, reading its run's state from the store.

    Times are compared on one clock: for an instance with a run, the store's (its run state's
    modified time against :func:`store_clock`, the instance's creation time against that too);
    the launcher's clock is used only for an instance without a run, which has no store.

    Args:
        store_url: store root to look the run up in when the instance has no ``trainctl:store`` tag.
        boot_grace_s: an instance younger than this without a run record is kept (still booting).
        now: the launcher's time for instances without a run (default: :func:`timeutil.now`).
        runless_is_garbage: an instance created without a run can never get one (its provider
            binds one run per instance at creation, as AWS does): garbage once past the grace.
    """
    from trainctl_lightning.jobs.store import JobStore

    run_id = instance.run_id
    if run_id is None:
        age = _age_s(instance, now or timeutil.now())
        if not runless_is_garbage:
            return GcItem(instance, False, "no run tag: jobs may be started on it later (terminate it when idle)")
        if age is not None and age < boot_grace_s:
            return GcItem(instance, False, f"no run, but only {age:.0f}s old (boot grace {boot_grace_s:.0f}s)")
        return GcItem(instance, True, "created without a run, and none can be started on it")
    store = instance.tags.get(TAG_STORE) or store_url
    if not store:
        return GcItem(instance, False, f"run {run_id}: store unknown (no {TAG_STORE} tag; pass --store)")
    run_url = run_url_in(store, run_id)
    jobs = JobStore(run_url)
    try:
        state = jobs.read_state()
    except TrainctlError as exc:
        return GcItem(instance, False, f"cannot read the run's state: {exc}", run_url=run_url)
    except Exception as exc:  # an unreadable store must never get an instance terminated
        return GcItem(instance, False, f"cannot read the run's state: {type(exc).__name__}: {exc}", run_url=run_url)
    if state is not None and state.phase.is_terminal():
        return GcItem(instance, True, f"run ended ({state.phase.value})", run_url=run_url, job_state=state.phase.value)

    # how long ago, on the store's clock: the launcher's may be hours off, and so may the instance's
    store_now = (clocks or _Clocks()).now(store)
    if isinstance(store_now, str):
        problem = _store_problem(store) if state is None else None
        if problem:  # a missing bucket: say that, rather than why its clock could not be read
            return GcItem(instance, False, f"no run record, but {problem}: cannot tell that the run is gone", run_url=run_url)
        shown = state.phase.value if state else None
        return GcItem(
            instance,
            False,
            f"cannot read the store's clock ({store_now}): cannot tell how long ago",
            run_url=run_url,
            job_state=shown,
        )
    age = _age_s(instance, store_now)
    young = age is not None and age < boot_grace_s
    if state is None:
        if young:
            return GcItem(instance, False, "no run record yet (still booting)", run_url=run_url)
        # a missing bucket or a mistyped store reads as "no record" too: only trust a store that has something in it
        problem = _store_problem(store)
        if problem:
            return GcItem(instance, False, f"no run record, but {problem}: cannot tell that the run is gone", run_url=run_url)
        return GcItem(instance, True, "no run record in the store", run_url=run_url)
    try:
        silent_s = (store_now - jobs.objects.modified(layout.JOB_STATE)).total_seconds()
    except TrainctlError as exc:
        return GcItem(instance, False, f"cannot stat the run's state: {exc}", run_url=run_url, job_state=state.phase.value)
    limit = state.silent_limit_s()
    lost = limit is not None and silent_s > limit
    shown = (JobPhase.PREEMPTED.value if state.interruption else "lost") if lost else state.phase.value
    if state.phase is JobPhase.QUEUED:
        # the launcher's QUEUED record is not refreshed while the instance boots and installs
        if young:
            return GcItem(instance, False, "run queued, instance still booting", run_url=run_url, job_state=shown)
        return GcItem(instance, True, "run never picked up by an agent", run_url=run_url, job_state=shown)
    if lost:
        return GcItem(
            instance, True, f"agent silent for {silent_s:.0f}s by the store's clock (lost)", run_url=run_url, job_state=shown
        )
    return GcItem(instance, False, f"run is {shown}", run_url=run_url, job_state=shown)


def _store_problem(store_url: str) -> str | None:
    """Why the store cannot be trusted to hold the run records it should (None: it can)."""
    from trainctl_lightning.store import ObjectStore

    try:
        # an empty prefix lists nothing (ObjectStore names a missing bucket itself)
        if not ObjectStore(store_url).glob("*"):
            return f"the store {store_url} is empty or missing"
    except TrainctlError as exc:  # never terminate on an error
        return f"the store {store_url} cannot be listed ({exc})"
    return None


def find_garbage(provider: Provider, store_url: str | None = None, boot_grace_s: float = DEFAULT_BOOT_GRACE_S) -> GcReport:
    """Every live instance the provider lists, each classified; nothing is changed.

    Instances already terminating or terminated are left out: they cost nothing more.
    """
    report = GcReport(provider=provider.name)
    # providers that start a run's agent only at creation (aws: from user data) say so
    runless_is_garbage = bool(getattr(provider, "one_run_per_instance", False))
    clocks = _Clocks()
    for instance in provider.list(include_terminated=False):
        if instance.state in (InstanceState.TERMINATING, InstanceState.TERMINATED):
            continue
        item = classify(instance, store_url, boot_grace_s, runless_is_garbage=runless_is_garbage, clocks=clocks)
        report.items.append(_in_group(item))
    report.groups = _classify_groups(provider, store_url, boot_grace_s, clocks)
    report.credentials = _classify_credentials(provider, report.items, boot_grace_s, clocks, report.groups)
    report.cluster = _classify_cluster(provider, report.items, boot_grace_s, clocks)
    return report


def _classify_cluster(provider: Provider, items: list[GcItem], boot_grace_s: float, clocks: _Clocks) -> list[GcCluster]:
    """A multi-node run's placement group and security group are garbage once no kept instance
    runs the run, past the grace (they are made before the instances: a launch may be under way).
    Their age comes from the ``trainctl:created-at`` tag the launcher wrote, on the store's clock."""
    lister = getattr(provider, "list_cluster_resources", None)
    if lister is None:
        return []
    needed = {item.instance.run_id for item in items if not item.garbage}
    verdicts: list[GcCluster] = []
    for resource in lister():
        kind, ident, run_id, store = resource["kind"], resource["id"], resource.get("run_id"), resource.get("store_url")

        def verdict(garbage: bool, reason: str) -> None:
            verdicts.append(GcCluster(kind, ident, run_id, garbage, reason, store))  # noqa: B023

        if run_id in needed:
            verdict(False, "its run's instances are kept")
            continue
        if not store or not resource.get("created_at"):
            verdict(False, f"no {TAG_STORE} or creation tag: cannot tell its age (delete it by hand once its run is over)")
            continue
        store_now = clocks.now(store)
        if isinstance(store_now, str):
            verdict(False, f"cannot read the store's clock ({store_now})")
            continue
        try:
            age = (store_now - parse_time(resource["created_at"])).total_seconds()
        except ValueError:
            verdict(False, f"unreadable creation tag {resource['created_at']!r}: cannot tell its age")
            continue
        if age < boot_grace_s:
            verdict(False, f"only {age:.0f}s old: its launch may be under way")
            continue
        verdict(True, "no live instance runs its run")
    return verdicts


def _in_group(item: GcItem) -> GcItem:
    """An instance of a managed run's group is judged with its group: a preempted or silent run
    may be resuming on it (terminating it would end the group), so only an ended run or none
    makes it garbage."""
    if not item.instance.details.get("recovery_group") or not item.garbage:
        return item
    if item.job_state is None or (item.job_state != JobPhase.PREEMPTED.value and JobPhase(item.job_state).is_terminal()):
        return item
    item.garbage = False
    item.reason = f"run is {item.job_state}, in a managed run's group: it may be recovering (gc judges the group)"
    return item


def _classify_groups(provider: Provider, store_url: str | None, boot_grace_s: float, clocks: _Clocks) -> list[GcGroup]:
    """A managed run's group (and template) is garbage once its run has ended, its lifetime has
    emptied it, or, past the grace on the store's clock, its run has no record or has stayed
    preempted (no replacement picked it up)."""
    from trainctl_lightning.jobs.store import JobStore

    lister = getattr(provider, "list_recovery_groups", None)
    if lister is None:
        return []
    verdicts: list[GcGroup] = []
    for group in lister():
        name, run_id, instances = group["name"], group.get("run_id"), list(group.get("instances") or [])

        def verdict(garbage: bool, reason: str, job_state: str | None = None) -> None:
            verdicts.append(GcGroup(name, run_id, garbage, reason, job_state, instances))  # noqa: B023

        store = group.get("store_url") or store_url
        if group.get("group") and group.get("desired") == 0 and not instances:
            verdict(True, "its lifetime (max hours) emptied it")
            continue
        if not run_id or not store:
            verdict(False, f"run or store unknown (no {TAG_STORE} tag; pass --store)")
            continue
        store_now = clocks.now(store)
        if isinstance(store_now, str):
            verdict(False, f"cannot read the store's clock ({store_now})")
            continue
        # S3 reports whole seconds, EC2 does not: the store's clock may read up to 1 s behind
        age = (store_now - parse_time(group["created_at"])).total_seconds() + 1.0
        if not group.get("group"):
            if age < boot_grace_s:
                verdict(False, f"a template without its group, only {age:.0f}s old: its launch may be under way")
            else:
                verdict(True, "a template whose group is gone")
            continue
        jobs = JobStore(run_url_in(store, run_id))
        try:
            state = jobs.read_state()
            silent_s = (store_now - jobs.objects.modified(layout.JOB_STATE)).total_seconds() if state else None
        except Exception as exc:  # an unreadable store must never get a group deleted
            verdict(False, f"cannot read the run's state: {exc}")
            continue
        if state is None:
            if age < boot_grace_s:
                verdict(False, "no run record yet (still booting)")
                continue
            problem = _store_problem(store)
            if problem:
                verdict(False, f"no run record, but {problem}: cannot tell that the run is gone")
            else:
                verdict(True, "no run record in the store")
            continue
        phase = state.phase
        if phase is JobPhase.PREEMPTED:
            if silent_s is not None and silent_s >= boot_grace_s and not instances:
                verdict(True, f"run preempted {silent_s:.0f}s ago and no replacement resumed it", phase.value)
            else:
                verdict(False, "run preempted: its replacement may be resuming it", phase.value)
        elif phase.is_terminal():
            verdict(True, f"run ended ({phase.value})", phase.value)
        else:
            verdict(False, f"run is {phase.value}", phase.value)
    return verdicts


def _classify_credentials(
    provider: Provider, items: list[GcItem], boot_grace_s: float, clocks: _Clocks, groups: list[GcGroup] | None = None
) -> list[GcCredential]:
    """Per-run credentials whose run no kept instance or group runs, past the grace (a launch may be
    under way; a kept group's replacement needs its run's role)."""
    lister = getattr(provider, "list_run_credentials", None)
    if lister is None:
        return []
    needed = {item.instance.run_id for item in items if not item.garbage}
    needed |= {group.run_id for group in groups or [] if not group.garbage}
    verdicts: list[GcCredential] = []
    for role in lister():
        name, run_id, store = role["name"], role.get("run_id"), role.get("store_url")
        if run_id in needed:
            verdicts.append(GcCredential(name, run_id, False, "its run's instance is kept"))
            continue
        if not store:
            verdicts.append(GcCredential(name, run_id, False, f"no {TAG_STORE} tag: cannot tell its age"))
            continue
        store_now = clocks.now(store)
        if isinstance(store_now, str):
            verdicts.append(GcCredential(name, run_id, False, f"cannot read the store's clock ({store_now})"))
            continue
        # S3 reports whole seconds, IAM does not: the store's clock may read up to 1 s behind
        age = (store_now - parse_time(role["created_at"])).total_seconds() + 1.0
        if age < boot_grace_s:
            verdicts.append(GcCredential(name, run_id, False, f"only {age:.0f}s old: its launch may be under way"))
            continue
        verdicts.append(GcCredential(name, run_id, True, "no live instance runs its run"))
    return verdicts


def collect_garbage(
    provider: Provider, store_url: str | None = None, *, yes: bool = False, boot_grace_s: float = DEFAULT_BOOT_GRACE_S
) -> GcReport:
    """:func:`find_garbage`, and with ``yes=True`` terminate each garbage instance.

    A failure to terminate one instance is recorded on its item and does not stop the others.
    """
    report = find_garbage(provider, store_url, boot_grace_s)
    report.terminated_requested = yes
    if not yes:
        return report
    for item in report.garbage:
        try:
            item.instance = provider.terminate(item.instance.id)
            item.terminated = True
        except InstanceNotFoundError:
            item.terminated = True  # gone meanwhile: nothing left to pay for
        except TrainctlError as exc:
            item.error = str(exc)
    delete_group = getattr(provider, "delete_recovery_group", None)
    for group in report.groups:
        if not group.garbage or delete_group is None:
            continue
        try:
            delete_group(group.name)  # False: already gone (terminating its instance deleted it)
            group.deleted = True
        except TrainctlError as exc:
            group.error = str(exc)
    failed = {item.instance.run_id for item in report.garbage if item.error}
    failed |= {group.run_id for group in report.groups if group.error}
    delete_cluster = getattr(provider, "delete_cluster_resource", None)
    # the security groups first: EC2 keeps a placement group while it holds instances, not ENIs
    for resource in sorted(report.cluster, key=lambda r: r.kind != "security-group"):
        if not resource.garbage or delete_cluster is None or resource.run_id in failed:
            continue
        try:
            delete_cluster(resource.kind, resource.id, resource.run_id, resource.store_url)  # False: already gone
            resource.deleted = True
        except TrainctlError as exc:
            resource.error = str(exc)
    delete = getattr(provider, "delete_run_credentials", None)
    for credential in report.credentials:
        if not credential.garbage or delete is None or credential.run_id in failed:
            continue
        try:
            delete(credential.name)  # False: already gone (terminate deletes its run's role too)
            credential.deleted = True
        except TrainctlError as exc:
            credential.error = str(exc)
    return report
