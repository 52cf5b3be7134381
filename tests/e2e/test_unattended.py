"""Issue 7 acceptance: the pipeline runs unattended (prefect.md §7 E2E).

A checkpoint lands → the watcher announces it once → the trigger hosts it; events without a revision;
two events for one spec at once; schedules and the reconcile run; runs created through the API as the
UI creates them. Real server, real workers, real flows; assertions read the Prefect API, Docker and S3.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

import boto3
import httpx
import pytest

from tests.conftest import ENGINE_BUCKET
from tests.e2e.conftest import E2E, RUN_DEADLINE, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.testbed]

LANDED = "nimflow.checkpoint.landed"
ON_DEMAND, ON_CHECKPOINT, RECONCILE, WATCHER = "host-model", "host-on-checkpoint", "reconcile", "checkpoint-watcher"


def _alpha(e2e: E2E) -> str:
    return sorted(e2e.specs)[0]  # watched (watch.branches: [main])


def _beta(e2e: E2E) -> str:
    return sorted(e2e.specs)[1]  # not watched: only events sent here start its runs


def _create_run(e2e: E2E, deployment: str, parameters: dict[str, Any] | None = None) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.create_flow_run_from_deployment(e2e.deployment(deployment).id, parameters=parameters or {})


def _cancelled_by_its_limit(run: Any) -> bool:
    """Cancelled by the deployment's concurrency limit (reconcile, the watcher: one run at a time, cancel new)."""
    return run.state.is_cancelled() and "concurrency limit" in (run.state.message or "")


def _run_to_completion(e2e: E2E, deployment: str, parameters: dict[str, Any] | None = None) -> Any:
    """Run the deployment once; where its scheduled run is running, the new one is cancelled: wait, try again."""
    for _ in range(5):
        run = e2e.wait_final(_create_run(e2e, deployment, parameters).id)
        if not _cancelled_by_its_limit(run):
            break
        wait_for(f"no run of {deployment} running", lambda: not [
            r for r in e2e.flow_runs(deployment) if r.state is not None and (r.state.is_running() or r.state.is_pending())])
    assert run.state.is_completed(), f"{deployment}: {run.state}\n{e2e.flow_logs(run.id)[-3000:]}\n{e2e.worker_logs()}"
    return run


def _landed(e2e: E2E, spec: str, since: datetime | None = None) -> list[dict[str, Any]]:
    return [e for e in e2e.events(LANDED, since) if e["payload"].get("spec") == spec]


def _serving(e2e: E2E, spec: str) -> list[Any]:
    return e2e.docker.containers.list(filters={"label": [f"nimflow.deployment={spec}", "nimflow.role=serve"]})


def _answers(endpoint: str, spec: str) -> bool:
    try:
        response = httpx.get(f"{endpoint}/v1/models", timeout=5)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and [m["id"] for m in response.json()["data"]] == [f"test/{spec}"]


def _no_failed_automation_actions(e2e: E2E, since: datetime) -> None:
    """No automation action failed since ``since`` (this test's start: the redeploy test's burst, earlier
    in the package, may leave failed actions of its own, which it re-announces)."""
    failed = e2e.events("prefect.automation.action.failed", since)
    assert failed == [], f"automation actions failed: {[(e['resource'], e['payload']) for e in failed]}"


def _source_resource(e2e: E2E, spec: str) -> dict[str, str]:
    repo = e2e.specs[spec]["source"]["repo_id"]
    return {"prefect.resource.id": f"nimflow.source.hf.{repo}", "prefect.resource.name": repo, "nimflow.spec": spec}


def _checkpoint_runs(e2e: E2E, spec: str, count: int, **parameters: Any) -> list[Any]:
    """Wait for ``count`` trigger-created runs for the spec (with these parameters) to finish."""
    def matching() -> list[Any]:
        return [r for r in e2e.flow_runs(ON_CHECKPOINT) if r.parameters.get("spec") == spec
                and all(r.parameters.get(k) == v for k, v in parameters.items())]

    runs = wait_for(f"{count} {ON_CHECKPOINT} run(s) for {spec} {parameters}", lambda: len(matching()) >= count and matching())
    finals = [e2e.wait_final(run.id) for run in runs]
    assert len(finals) == count, [(r.name, r.parameters) for r in finals]
    return finals


