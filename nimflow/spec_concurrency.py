"""One run per spec at a time: runs for the same model queue instead of racing for its endpoint.

Each spec has a Prefect global concurrency limit ``nimflow-spec-<name>`` of 1. A run holds its one slot
for all of its work; a second run for the same spec waits for it (polling the server, as Prefect
does for any limit), while runs for other specs go ahead.

Prefect 3.9 does not create a missing limit: the client has no ``create_if_missing`` and the server
ignores the deprecated body field, and ``concurrency(..., strict=False)`` on a missing limit only logs
a warning and runs unguarded. So :func:`one_run_per_spec` creates the limit (limit 1) when it is
missing, then acquires with ``strict=True``, so a limit that still cannot be found fails the run
instead of letting it race. An operator may raise a limit (``prefect gcl update nimflow-spec-NAME
--limit 2``) or deactivate it; an existing limit is never changed. A slot's lease is renewed while the
run lives; a crashed run's slot is freed when its lease expires (``lease_seconds``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists

from nimflow.errors import translated_errors

#: How long a slot outlives a run that stopped renewing it (a crashed worker), in seconds.
LEASE_SECONDS = 300.0


def spec_limit_name(spec_name: str) -> str:
    """The global concurrency limit that queues the runs of one spec."""
    return f"nimflow-spec-{spec_name}"


def ensure_spec_limit(spec_name: str) -> str:
    """Create the spec's concurrency limit (limit 1) unless it exists; return its name.

    Raises:
        NimflowError: the Prefect API could not be reached or refused the request.
    """
    name = spec_limit_name(spec_name)
    with translated_errors(f"creating the Prefect concurrency limit {name}"), get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        except ObjectAlreadyExists:
            pass  # created before, by an operator or another run: kept as it is
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
