"""``nimflow.endpoint.promoted``: the event a rollout emits once its new version takes traffic.

Downstream work hangs off it with an ordinary Prefect automation (a notification, an evaluation
job), matching the event name and, to pick one model, the resource::

    expect: [nimflow.endpoint.promoted]
    match: {prefect.resource.id: "nimflow.deployment.tiny-llama-demo"}

The resource is the nimflow deployment (one spec's endpoint on one host); the payload says what it
serves now. Nothing secret goes in: the endpoint URL is the one clients call, the revision a commit
sha, the engine key a digest (no tokens, no signed URLs, no credentials). A run that changed nothing
(the same container already served the model) emits no event.
"""

from __future__ import annotations

import logging
from typing import Any

from nimflow.records import HostingRecord
from nimflow.settings import get_settings

PROMOTED_EVENT = "nimflow.endpoint.promoted"

_log = logging.getLogger(__name__)


def deployment_resource(name: str) -> dict[str, str]:
    """The event resource of nimflow deployment ``name``: ``nimflow.deployment.<name>`` with its labels."""
    return {
        "prefect.resource.id": f"nimflow.deployment.{name}",
        "prefect.resource.name": name,
        "nimflow.spec": name,
        "nimflow.host": get_settings().host_name,
    }


def promoted_payload(record: HostingRecord) -> dict[str, Any]:
    """What a promoted endpoint serves now, from the run's record (no secrets: see the module docstring)."""
    return {
        "endpoint": record.endpoint,
        "served_model_name": record.served_model_name,
        "revision": record.revision_sha,
        "engine_key": record.engine_key,
        "engine_uri": record.engine_uri,
        "image": record.image,
        "adapters": list(record.adapters),
        "strategy": record.strategy,
        "container_id": record.container_id,
        "replaced_container_id": record.replaced_container_id,
    }


def emit_promoted(record: HostingRecord) -> str | None:
    """Emit ``nimflow.endpoint.promoted`` for the rollout ``record`` describes; the event's id, or None.

    Inside a flow run Prefect relates the event to the run (and its deployment). The event is news,
    not the rollout's result: a failure to send it is logged and the run goes on.
    """
    from prefect.events import emit_event

    try:
        event = emit_event(PROMOTED_EVENT, resource=deployment_resource(record.name), payload=promoted_payload(record))
    except Exception as exc:  # noqa: BLE001 - the endpoint serves either way; the log says what was not sent
        _log.warning("The event %s for %s was not sent: %s", PROMOTED_EVENT, record.name, exc)
        return None
    return str(event.id) if event is not None else None
