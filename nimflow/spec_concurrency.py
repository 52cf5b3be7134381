"""One run per spec at a time: runs for the same model queue instead of racing for its endpoint.

Each spec has a Prefect global concurrency limit ``nimflow-spec-<name>`` of 1. A run holds its one slot
for all of its work; a second run for the same spec waits for it (polling the server, as Prefect
does for any limit), while runs for other specs go ahead.

Prefect 3.9 does not create a missing limit: the client has no ``create_if_missing`` and the server
ignores the deprecated body field, and ``concurrency(..., strict=False)`` on a missing limit only logs
a warning and runs unguarded. So :func:`one_run_per_spec` creates the limit (limit 1) when it is
missing (it reads it first: a create that meets an existing limit makes the server log an ERROR),
then acquires, so a limit that still cannot be found fails the run instead of letting it race. An
operator may raise a limit (``prefect gcl update nimflow-spec-NAME --limit 2``) or deactivate it; an
existing limit is never changed. A slot's lease is renewed while the run lives; a crashed run's slot
is freed when its lease expires (``lease_seconds``).

A wait for a slot is never silent and never endless (:func:`hold_slots`): every
``NIMFLOW_SLOT_WAIT_LOG_SECONDS`` the run logs what it waits for and who holds it, frees the slots
whose holder is gone (:func:`nimflow.slot_doctor.free_leaked`: a holder run that ended, a lease lost
in a server restart), and after ``NIMFLOW_SLOT_WAIT_TIMEOUT_SECONDS`` it fails with
:class:`~nimflow.errors.SlotWaitTimeout` naming the limit, the holders and ``nimflow doctor --free``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency._leases import maintain_concurrency_lease
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.logging.loggers import get_logger, get_run_logger

from nimflow.errors import PermanentError, SlotWaitTimeout, translated_errors
from nimflow.settings import get_settings
from nimflow.slot_doctor import FREE_COMMAND, LeakWatch, forget_holder, free_leaked, lease_exists, record_holder
from nimflow.spec import HostingSpec

#: How long a slot outlives a run that stopped renewing it (a crashed worker), in seconds.
LEASE_SECONDS = 300.0


def spec_limit_name(spec_name: str) -> str:
    """The global concurrency limit that queues the runs of one spec."""
    return f"nimflow-spec-{spec_name}"


def ensure_limit(client: SyncPrefectClient, name: str, limit: int, *, update: bool) -> str:
    """Create the global concurrency limit ``name`` unless it exists: ``created``, ``updated`` or ``kept``.

    Read first: the server logs every refused create (409) as an ERROR, and the limit exists on
    every call but the first. Two first callers may both find it missing; the second create's
    conflict means the other one made it, which is as good. With ``update``, an existing limit with
    another value is set to ``limit``; without, it is left as the operator set it.
    """
    try:
        current = client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
        except ObjectAlreadyExists:
            return "kept"  # created meanwhile by a concurrent caller
        return "created"
    if update and current.limit != limit:
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=limit))
        return "updated"
    return "kept"


def ensure_spec_limit(spec_name: str) -> str:
    """Create the spec's concurrency limit (limit 1) unless it exists; return its name.

    Raises:
        NimflowError: the Prefect API could not be reached or refused the request.
    """
    name = spec_limit_name(spec_name)
    with translated_errors(f"creating the Prefect concurrency limit {name}"), get_client(sync_client=True) as client:
        ensure_limit(client, name, 1, update=False)  # an operator's setting is kept
    return name


@contextmanager
def one_run_per_spec(spec_name: str, lease_seconds: float = LEASE_SECONDS) -> Iterator[None]:
    """Hold the spec's one slot for the block; wait while another run of the spec holds it.

    Raises:
        NimflowError: the limit could not be created or acquired (Prefect API unreachable, limit deleted
            between creation and acquisition).
    """
    name = ensure_spec_limit(spec_name)
    with hold_slots(name, 1, lease_seconds=lease_seconds):
        yield


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The run's logger inside a flow run (the UI shows the wait), else nimflow's."""
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - MissingContextError outside a run
        return get_logger("nimflow.slots")


