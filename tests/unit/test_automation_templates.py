"""The automation templates in docs/automations/ are automations Prefect accepts, for the events nimflow emits."""

from __future__ import annotations

from pathlib import Path

import yaml
from prefect.automations import AutomationCore

from nimflow.endpoint_events import PROMOTED_EVENT

TEMPLATES = Path(__file__).resolve().parents[2] / "docs" / "automations"


def test_the_notification_templates_validate_as_prefect_automations() -> None:
    data = yaml.safe_load((TEMPLATES / "notifications.yaml").read_text())
    automations = {a["name"]: AutomationCore.model_validate(a) for a in data["automations"]}
    assert set(automations) == {"nimflow-run-failed", "nimflow-endpoint-promoted"}
    failed = automations["nimflow-run-failed"].trigger
    assert {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"} <= set(failed.expect)  # type: ignore[union-attr]
    promoted = automations["nimflow-endpoint-promoted"].trigger
    assert set(promoted.expect) == {PROMOTED_EVENT}  # type: ignore[union-attr]
    assert all(action.type == "send-notification" for a in automations.values() for action in a.actions)
