"""Who holds nimflow's concurrency slots, and freeing the slots whose holder is gone.

Prefect keeps a slot's holder in the lease's metadata, but its API offers no way to read the leases
of a global concurrency limit, and the default lease storage lives in the server's memory: after a
server restart the limit still counts the slot (``active_slots``) while no lease is left to expire
it, and the slot is taken for good. So a nimflow run records itself on its own flow run when it is
granted slots: the tag ``nimflow-slot:<limit>`` (to find holders; visible in the UI) and the label
``nimflow.slot.<limit>`` (how many slots, since when, the lease id). The record is removed when the
slots are released.

A limit is then explained by its records (:func:`inspect_limit`):

- a holder whose flow run is Running, Pending, ... holds its slots; nothing here ever frees them;
- a holder whose flow run ended (Completed, Failed, Cancelled, Crashed) is *gone*: its lease is
  released (which frees its slots when the lease still exists) and its record removed;
- slots that no record accounts for (a lease lost in a restart, a holder run deleted, or a run
  killed between being granted and recording itself) are *unaccounted*. A run records itself moments
  after the grant, so they are only freed when they stay unaccounted across two looks at least
  :data:`RECORD_GRACE_SECONDS` apart; and only as many as were unaccounted both times.

:func:`free_leaked` does this; the waiting run (:mod:`nimflow.spec_concurrency`) and
``nimflow doctor --free`` both call it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.exceptions import ObjectNotFound

#: The limits nimflow owns: a spec's queue (``nimflow-spec-<name>``) and a host's GPUs (``nimflow-gpus-<host>``).
NIMFLOW_LIMIT_PREFIXES = ("nimflow-spec-", "nimflow-gpus-")
#: A run records itself as holder moments after the server grants its slots; slots no record accounts
#: for must stay so at least this long before they are called leaked (and freed).
RECORD_GRACE_SECONDS = 15.0
#: The command a message tells an operator to run to free slots whose holder is gone.
FREE_COMMAND = "nimflow doctor --free"
_ENDED = frozenset({StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED})


def holder_tag(limit_name: str) -> str:
    """The tag a flow run carries while it holds slots of ``limit_name``."""
    return f"nimflow-slot:{limit_name}"


def holder_label(limit_name: str) -> str:
    """The flow run label that says how many slots of ``limit_name`` the run holds, since when, under which lease."""
    return f"nimflow.slot.{limit_name}"


@dataclass(frozen=True)
class SlotHolder:
    """A flow run recorded as holding slots of a limit."""

    flow_run_id: UUID
    flow_run_name: str
    #: The run's state name (Running, Crashed, ...).
    state: str
    ended: bool
    slots: int
    since: datetime | None
    lease_id: UUID | None

    def describe(self) -> str:
        """``flow run 'tiny@706dadd' (3f2c...) Running, 1 slot since 2026-12-03 16:04:30 UTC``."""
        since = f" since {self.since:%Y-%m-%d %H:%M:%S} UTC" if self.since else ""
        return f"flow run {self.flow_run_name!r} ({self.flow_run_id}) {self.state}, {self.slots} slot(s){since}"


@dataclass(frozen=True)
class LimitSlots:
    """One look at a limit: its size, its taken slots and the holders recorded for them."""

    name: str
    limit: int
    active_slots: int
    #: False when an operator deactivated the limit: it holds nobody back.
    active: bool
    holders: tuple[SlotHolder, ...] = ()

    @property
    def gone(self) -> list[SlotHolder]:
        """Holders whose flow run ended: their slots are leaked unless their lease still expires them."""
        return [h for h in self.holders if h.ended]

    @property
    def unaccounted(self) -> int:
        """Taken slots that no recorded holder accounts for."""
        return max(0, self.active_slots - sum(h.slots for h in self.holders))

    def describe_holders(self, lost: list[str] | None = None) -> str:
        """Who holds the limit's slots, for a log line or a message; ``lost``: ended holders whose lease
        the server lost (their slots show as unaccounted), as :attr:`LeakWatch.lost_holders` has them."""
        parts = [h.describe() for h in self.holders]
        if self.unaccounted and lost:
            parts.extend(f"{holder} (ended, its lease lost: its slot(s) are freed once no run claims them)" for holder in lost)
        elif self.unaccounted:
            parts.append(f"{self.unaccounted} slot(s) with no recorded holder (a lease lost in a server restart, "
                         "or a run that is just starting)")
        return "; ".join(parts) or "nobody"


def _parse_record(value: object) -> tuple[int, datetime | None, UUID | None]:
    """The slots, since and lease id a holder label holds (1, None, None where it cannot be read)."""
    try:
        record = json.loads(str(value))
        return (int(record["slots"]), datetime.fromisoformat(record["since"]),
                UUID(record["lease_id"]) if record.get("lease_id") else None)
    except (ValueError, KeyError, TypeError):
        return 1, None, None


def _holder(run: FlowRun, limit_name: str) -> SlotHolder:
    slots, since, lease_id = _parse_record(run.labels.get(holder_label(limit_name)))
    state_type = run.state.type if run.state else None
    state = (run.state.name if run.state else None) or "no state"
    return SlotHolder(run.id, run.name, state, state_type in _ENDED, slots, since, lease_id)


def inspect_limit(client: SyncPrefectClient, limit_name: str) -> LimitSlots:
    """Look at ``limit_name``: its slots and their recorded holders.

    Raises:
        ObjectNotFound: the limit does not exist.
    """
    limit = client.read_global_concurrency_limit_by_name(limit_name)
    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[holder_tag(limit_name)])))
    return LimitSlots(limit_name, limit.limit, limit.active_slots, bool(limit.active),
                      tuple(_holder(run, limit_name) for run in runs))


def nimflow_limits(client: SyncPrefectClient) -> list[LimitSlots]:
    """Every limit nimflow owns (``nimflow-spec-*``, ``nimflow-gpus-*``), looked at, by name."""
    names = [limit.name for limit in client.read_global_concurrency_limits(limit=200)
             if limit.name.startswith(NIMFLOW_LIMIT_PREFIXES)]
    return [inspect_limit(client, name) for name in sorted(names)]


def record_holder(client: SyncPrefectClient, flow_run_id: UUID, limit_name: str, slots: int, lease_id: UUID) -> None:
    """Mark flow run ``flow_run_id`` as holding ``slots`` slots of ``limit_name`` under ``lease_id``."""
    since = datetime.now(timezone.utc).isoformat()
    client.update_flow_run_labels(flow_run_id, {holder_label(limit_name): json.dumps(
        {"slots": slots, "since": since, "lease_id": str(lease_id)})})
    tags = list(client.read_flow_run(flow_run_id).tags)
    if holder_tag(limit_name) not in tags:
        client.update_flow_run(flow_run_id, tags=[*tags, holder_tag(limit_name)])


def forget_holder(client: SyncPrefectClient, flow_run_id: UUID, limit_name: str) -> None:
    """Remove flow run ``flow_run_id``'s record as holder of ``limit_name`` (a deleted run has none)."""
    try:
        tags = list(client.read_flow_run(flow_run_id).tags)
    except ObjectNotFound:
        return
    if holder_tag(limit_name) in tags:
        client.update_flow_run(flow_run_id, tags=[t for t in tags if t != holder_tag(limit_name)])
    client.update_flow_run_labels(flow_run_id, {holder_label(limit_name): "released"})