def _try_acquire(client: SyncPrefectClient, name: str, slots: int, lease_seconds: float,
                 holder: ConcurrencyLeaseHolder | None) -> tuple[UUID | None, float]:
    """One attempt: the lease id when granted, else None and the server's Retry-After (seconds).

    Raises:
        PermanentError: the limit does not exist (deleted since the run checked it).
        httpx.HTTPStatusError: the API refused the request otherwise.
    """
    try:
        response = client.increment_concurrency_slots_with_lease(
            names=[name], slots=slots, mode="concurrency", lease_duration=lease_seconds, holder=holder)
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code != 423:  # 423 Locked: all slots taken
            raise
        return None, float(exc.response.headers.get("Retry-After", 5))
    granted = response.json()
    if not granted.get("limits"):
        raise PermanentError(f"the Prefect concurrency limit {name} does not exist (deleted meanwhile?); "
                             "`nimflow bootstrap` creates the fleet's limits, a run creates its spec's")
    return UUID(granted["lease_id"]), 0.0


def _acquire(client: SyncPrefectClient, name: str, slots: int, lease_seconds: float,
             holder: ConcurrencyLeaseHolder | None) -> UUID:
    """Wait for ``slots`` slots of ``name``, logging and freeing leaked slots; return the lease id.

    Raises:
        SlotWaitTimeout: still not granted after NIMFLOW_SLOT_WAIT_TIMEOUT_SECONDS.
    """
    settings = get_settings()
    started = time.monotonic()
    deadline = started + settings.slot_wait_timeout_seconds
    next_look = started
    watch = LeakWatch()
    while True:
        lease_id, retry_after = _try_acquire(client, name, slots, lease_seconds, holder)
        if lease_id is not None:
            if time.monotonic() > started + 1:
                _logger().info("Got %d slot(s) of %s after waiting %.0fs", slots, name, time.monotonic() - started)
            return lease_id
        now = time.monotonic()
        if now >= next_look or now >= deadline:
            view = free_leaked(client, name, watch, lease_seconds=lease_seconds)
            for line in watch.freed:
                _logger().warning("Freed a slot whose holder is gone: %s", line)
            freed, watch.freed = bool(watch.freed), []
            if freed:
                continue  # try at once: the slot may be free now
            holders = view.describe_holders(watch.lost_holders)
            if now >= deadline:
                raise SlotWaitTimeout(
                    f"waited {now - started:.0f}s for {slots} slot(s) of the Prefect concurrency limit {name} "
                    f"({view.active_slots}/{view.limit} in use), held by {holders}; if that holder "
                    f"is gone, free its slots with `{FREE_COMMAND}` (or `prefect gcl update {name} --active-slots 0` "
                    "when no run holds any), or raise NIMFLOW_SLOT_WAIT_TIMEOUT_SECONDS to wait longer")
            _logger().info("Waiting for %d slot(s) of %s (%d/%d in use), held by %s", slots, name,
                           view.active_slots, view.limit, holders)
            next_look = now + settings.slot_wait_log_seconds
        time.sleep(max(0.1, min(retry_after, next_look - time.monotonic(), deadline - time.monotonic())))


