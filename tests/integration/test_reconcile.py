"""The reconcile flow against real containers: a killed backend is healed from its spec, a deployment
whose spec is gone is reported and left alone, and the table artifact says so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from nimflow.flows.host_model import host_model
from nimflow.flows.reconcile import reconcile, report_key
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from nimflow.settings import get_settings
from tests.conftest import write_spec
from tests.integration.test_host_model import make_spec, publish_tiny

pytestmark = pytest.mark.testbed


def _host(spec_path: Path) -> dict[str, Any]:
    state = host_model(spec=str(spec_path), return_state=True)
    assert state.is_completed(), state.message
    return state.result()


def _table(flow_run_id: Any) -> dict[str, dict[str, str]]:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    (artifact,) = [a for a in artifacts if a.key == report_key(get_settings().host_name)]
    assert artifact.type == "table"
    rows = artifact.data if isinstance(artifact.data, list) else json.loads(artifact.data)
    return {row["name"]: row for row in rows}


def test_reconcile_heals_a_killed_backend_and_leaves_a_specless_deployment_alone(
    tmp_path: Path, testbed_env: dict, monkeypatch: pytest.MonkeyPatch, hub: Any, standin_image: str, unique: str,
    cleanup_containers: list, docker_client: Any,
) -> None:
    specs_dir, elsewhere = tmp_path / "specs", tmp_path / "elsewhere"
    specs_dir.mkdir()
    elsewhere.mkdir()
    monkeypatch.setenv("NIMFLOW_SPECS_DIR", str(specs_dir))
    healed, gone = f"heal-{unique}", f"gone-{unique}"
    cleanup_containers.extend([f"nimflow-{healed}", f"nimflow-{gone}"])
    records = {}
    for name, folder in ((healed, specs_dir), (gone, elsewhere)):
        repo = f"org/{name}"
        publish_tiny(hub, repo, tmp_path / name)
        spec = write_spec(folder / f"{name}.yaml", make_spec(tmp_path / name, name, repo, standin_image, build=None))
        records[name] = _host(spec)

    # Both backends die (an OOM kill, a crashed driver); their front proxies still run.
    for record in records.values():
        docker_client.containers.get(record["container_id"]).kill()
    assert httpx.get(f"{records[healed]['endpoint']}/v1/health/ready", timeout=5).status_code != 200

    state = reconcile(return_state=True)
    assert state.is_completed(), state.message
    table = _table(state.state_details.flow_run_id)

    # Healed: a new rollout from the spec; the stable endpoint serves the model again.
    row = table[healed]
    assert row["state"].startswith("unhealthy:") and row["action"] == "heal", row
    assert row["result"].startswith("healed:"), row
    models = httpx.get(f"{records[healed]['endpoint']}/v1/models", timeout=5).json()
    assert [m["id"] for m in models["data"]] == [f"test/{healed}"]

    # No spec by that name: reported, not touched (the killed container is still there, still exited).
    row = table[gone]
    assert row["state"].startswith("unhealthy:") and row["action"] == "report", row
    assert f"no spec named {gone!r}" in row["result"]
    assert docker_client.containers.get(records[gone]["container_id"]).status == "exited"

    # A second pass finds the healed deployment healthy and does nothing to it.
    again = reconcile(return_state=True)
    assert again.is_completed(), again.message
    assert _table(again.state_details.flow_run_id)[healed] == {"name": healed, "state": "healthy", "action": "none", "result": "-"}