def lease_exists(client: SyncPrefectClient, lease_id: UUID) -> bool:
    """Whether the server still has lease ``lease_id`` (renewing it for the minimum the API allows, 60 s).

    A lease the server does not have is never expired by Prefect: its slots stay taken until freed.
    """
    try:
        client.renew_concurrency_lease(lease_id, lease_duration=60)
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code in (404, 410):
            return False
        raise
    return True


@dataclass
class LeakWatch:
    """What a watcher of one limit saw on its earlier looks (see :func:`free_leaked`)."""

    #: Slots no record accounted for on every look since ``since`` (monotonic seconds).
    unaccounted: int = 0
    since: float | None = None
    #: Slots of ended holders whose lease the server no longer had: Prefect will never free them.
    lost: int = 0
    #: Those holders, described.
    lost_holders: list[str] = field(default_factory=list)
    #: What :func:`free_leaked` freed so far, one line each (for logs and ``nimflow doctor``).
    freed: list[str] = field(default_factory=list)


def free_leaked(client: SyncPrefectClient, limit_name: str, watch: LeakWatch, *, lease_seconds: float,
                grace_seconds: float = RECORD_GRACE_SECONDS, now: Callable[[], float] = time.monotonic) -> LimitSlots:
    """Free the slots of ``limit_name`` whose holder is gone; return the limit as it is afterwards.

    Pass the same ``watch`` to each call on one limit. A holder whose run ended: its lease is released
    when the server still has it (that frees its slots exactly), else its slots are counted as lost;
    its record is removed either way. Slots no record accounts for are freed (decremented, never set)
    once every look for ``grace_seconds`` saw them: as many as ended holders' lost leases explain, and
    all of them once they stayed unaccounted for ``lease_seconds`` more (by then Prefect has expired
    any lease behind them, so no slot is freed twice). A holder whose run is Running or Pending is
    never touched.

    Raises:
        ObjectNotFound: the limit does not exist.
    """
    view = inspect_limit(client, limit_name)
    for holder in view.gone:
        if holder.lease_id is not None and lease_exists(client, holder.lease_id):
            client.release_concurrency_slots_with_lease(holder.lease_id)
            watch.freed.append(f"{limit_name}: released the lease of {holder.describe()}")
        else:
            watch.lost += holder.slots
            watch.lost_holders.append(holder.describe())
        forget_holder(client, holder.flow_run_id, limit_name)
    if view.gone:
        view = inspect_limit(client, limit_name)
    at = now()
    if not view.unaccounted:
        watch.unaccounted, watch.since, watch.lost, watch.lost_holders = 0, None, 0, []
        return view
    if watch.since is None:
        watch.unaccounted, watch.since = view.unaccounted, at
        return view
    watch.unaccounted = min(watch.unaccounted, view.unaccounted)
    waited = at - watch.since
    leaked = 0
    if waited >= grace_seconds:
        leaked = min(watch.unaccounted, watch.lost)
    if waited >= lease_seconds + grace_seconds:
        leaked = watch.unaccounted
    if not leaked:
        return view
    # Decrement, never set: the server subtracts atomically, so a slot granted meanwhile stays counted.
    client.release_concurrency_slots([limit_name], leaked, occupancy_seconds=max(waited, 1.0))
    watch.freed.append(f"{limit_name}: freed {leaked} slot(s) that no live run held (unaccounted for {waited:.0f}s)")
    watch.lost = max(0, watch.lost - leaked)
    watch.lost_holders = watch.lost_holders[leaked:]
    watch.unaccounted, watch.since = 0, None
    return inspect_limit(client, limit_name)