def test_new_commit_is_announced_once_and_hosted(e2e: E2E) -> None:
    spec = _alpha(e2e)
    _run_to_completion(e2e, WATCHER)  # the baseline (a scheduled pass may have recorded it already)
    before = datetime.now(timezone.utc)
    sha = e2e.publish(spec)

    _run_to_completion(e2e, WATCHER)
    # The server's event persister writes events in batches: generous on a loaded machine.
    landed = wait_for(f"{LANDED} for {spec}", lambda: _landed(e2e, spec, before), timeout=90)
    assert len(landed) == 1, landed
    assert landed[0]["payload"]["revision"] == sha
    assert landed[0]["resource"]["prefect.resource.id"] == f"nimflow.source.hf.{e2e.specs[spec]['source']['repo_id']}"
    assert landed[0]["resource"].get("nimflow.spec") == spec

    (run,) = _checkpoint_runs(e2e, spec, 1, revision=sha)
    assert run.state.is_completed(), f"{run.state}\n{e2e.flow_logs(run.id)[-3000:]}"
    record = e2e.record(run.id)
    assert record["revision sha"] == sha
    assert _answers(record["endpoint"], spec)
    assert [sha in c.labels.get("nimflow.weights", "") for c in _serving(e2e, spec)] == [True]

    # A second pass sees nothing new: no event, so no run.
    _run_to_completion(e2e, WATCHER)
    assert len(_landed(e2e, spec, before)) == 1
    assert len([r for r in e2e.flow_runs(ON_CHECKPOINT) if r.parameters.get("revision") == sha]) == 1


def test_event_without_revision_hosts_the_default(e2e: E2E) -> None:
    """Also: events that name no spec (no `nimflow.spec` label, or an empty one) start nothing, not even a
    failed automation action. On old main the trigger fired for them with spec='' (the server's matcher
    covers them: tests/unit/test_prefect_yaml.py::test_the_checkpoint_trigger_matches_only_events_that_name_a_spec
    fails there), which ends as a run with spec '' or, the schema being enforced, as
    `prefect.automation.action.failed`; both are asserted absent below. Not rerun end to end on old main."""
    started = datetime.now(timezone.utc)
    spec = _beta(e2e)
    unlabeled = {k: v for k, v in _source_resource(e2e, spec).items() if k != "nimflow.spec"}
    e2e.emit(LANDED, unlabeled, {"spec": spec})
    e2e.emit(LANDED, {**unlabeled, "nimflow.spec": ""}, {"spec": spec})
    # Sent after those: once its run exists, the triggers service has seen the two above.
    e2e.emit(LANDED, _source_resource(e2e, spec), {"spec": spec})  # no revision: the spec's (main)

    (run,) = _checkpoint_runs(e2e, spec, 1)
    assert run.state.is_completed(), f"{run.state}\n{e2e.flow_logs(run.id)[-3000:]}\n{e2e.worker_logs()}"
    assert run.parameters.get("revision") in ("", "main"), run.parameters  # the trigger renders a missing field as ""
    record = e2e.record(run.id)
    main_sha = e2e.hub_sha(spec)
    assert record["revision sha"] == main_sha
    assert _answers(record["endpoint"], spec)
    assert not [r for r in e2e.flow_runs(ON_CHECKPOINT) if not r.parameters.get("spec")]
    _no_failed_automation_actions(e2e, started)


