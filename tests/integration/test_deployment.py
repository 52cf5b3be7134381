"""prefect.yaml deploys, and a process worker runs host_model from the deployment (the UI's path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client

from tests.conftest import write_spec
from tests.integration.test_host_model import make_spec, publish_tiny

pytestmark = pytest.mark.testbed
REPO_ROOT = Path(__file__).resolve().parents[2]


def _prefect(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).with_name("prefect")), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout)
    assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_deployment_runs_on_a_process_worker(
    tmp_path: Path, testbed_env: dict, prefect_api: str, hub: Any, standin_image: str, unique: str, cleanup_containers: list
) -> None:
    name, repo = f"deployed-{unique}", f"org/deployed-{unique}"
    publish_tiny(hub, repo, tmp_path)
    specs_dir = tmp_path / "specs"
    specs_dir.mkdir()
    write_spec(specs_dir / "spec.yaml", make_spec(tmp_path, name, repo, standin_image))
    cleanup_containers.append(f"nimflow-{name}")
    # The deploying process and the worker's runs find specs by name in this directory.
    env = {**os.environ, **testbed_env, "PREFECT_API_URL": prefect_api, "PREFECT_WORKER_QUERY_SECONDS": "1", "COLUMNS": "200",
           "NIMFLOW_SPECS_DIR": str(specs_dir)}
    env.pop("NIMFLOW_HOME", None)  # the deploying process's checkout must not matter

    _prefect("work-pool", "create", "nimflow-gpu", "--type", "process", "--overwrite", env=env)
    _prefect("--no-prompt", "deploy", "--all", env=env)
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("host_model/host-model")
    schema = deployment.parameter_openapi_schema
    # No path of the deploying checkout is stored: the worker's NIMFLOW_HOME names its own. Failed on
    # old main: pull_steps was [{"prefect.deployments.steps.set_working_directory": {"directory": "<REPO_ROOT>"}}].
    assert deployment.pull_steps == [{"nimflow.worker_checkout.enter_checkout": {}}]
    assert str(REPO_ROOT) not in deployment.model_dump_json()
    # The UI's dropdown: the names in the specs directory when `prefect deploy` ran.
    assert schema["properties"]["spec"]["enum"] == [name]
    assert schema["properties"]["spec"]["title"] == "Model"
    # Plain fields with defaults (no "None" toggle in the form): an empty revision is the spec's.
    assert {k: schema["properties"]["revision"][k] for k in ("type", "default")} == {"type": "string", "default": ""}
    run = _prefect("deployment", "run", "host_model/host-model", "--param", f"spec={name}", env=env)
    flow_run_id = next(line.split()[-1] for line in run.stdout.splitlines() if "UUID" in line)
    # The worker, started elsewhere, runs the flows from the checkout its NIMFLOW_HOME names.
    worker_env = {**env, "NIMFLOW_HOME": str(REPO_ROOT)}
    result = subprocess.run([str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", "nimflow-gpu", "--run-once"],
                            capture_output=True, text=True, env=worker_env, cwd=tmp_path, timeout=240)
    assert result.returncode == 0, f"worker failed:\n{result.stdout}\n{result.stderr}"

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
    assert flow_run.state is not None and flow_run.state.is_completed(), flow_run.state
    assert flow_run.parameters["spec"] == name
    # Listed under its readable name (the spec's: the run gave no revision), not a random one.
    assert flow_run.name == name