@contextmanager
def hold_slots(name: str, slots: int, *, lease_seconds: float = LEASE_SECONDS) -> Iterator[None]:
    """Hold ``slots`` slots of the limit ``name`` for the block, recorded on this flow run as their holder.

    Waits while they are taken (see the module doc); the lease is renewed while the block runs (a
    transient renewal failure must not stop an hour-long build: the lease only guards crashed runs).
    A run whose lease was lost meanwhile (a server restart with in-memory lease storage) keeps its
    holder record, so the next run frees the slot once this run has ended.

    Raises:
        SlotWaitTimeout: the slots stayed taken past NIMFLOW_SLOT_WAIT_TIMEOUT_SECONDS.
        NimflowError: the Prefect API could not be reached, or the limit does not exist.
    """
    context = FlowRunContext.get()
    run_id = context.flow_run.id if context and context.flow_run else None
    holder = ConcurrencyLeaseHolder(type="flow_run", id=run_id) if run_id else None
    with translated_errors(f"acquiring {slots} slot(s) of the Prefect concurrency limit {name}"), \
            get_client(sync_client=True) as client:
        lease_id = _acquire(client, name, slots, lease_seconds, holder)
        try:
            if run_id:
                record_holder(client, run_id, name, slots, lease_id)
        except BaseException:
            client.release_concurrency_slots_with_lease(lease_id)
            raise
    try:
        # Prefect's own lease keeper (a renewal thread; a private API, read in Prefect 3.9): the
        # public `concurrency()` hides the lease id that the holder record and the release need, and its
        # `timeout_seconds` can cancel a request the server already granted, leaking that slot.
        with maintain_concurrency_lease(lease_id, lease_seconds, raise_on_lease_renewal_failure=False):
            yield
    finally:
        _release(name, slots, lease_id, run_id, lease_seconds)


def _release(name: str, slots: int, lease_id: UUID, run_id: UUID | None, lease_seconds: float) -> None:
    """Give the slots back and remove this run's holder record; a lease the server lost keeps the record.

    Never raises: it runs in a ``finally``, where an API error would hide the block's own outcome, and a
    slot that could not be given back is freed by its lease's expiry or by the next waiting run.
    """
    try:
        with get_client(sync_client=True) as client:
            lost = not lease_exists(client, lease_id)
            client.release_concurrency_slots_with_lease(lease_id)
            if lost:
                # The record stays: once this run has ended, the next run (or the doctor) sees an ended holder.
                _logger().warning("The lease on %d slot(s) of %s was lost (the Prefect server restarted?); they stay "
                                  "taken until this run has ended and the next run (or `%s`) frees them",
                                  slots, name, FREE_COMMAND)
            elif run_id:
                forget_holder(client, run_id, name)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        _logger().warning("Could not give back %d slot(s) of %s (%s: %s); its lease expires within %.0fs",
                          slots, name, type(exc).__name__, exc, lease_seconds)


def gpu_limit_name(host: str) -> str:
    """The global concurrency limit holding one slot per GPU of ``host`` (``nimflow bootstrap --gpu-host``)."""
    return f"nimflow-gpus-{host}"


def gpus_used(spec: HostingSpec, host_slots: int) -> int:
    """How many of the host's GPUs a run of ``spec`` may use at once: the most any of its containers
    asks for (build, the serving container, a blue-green candidate on standby GPUs); ``all`` is every slot."""
    counts = [0]
    for gpus in (spec.build.gpus if spec.build else None, spec.deploy.gpus, spec.rollout.standby_gpus):
        if gpus == "all":
            return host_slots
        if isinstance(gpus, list):
            counts.append(len(gpus))
    used = max(counts)
    if spec.rollout_strategy == "blue-green" and spec.rollout.standby_gpus is None:
        used *= 2  # the candidate starts beside the serving container on GPUs of its own
    return min(used, host_slots)


@contextmanager
def host_gpu_slots(spec: HostingSpec, lease_seconds: float = LEASE_SECONDS) -> Iterator[int]:
    """Hold the GPU slots a run of ``spec`` needs on this host while the block runs; yield how many.

    Only where the fleet set a limit for this host (``nimflow-gpus-<NIMFLOW_HOST_NAME>``); elsewhere,
    and for runs that use no GPU, nothing is held (yields 0).

    Raises:
        NimflowError: the Prefect API could not be reached.
    """
    name = gpu_limit_name(get_settings().host_name)
    with translated_errors(f"reading the Prefect concurrency limit {name}"), get_client(sync_client=True) as client:
        try:
            slots = client.read_global_concurrency_limit_by_name(name).limit
        except ObjectNotFound:
            slots = 0
    needed = gpus_used(spec, slots) if slots else 0
    if not needed:
        yield 0
        return
    with hold_slots(name, needed, lease_seconds=lease_seconds):
        yield needed
