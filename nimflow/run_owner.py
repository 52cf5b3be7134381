"""Which Prefect flow run started a container, and whether that run is over.

A flow process that is SIGKILLed (the OOM killer, a worker's kill after its grace period) or whose
host crashes cannot clean up after itself: a build container keeps its GPUs, a rollout's candidate
keeps running beside (blue-green) or instead of (recreate) the backend that served. So every
container a run starts for itself (build containers, rollout candidates) carries the run's id and the
Prefect API it reports to (:func:`run_labels`); whoever comes next on that Docker host asks the same
API whether the run is over (:func:`flow_run_is_over`) and undoes what it left
(:mod:`nimflow.run_leftovers`).
"""

from __future__ import annotations

import logging
from uuid import UUID

from nimflow.containers import LABEL_PREFIX

logger = logging.getLogger(__name__)

#: The label naming the Prefect flow run that started a container.
FLOW_RUN_LABEL = f"{LABEL_PREFIX}flow-run-id"
#: The label naming the Prefect API that run reports to.
PREFECT_API_LABEL = f"{LABEL_PREFIX}prefect-api"


def prefect_api() -> str | None:
    """The Prefect API URL this process reports to (None: no API configured)."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def run_labels() -> dict[str, str]:
    """The labels naming the flow run this process runs and its API; none outside a run or without an API.

    Not part of any container's identity (``spec-hash``): the same settings started by another run
    are the same container.
    """
    from prefect.runtime import flow_run

    api = prefect_api()
    return {FLOW_RUN_LABEL: str(flow_run.id), PREFECT_API_LABEL: api} if flow_run.id and api else {}


def flow_run_is_over(flow_run_id: str) -> bool | None:
    """Whether a flow run is over: in a final state (Completed, Failed, Crashed, Cancelled) or unknown to the API.

    A run killed outright stays Running until the zombie-run automation marks it Crashed (no heartbeat
    for three periods), so what it left is "not over" until then.

    Returns:
        True or False; None when the Prefect API could not tell (unreachable, an error): the caller
        then leaves what the run owns alone.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        run_id = UUID(flow_run_id)
    except ValueError:
        return True  # not an id any run has: no run can come back for its container
    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run_id).state
    except ObjectNotFound:
        return True
    except Exception as exc:  # noqa: BLE001 - undecided, not an error: the container is kept
        logger.warning("could not ask the Prefect API about flow run %s (%s: %s)", flow_run_id, type(exc).__name__, exc)
        return None
    return state is not None and state.is_final()
