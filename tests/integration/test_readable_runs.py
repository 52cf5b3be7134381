"""Readable runs (issue 15, item 8), read back from the test bed's real Prefect API and server log.

Run names say which model and revision (or which host) a run is for; progress artifacts are keyed by
the spec and the reconcile report by the host; a promoted rollout emits ``nimflow.endpoint.promoted``;
creating a spec's concurrency limit leaves no ERROR in the server's log.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from nimflow.flows.host_model import host_model
from nimflow.flows.reconcile import reconcile, report_key
from nimflow.flows.watch_checkpoints import watch_checkpoints
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from nimflow.endpoint_events import PROMOTED_EVENT
from nimflow.run_names import key_part
from nimflow.settings import get_settings
from nimflow.spec_concurrency import ensure_spec_limit, spec_limit_name
from tests.conftest import write_spec
from tests.integration.test_host_model import make_spec, publish_tiny

pytestmark = pytest.mark.testbed
SHA = "706dadd1f0c3b8e2a4d5c6b7a8f9e0d1c2b3a4f5"
#: How long an emitted event may take to be stored and readable through the API (a bound, not a measure).
EVENT_DEADLINE_S = 60


def _run_name(flow_run_id: UUID) -> str:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).name


def _artifact_keys(flow_run_id: UUID) -> dict[str, str]:
    """Keys of a run's artifacts, with their types."""
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: str(a.type) for a in artifacts if a.key}


def _events(api_url: str, name: str, resource_id: str) -> list[dict[str, Any]]:
    """Events of ``name`` about ``resource_id`` that the API has stored, waiting for the first one.

    Emitting is asynchronous (Prefect's events worker), and the server stores events in the background:
    the test polls for what must arrive, with a generous bound.
    """
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=30)
    body = {"filter": {"event": {"name": [name]}, "resource": {"id": [resource_id]}}, "limit": 50}
    deadline = time.monotonic() + EVENT_DEADLINE_S
    while True:
        found = httpx.post(f"{api_url}/events/filter", json=body, timeout=30).raise_for_status().json()["events"]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_runs_are_named_after_their_spec_and_revision_or_host(
    tmp_path: Path, testbed_env: dict, monkeypatch: pytest.MonkeyPatch, unique: str
) -> None:
    """Failed on old main: the runs were named by Prefect at random (``evasive-silkworm``)."""
    monkeypatch.setenv("NIMFLOW_SPECS_DIR", str(tmp_path))  # an empty specs directory: nothing to load or watch
    monkeypatch.setenv("NIMFLOW_HOST_NAME", f"GPU-Host_{unique}")

    # The run fails at once (no such spec), but it was named first, from its parameters.
    state = host_model(spec=f"nosuch-{unique}", revision=SHA, return_state=True)
    assert state.is_failed()
    assert _run_name(state.state_details.flow_run_id) == f"nosuch-{unique}@706dadd"

    watched = watch_checkpoints(return_state=True)
    assert watched.is_completed(), watched.message
    assert _run_name(watched.state_details.flow_run_id) == f"watch-checkpoints-gpu-host-{unique}"


def test_the_spec_limit_is_created_without_an_error_in_the_server_log(
    testbed_env: dict, session_dir: Path, unique: str
) -> None:
    """Failed on old main: each run's create met the existing limit, and the server logged it as an ERROR
    (a traceback ending in sqlalchemy's ``IntegrityError``)."""
    log = session_dir / "logs" / "prefect.log"
    before = log.stat().st_size
    name = f"limit-{unique}"
    assert ensure_spec_limit(name) == spec_limit_name(name)  # the spec's first run: created
    assert ensure_spec_limit(name) == spec_limit_name(name)  # every later run: found
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(spec_limit_name(name)).limit == 1
    with log.open("rb") as handle:
        handle.seek(before)
        written = handle.read().decode(errors="replace")
    assert [line for line in written.splitlines() if "ERROR" in line or "IntegrityError" in line] == [], written[-3000:]


def test_a_promoted_rollout_emits_an_event_and_keys_its_artifacts_by_spec(
    tmp_path: Path, testbed_env: dict, prefect_api: str, monkeypatch: pytest.MonkeyPatch, hub: Any, standin_image: str,
    unique: str, cleanup_containers: list,
) -> None:
    """Failed on old main (its flows and modules checked out under this test): the run had a random name
    (``crazy-mackerel``); with that assertion skipped, the progress artifacts were keyed ``nimflow-download`` /
    ``nimflow-build`` / ``nimflow-upload`` as for every model, and no ``nimflow.endpoint.promoted`` event
    reached the API within the 60 s bound."""
    name, repo = f"promo-{unique}", f"org/tiny-{unique}"
    sha = publish_tiny(hub, repo, tmp_path)
    specs = tmp_path / "specs"
    specs.mkdir()
    write_spec(specs / "promo.yaml", make_spec(tmp_path, name, repo, standin_image))
    monkeypatch.setenv("NIMFLOW_SPECS_DIR", str(specs))
    cleanup_containers.append(f"nimflow-{name}")

    state = host_model(spec=name, revision=sha, return_state=True)
    assert state.is_completed(), state.message
    record = state.result()
    run_id = state.state_details.flow_run_id

    assert _run_name(run_id) == f"{name}@{sha[:7]}"
    keys = _artifact_keys(run_id)
    assert {f"nimflow-{stage}-{name}": "progress" for stage in ("download", "build", "upload")}.items() <= keys.items(), keys
    assert keys[f"host-model-{name}"] == "markdown"

    (event,) = _events(prefect_api, PROMOTED_EVENT, f"nimflow.deployment.{name}")
    assert event["resource"]["nimflow.spec"] == name and event["resource"]["prefect.resource.name"] == name
    payload = event["payload"]
    assert (payload["endpoint"], payload["served_model_name"]) == (record["endpoint"], f"test/{name}")
    assert (payload["revision"], payload["engine_key"]) == (sha, record["engine_key"])
    # The run that promoted it is related, so an automation can link back to it.
    assert str(run_id) in {r["prefect.resource.id"].rsplit(".", 1)[-1] for r in event["related"]}
    assert not any(word in str(event).lower() for word in ("secret", "token", "password", "aws_"))


def test_a_reconcile_run_is_named_and_reports_per_host(testbed_env: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                        docker_client: Any, unique: str) -> None:
    """Failed on old main: a random run name (``musical-dugong``); its report was keyed ``nimflow-reconcile``
    on every host."""
    monkeypatch.setenv("NIMFLOW_SPECS_DIR", str(tmp_path))
    monkeypatch.setenv("NIMFLOW_HOST_NAME", f"rack7.gpu{unique}")
    state = reconcile(heal=False, return_state=True)
    assert state.is_completed(), state.message
    run_id = state.state_details.flow_run_id
    assert _run_name(run_id) == f"reconcile-rack7-gpu{unique}"
    assert report_key(get_settings().host_name) == f"nimflow-reconcile-{key_part(f'rack7.gpu{unique}')}"
    assert _artifact_keys(run_id) == {f"nimflow-reconcile-rack7-gpu{unique}": "table"}
