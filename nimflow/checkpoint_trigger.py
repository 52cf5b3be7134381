"""The checkpoint trigger: the automation nimflow owns that turns each ``nimflow.checkpoint.landed`` event
into one ``host-on-checkpoint`` run.

It is not a ``triggers:`` entry of prefect.yaml: ``prefect deploy`` deletes and recreates a deployment's
own automations on every deploy (``delete_resource_owned_automations``), so events arriving meanwhile
were lost and a paused trigger came back enabled. ``nimflow bootstrap`` creates this automation through
Prefect's automation API under :data:`CHECKPOINT_AUTOMATION_NAME` and later brings it in line in place
(a paused one stays paused); it has no owner resource, so ``prefect deploy`` leaves it alone.

The match: events naming a checkpoint source (``prefect.resource.id: nimflow.source.*``) *and* a spec
(``nimflow.spec: "?*"``: fnmatch needs one character at least, and a missing label matches no pattern on
the server), so an event without the spec's name starts nothing. One run per event (Reactive,
threshold 1, for each source). Every parameter template has ``| default(...)``: a missing event field
without one would make the server drop the run.
"""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID

from prefect.events.actions import RunDeployment
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

from nimflow.checkpoint_events import EVENT_NAME

#: The automation's name: bootstrap finds it by this name and updates it in place.
CHECKPOINT_AUTOMATION_NAME = "nimflow: host checkpoint"
#: The flow and deployment (prefect.yaml) the trigger runs: ``<flow>/<deployment>``.
HOST_ON_CHECKPOINT_FLOW = "host_model"
HOST_ON_CHECKPOINT_DEPLOYMENT = "host-on-checkpoint"
#: The run's parameters, rendered by the server from the event (its sandboxed Jinja).
PARAMETER_TEMPLATES = {
    "spec": "{{ event.resource['nimflow.spec'] | default('') }}",
    "revision": "{{ event.payload.revision | default('') }}",
    "checkpoint_uri": "{{ event.payload.uri | default('') }}",
}


def checkpoint_automation(deployment_id: UUID, *, enabled: bool = True) -> AutomationCore:
    """The checkpoint trigger as nimflow owns it, running the deployment ``deployment_id`` (host-on-checkpoint)."""
    return AutomationCore(
        name=CHECKPOINT_AUTOMATION_NAME,
        description=(f"Created by `nimflow bootstrap`: one {HOST_ON_CHECKPOINT_FLOW}/{HOST_ON_CHECKPOINT_DEPLOYMENT} "
                     f"run per {EVENT_NAME} event that names a spec. Updated in place by bootstrap; pausing it stops "
                     "checkpoint runs (the watcher's announcements then wait, see docs/fleet.md)."),
        enabled=enabled,
        trigger=EventTrigger(
            expect={EVENT_NAME},
            match=ResourceSpecification({"prefect.resource.id": "nimflow.source.*", "nimflow.spec": "?*"}),
            for_each={"prefect.resource.id"},
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[RunDeployment(source="selected", deployment_id=deployment_id, parameters=dict(PARAMETER_TEMPLATES))],
    )
