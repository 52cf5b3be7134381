"""One run per spec at a time: runs for the same model queue instead of racing for its endpoint.

Each spec has a Prefect global concurrency limit ``nimflow-spec-<name>`` of 1. A run holds its one slot
for all of its work; a second run for the same spec waits for it (polling the server, as Prefect
does for any limit), while runs for other specs go ahead.

Prefect 3.9 does not create a missing limit: the client has no ``create_if_missing`` and the server
ignores the deprecated body field, and ``concurrency(..., strict=False)`` on a missing limit only logs
a warning and runs unguarded. So :func:`one_run_per_spec` creates the limit (limit 1) when it is
missing (it reads it first: a create that meets an existing limit makes the server log an ERROR),
then acquires with ``strict=True``, so a limit that still cannot be found fails the run
instead of letting it race. An operator may raise a limit (``prefect gcl update nimflow-spec-NAME
--limit 2``) or deactivate it; an existing limit is never changed. A slot's lease is renewed while the
run lives; a crashed run's slot is freed when its lease expires (``lease_seconds``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from nimflow.errors import translated_errors
from nimflow.settings import get_settings
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
    with ExitStack() as held:
        with translated_errors(f"acquiring the Prefect concurrency limit {name}"):
            # A transient renewal failure must not stop an hour-long build; the lease only guards crashed runs.
            held.enter_context(concurrency(name, occupy=1, lease_duration=lease_seconds, strict=True,
                                           raise_on_lease_renewal_failure=False))
        yield


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
    with ExitStack() as held:
        if needed:
            with translated_errors(f"acquiring {needed} slot(s) of {name}"):
                held.enter_context(concurrency(name, occupy=needed, lease_duration=lease_seconds, strict=True,
                                               raise_on_lease_renewal_failure=False))
        yield needed