def test_two_events_for_one_spec_queue_and_build_once(e2e: E2E) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    started = datetime.now(timezone.utc)
    spec = _beta(e2e)
    sha = e2e.publish(spec)
    # Two announcements of the same checkpoint from two senders (distinct event ids), in one request.
    resource, payload = _source_resource(e2e, spec), {"spec": spec, "revision": sha}
    now = datetime.now(timezone.utc).isoformat()
    body = [{"id": str(uuid.uuid4()), "occurred": now, "event": LANDED, "resource": resource, "payload": payload} for _ in range(2)]
    assert httpx.post(f"{e2e.api_url}/events", json=body, timeout=30).status_code < 300

    runs = _checkpoint_runs(e2e, spec, 2, revision=sha)
    for run in runs:
        assert run.state.is_completed(), f"{run.state}\n{e2e.flow_logs(run.id)[-3000:]}\n{e2e.worker_logs()}"
    records = [e2e.record(run.id) for run in runs]
    assert {r["revision sha"] for r in records} == {sha}
    assert len({r["engine key"] for r in records}) == 1
    origins = sorted(r["engine_origin"] for r in records)
    assert origins.count("built") == 1 and set(origins) - {"built"} <= {"local-cache", "engine-store"}, origins

    # One build: the store holds one manifest and one upload for the key.
    key = records[0]["engine key"]
    s3 = boto3.client("s3", endpoint_url=e2e.s3_url, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=ENGINE_BUCKET, Prefix=f"{spec}/{key}/").get("Contents", [])]
    assert [k for k in keys if k.endswith("manifest.json")] == [f"{spec}/{key}/manifest.json"]
    assert len({k.split("/uploads/")[1].split("/")[0] for k in keys if "/uploads/" in k}) == 1

    # Queued: the work (task runs) of one run ends before the other's begins.
    with get_client(sync_client=True) as client:
        spans = []
        for run in runs:
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
            assert tasks, f"flow run {run.name} ran no tasks"
            spans.append((min(t.start_time for t in tasks), max(t.end_time for t in tasks)))
    first, second = sorted(spans)
    assert first[1] <= second[0], f"the runs' work overlapped: {spans}"

    assert _answers(records[0]["endpoint"], spec)
    assert [sha in c.labels.get("nimflow.weights", "") for c in _serving(e2e, spec)] == [True]
    _no_failed_automation_actions(e2e, started)


def test_api_run_with_the_ui_parameters_and_the_schema(e2e: E2E) -> None:
    from prefect.client.orchestration import get_client

    spec = _alpha(e2e)
    schema = e2e.deployment(ON_DEMAND).parameter_openapi_schema
    properties = schema["properties"]
    assert {"spec", "revision", "checkpoint_uri", "overrides"} <= set(properties), properties
    assert properties["spec"]["title"] == "Model"
    assert sorted(properties["spec"]["enum"]) == sorted(e2e.specs)
    assert properties["revision"]["title"] == "Revision"
    assert "spec" in schema.get("required", [])
    overrides = schema["definitions"]["Overrides"]["properties"]
    assert {"rollout_strategy", "verify_deadline_seconds", "force"} <= set(overrides)
    assert all(field.get("title") for field in overrides.values())

    sha = e2e.hub_sha(spec)
    parameters = {"spec": spec, "revision": sha,
                  "overrides": {"rollout_strategy": "blue-green", "verify_deadline_seconds": 120, "force": False}}
    run = _run_to_completion(e2e, ON_DEMAND, parameters)
    assert run.parameters["overrides"]["verify_deadline_seconds"] == 120
    record = e2e.record(run.id)
    assert record["revision sha"] == sha and _answers(record["endpoint"], spec)

    # A spec name outside the enum is refused by the server: no run is created.
    deployment = e2e.deployment(ON_DEMAND)
    with get_client(sync_client=True) as client, pytest.raises(httpx.HTTPStatusError) as refused:
        client.create_flow_run_from_deployment(deployment.id, parameters={"spec": "no-such-spec"})
    assert refused.value.response.status_code in (409, 422), refused.value.response.text
    assert "no-such-spec" in refused.value.response.text or "spec" in refused.value.response.text
    assert not [r for r in e2e.flow_runs(ON_DEMAND) if r.parameters.get("spec") == "no-such-spec"]


def test_schedules_create_runs_and_reconcile_heals(e2e: E2E) -> None:
    for name in (RECONCILE, WATCHER):
        deployment = e2e.deployment(name)
        assert [s for s in deployment.schedules if s.active], f"{name} has no active schedule"
        wait_for(f"a scheduled run of {name}", lambda name=name: [r for r in e2e.flow_runs(name) if r.auto_scheduled], timeout=60)

    spec = _alpha(e2e)
    endpoint = f"http://127.0.0.1:{e2e.specs[spec]['deploy']['host_port']}"
    assert _answers(endpoint, spec)
    (backend,) = _serving(e2e, spec)
    backend.kill()
    wait_for(f"{endpoint} to stop answering once its backend is killed", lambda: not _answers(endpoint, spec), timeout=60)
    _run_to_completion(e2e, RECONCILE)
    wait_for(f"{endpoint} to answer again after reconcile", lambda: _answers(endpoint, spec), timeout=RUN_DEADLINE)
    assert [c.status for c in _serving(e2e, spec)] == ["running"]
