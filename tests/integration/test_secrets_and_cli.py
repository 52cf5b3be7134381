"""Secrets never leak, and the `nimflow` command reports user mistakes without tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest
from nimflow.flows.host_model import host_model
from nimflow.tasks.download import resolve_revision
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from nimflow.errors import CheckpointNotFound
from nimflow.testbed.hub_server import publish
from nimflow.testbed.tiny_model import write_tiny_llama
from tests.conftest import ENGINE_BUCKET, write_spec
from tests.integration.test_host_model import flow_logs, make_spec

pytestmark = pytest.mark.testbed


def test_secrets_never_reach_logs_artifacts_parameters_or_the_store(
    tmp_path: Path,
    testbed_env: dict,
    hub: Any,
    standin_image: str,
    unique: str,
    cleanup_containers: list,
    docker_client: Any,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    secrets = {
        "HF_TOKEN": f"hf_SECRET{unique}hf",
        "NGC_API_KEY": f"nvapi-SECRET{unique}ngc",
        "AWS_SECRET_ACCESS_KEY": f"SECRET{unique}aws",  # moto accepts any key
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    repo, name = f"org/private-{unique}", f"secret-{unique}"
    # A private repo: the download only works if HF_TOKEN is really sent.
    publish(hub.root, repo, write_tiny_llama(tmp_path / "src"), token=secrets["HF_TOKEN"])
    spec = make_spec(tmp_path, name, repo, standin_image)
    cleanup_containers.append(f"nimflow-{name}")

    state = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)), return_state=True)
    assert state.is_completed(), state.message
    record = state.result()
    flow_run_id = state.state_details.flow_run_id

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    s3 = boto3.client("s3", endpoint_url=testbed_env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    manifest_key = f"{name}/{record['engine_key']}/manifest.json"
    places = {
        "prefect logs": flow_logs(flow_run_id),
        "flow run parameters": json.dumps(flow_run.parameters),
        "artifacts": "\n".join(str(a.data) for a in artifacts),
        "flow result": json.dumps(record),
        "engine manifest": s3.get_object(Bucket=ENGINE_BUCKET, Key=manifest_key)["Body"].read().decode(),
        "container labels": json.dumps(docker_client.containers.get(record["container_id"]).labels),
        "container logs": docker_client.containers.get(record["container_id"]).logs().decode(),
        "console": "".join(capfd.readouterr()),
    }
    assert places["prefect logs"] and places["artifacts"]  # there is something to search
    for where, text in places.items():
        for secret_name, value in secrets.items():
            assert value not in text, f"{secret_name} leaked into {where}"

    # The NIM serves an engine built on this host: it downloads nothing, so it gets neither secret
    # (only a NIM that fetches its model, guide §1, does: nimflow.rollout.SERVING_SECRETS).
    env = docker_client.containers.get(record["container_id"]).attrs["Config"]["Env"]
    assert not [entry for entry in env if entry.startswith(("NGC_API_KEY=", "HF_TOKEN="))]


def test_private_repo_is_refused_without_token(tmp_path: Path, testbed_env: dict, hub: Any, unique: str) -> None:
    repo = f"org/private-{unique}"
    publish(hub.root, repo, write_tiny_llama(tmp_path / "src"), token="hf_the_right_token")
    with pytest.raises(CheckpointNotFound, match="HF_TOKEN"):
        resolve_revision(repo, "main")


def _nimflow(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).with_name("nimflow")), *args]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=180)


def test_validate_broken_config_exits_2_with_field_paths(tmp_path: Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text(
        "name: Demo\nsource: {repo_id: meta-llama/Llama-3.2-1B, revison: main}\n"
        "build: {backend: trtllm, image: x, tp_size: 0}\n"
        "deploy: {image: nim, served_model_name: m, cache_dir: /tmp/c, host_port: 99999}\n"
    )
    result = _nimflow("validate", str(config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    for path in ("name", "source.revison", "build.backend", "build.tp_size", "deploy.host_port"):
        assert any(line.startswith(f"{config}: {path}: ") for line in lines), (path, lines)
    assert "Traceback" not in result.stderr + result.stdout

    assert _nimflow("validate", "configs/demo.yaml").returncode == 0


def test_host_with_broken_config_exits_2_without_traceback(tmp_path: Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("name: ok-name\nsource: {repo_id: a/b}\ndeploy: {image: nim}\n")
    result = _nimflow("host", str(config))
    assert result.returncode == 2
    assert f"{config}: deploy.served_model_name: required field is missing" in result.stderr
    assert "Traceback" not in result.stderr


def test_host_unknown_repo_fails_with_clear_message(
    tmp_path: Path, testbed_env: dict, prefect_api: str, standin_image: str, unique: str
) -> None:
    spec = make_spec(tmp_path, f"missing-{unique}", f"org/does-not-exist-{unique}", standin_image)
    config = write_spec(tmp_path / "spec.yaml", spec)
    result = _nimflow("host", str(config), env={**testbed_env, "PREFECT_API_URL": prefect_api})
    assert result.returncode == 1
    assert "CheckpointNotFound" in result.stderr and f"org/does-not-exist-{unique}" in result.stderr
    assert "check source.repo_id" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