@dataclass
class DoctorReport:
    """What ``nimflow doctor`` found (and with ``--free``, freed), limit by limit."""

    limits: list[LimitSlots] = field(default_factory=list)
    #: One line per leak found: a gone holder, or slots no live run held on two looks.
    leaks: list[str] = field(default_factory=list)
    freed: list[str] = field(default_factory=list)
    #: Leaks ``--free`` could not prove safe to free, each with the command that frees it by hand.
    left: list[str] = field(default_factory=list)

    def render(self) -> str:
        """The text ``nimflow doctor`` prints."""
        if not self.limits:
            return "no nimflow concurrency limits (nimflow-spec-*, nimflow-gpus-*) on this Prefect server"
        out: list[str] = []
        for view in self.limits:
            state = "" if view.active else " (inactive: holds nobody back)"
            out.append(f"{view.name}: {view.active_slots}/{view.limit} slot(s) in use{state}")
            out.extend(f"  held by {h.describe()}" for h in view.holders)
            if view.unaccounted:
                out.append(f"  {view.unaccounted} slot(s) held by no recorded run")
        for title, lines in (("leaked", self.leaks), ("freed", self.freed), ("not freed", self.left)):
            out.extend(f"{title}: {line}" for line in lines)
        if self.leaks and not self.freed and not self.left:
            out.append(f"run `{FREE_COMMAND}` to free the leaked slots")
        elif not self.leaks:
            out.append("no leaked slots")
        return "\n".join(out)


def _unaccounted_twice(client: SyncPrefectClient, name: str, first: LimitSlots, grace_seconds: float,
                       wait: Callable[[float], None]) -> int:
    """Slots of ``name`` no record accounted for on two looks ``grace_seconds`` apart (0 if none on the first)."""
    if not first.unaccounted:
        return 0
    wait(grace_seconds)  # a run that was just granted records itself within moments
    return min(first.unaccounted, inspect_limit(client, name).unaccounted)


def diagnose(client: SyncPrefectClient, *, free: bool, lease_seconds: float,
             grace_seconds: float = RECORD_GRACE_SECONDS, wait: Callable[[float], None] = time.sleep) -> DoctorReport:
    """Look at nimflow's limits; with ``free``, free the slots whose holder is gone (:func:`free_leaked`).

    Without ``free`` nothing is changed. Slots no record accounts for and no ended holder's lost lease
    explains are not freed even with ``free`` (a run killed before it recorded itself may still hold a
    lease that Prefect will expire): they are reported with the ``prefect gcl update`` that frees them.

    Raises:
        ObjectNotFound: a limit was deleted while it was being looked at.
    """
    report = DoctorReport()
    for view in nimflow_limits(client):
        leaks = [f"{view.name}: {h.describe()} ended but still holds its slot(s)" for h in view.gone]
        if free:
            watch = LeakWatch()
            after = free_leaked(client, view.name, watch, lease_seconds=lease_seconds, grace_seconds=grace_seconds)
            if watch.since is not None:
                wait(grace_seconds)
                after = free_leaked(client, view.name, watch, lease_seconds=lease_seconds, grace_seconds=grace_seconds)
            report.freed.extend(watch.freed)
            unrecorded = _unaccounted_twice(client, view.name, after, grace_seconds, wait) if after.unaccounted else 0
        else:
            after = view
            unrecorded = _unaccounted_twice(client, view.name, view, grace_seconds, wait)
        if unrecorded:
            leaks.append(f"{view.name}: {unrecorded} slot(s) held by no recorded run")
            if free:
                live = after.active_slots - after.unaccounted
                report.left.append(
                    f"{view.name}: {unrecorded} slot(s) no record explains (a run killed before it recorded itself, "
                    f"or not a nimflow run); Prefect frees a slot with a lease within {lease_seconds:.0f}s; if they stay, "
                    f"`prefect gcl update {view.name} --active-slots {live}`")
        report.leaks.extend(leaks)
        report.limits.append(after)
    return report
