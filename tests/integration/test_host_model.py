"""The host_model flow end to end on the real local test bed.

Real Docker engine, real S3 server (moto), a real Hugging Face Hub endpoint, a real Prefect API;
the only stand-in is the NIM container (a locally built CPU image honouring the NIM contract).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import boto3
import httpx
import pytest
from nimflow.flows.host_model import host_model
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)

from nimflow.testbed.hub_server import publish
from nimflow.testbed.services import free_port
from nimflow.testbed.tiny_model import write_tiny_llama
from tests.conftest import ENGINE_BUCKET, write_spec

pytestmark = pytest.mark.testbed
#: How long flow_logs waits for a finished run's last log line to reach the API (a bound, not a measure).
LOGS_DEADLINE_S = 60
LOGS_PAGE = 200



def make_gemma_pp2_spec(tmp_path: Path, hub: Any, name: str, repo: str, image: str) -> dict:
    """A trtllm-build spec of a Gemma2 checkpoint (published to ``hub`` as ``repo``) with pp_size 2, which
    Gemma's converter cannot take; one GPU per rank, so only the family's limit is wrong."""
    source = write_tiny_llama(tmp_path / "src", seed=0)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "architectures": ["Gemma2ForCausalLM"]}))
    publish(hub.root, repo, source)
    spec = make_spec(tmp_path, name, repo, image, build="trtllm-build")
    spec["build"]["pp_size"] = 2
    spec["build"]["env"] = {"NIMSTANDIN_GPU_COUNT": "2"}
    return spec

def make_spec(
    tmp_path: Path, name: str, repo_id: str, image: str, *, build: str | None = "nim-optimize",
    deadline_seconds: float = 60, **deploy: Any
) -> dict[str, Any]:
    """A hosting spec for the test bed: unique name, port, cache dir and engine prefix."""
    spec: dict[str, Any] = {
        "name": name,
        "source": {"repo_id": repo_id, "revision": "main"},
        "deploy": {
            "image": image,
            "served_model_name": f"test/{name}",
            "host_port": free_port(),
            "cache_dir": str(tmp_path / "nim-cache"),
            "env": {"NIMSTANDIN_READY_DELAY": "0.5"},
            **deploy,
        },
        "verify": {"deadline_seconds": deadline_seconds},
    }
    if build:
        spec["build"] = {"backend": build, "image": image, "max_seq_len": 1024, "timeout_seconds": 120}
        if build != "nim-jit":  # NIM's JIT build takes no batch size or tokens per pass
            spec["build"].update(max_batch_size=4, max_num_tokens=1024)
        spec["cache"] = {"uri": f"s3://{ENGINE_BUCKET}/{name}"}
    return spec


def publish_tiny(hub: Any, repo_id: str, tmp_path: Path, seed: int = 0, **kwargs: Any) -> str:
    return publish(hub.root, repo_id, write_tiny_llama(tmp_path / f"src-{seed}", seed=seed), **kwargs)


def task_runs(flow_run_id: UUID) -> dict[str, Any]:
    """Task runs of a flow run by task name (Prefect API)."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run for run in runs}


def flow_logs(flow_run_id: UUID) -> str:
    """Every log message of a finished flow run, once the API holds its last one.

    Logs reach the API in batches; the engine's last line for a run is "Finished in state ...", so
    the wait ends when that line is there (not after a fixed sleep, which a loaded machine outlasts).
    """
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
    deadline = time.monotonic() + LOGS_DEADLINE_S
    while True:
        messages: list[str] = []
        with get_client(sync_client=True) as client:
            while page := client.read_logs(log_filter=log_filter, limit=LOGS_PAGE, offset=len(messages)):
                messages += [log.message for log in page]
                if len(page) < LOGS_PAGE:
                    break
        if any(m.startswith("Finished in state") for m in messages):
            return "\n".join(messages)
        if time.monotonic() > deadline:
            pytest.fail(f"flow run {flow_run_id}: its last log line never reached the API within "
                        f"{LOGS_DEADLINE_S}s ({len(messages)} lines there)")
        time.sleep(0.3)


def s3_keys(endpoint: str, prefix: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    return [o["Key"] for o in client.list_objects_v2(Bucket=ENGINE_BUCKET, Prefix=prefix).get("Contents", [])]


def test_full_flow_builds_once_and_serves(
    tmp_path: Path, testbed_env: dict, hub: Any, standin_image: str, unique: str, cleanup_containers: list, docker_client: Any
) -> None:
    name, repo = f"full-{unique}", f"org/tiny-{unique}"
    sha = publish_tiny(hub, repo, tmp_path)
    spec = make_spec(tmp_path, name, repo, standin_image)
    config = write_spec(tmp_path / "spec.yaml", spec)
    cleanup_containers.append(f"nimflow-{name}")

    state = host_model(spec=str(config), return_state=True)
    assert state.is_completed(), state.message
    record = state.result()

    # The endpoint is live and answers as the served model.
    assert record["revision_sha"] == sha
    assert record["engine_origin"] == "built" and record["uploaded_files"] > 0 and record["downloaded_files"] > 0
    models = httpx.get(f"{record['endpoint']}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [f"test/{name}"]
    assert "received" in record["completion"]
    container = docker_client.containers.get(record["container_id"])
    assert container.labels["nimflow.engine-key"] == record["engine_key"]
    assert container.labels["nimflow.deployment"] == name
    env = dict(item.split("=", 1) for item in container.attrs["Config"]["Env"])
    assert env["NIM_MODEL_NAME"] == f"/opt/nim/.cache/engines/{record['engine_key']}"
    assert env["NIM_SERVED_MODEL_NAME"] == f"test/{name}"

    # Engine in NIM's layout, published to S3 with the manifest; every file's sha256 recorded.
    engine_dir = Path(spec["deploy"]["cache_dir"]) / "engines" / record["engine_key"]
    assert (engine_dir / "trtllm_engine" / "rank0.engine").is_file() and (engine_dir / "tokenizer.json").is_file()
    keys = s3_keys(testbed_env["AWS_ENDPOINT_URL"], f"{name}/{record['engine_key']}/")
    assert f"{name}/{record['engine_key']}/manifest.json" in keys
    s3 = boto3.client("s3", endpoint_url=testbed_env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    manifest = json.loads(s3.get_object(Bucket=ENGINE_BUCKET, Key=f"{name}/{record['engine_key']}/manifest.json")["Body"].read())
    assert f"{name}/{record['engine_key']}/uploads/{manifest['upload_id']}/trtllm_engine/rank0.engine" in keys
    assert {f["path"] for f in manifest["files"]} >= {"trtllm_engine/rank0.engine", "trtllm_engine/config.json", "config.json"}
    # The manifest records what the key hashed and what was actually built.
    assert manifest["key_inputs"]["schema"] == "nimflow-engine-key/3" and manifest["key_inputs"]["gpu"]["name"]
    assert manifest["engine"]["max_num_tokens"] == 1024 and manifest["engine"]["max_batch_size"] == 4
    assert not [k for k in keys if k.endswith("lease.json")]  # released once published

    # Every stage ran as a task against the Prefect API, and the record became an artifact.
    runs = task_runs(state.state_details.flow_run_id)
    assert {"download-checkpoint", "compile-engine", "upload-engine", "deploy-nim", "verify-endpoint"} <= set(runs)
    assert all(run.state.is_completed() for run in runs.values())
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    assert any(record["endpoint"] in (a.data or "") for a in artifacts if a.type == "markdown")
    # Progress people can watch: one progress artifact per transfer stage and one for the build,
    # each ending at 100%, and the record's throughput per stage (the upload moved exactly the
    # manifest's bytes).
    # Keyed by the spec: nimflow-<stage>-<spec name>.
    progress = {a.key: a for a in artifacts if a.type == "progress"}
    assert {k: a.data for k, a in progress.items()} == {
        f"nimflow-download-{name}": 100.0, f"nimflow-build-{name}": 100.0, f"nimflow-upload-{name}": 100.0}, progress
    assert (progress[f"nimflow-build-{name}"].description or "").startswith(f"build engine {record['engine_key'][:12]}: done (100%)")
    assert f"build engine {record['engine_key'][:12]}: done (100%)" in flow_logs(state.state_details.flow_run_id)
    transfers = {t["stage"]: t for t in record["transfers"]}
    assert set(transfers) == {"download", "upload"}
    assert transfers["upload"]["bytes"] == sum(f["size"] for f in manifest["files"])
    assert transfers["upload"]["files"] == len(manifest["files"]) == record["uploaded_files"]
    assert transfers["download"]["bytes"] > 0 and transfers["download"]["files"] == record["downloaded_files"]
    assert all(t["mib_per_s"] > 0 for t in transfers.values())

    # Second run, nothing changed: nothing downloaded, built or uploaded; the container is kept.
    hub.clear_requests()
    again = host_model(spec=str(config))
    assert again["downloaded_files"] == 0 and again["uploaded_files"] == 0
    assert again["engine_origin"] == "local-cache" and again["engine_key"] == record["engine_key"]
    assert again["container_id"] == record["container_id"]
    assert again["transfers"] == []  # nothing moved
    assert not [r for r in hub.requests if "/resolve/" in r[1] and r[0] == "GET"]

    # Another host (empty cache dir) restores the engine from the store instead of compiling it.
    spec["deploy"]["cache_dir"] = str(tmp_path / "second-host-cache")
    other = host_model(spec=str(write_spec(tmp_path / "spec2.yaml", spec)))
    assert other["engine_origin"] == "engine-store" and other["engine_key"] == record["engine_key"]
    assert other["container_id"] != record["container_id"]  # a changed deploy spec replaces the container
    assert other["uploaded_files"] == 0
    moved = {t["stage"]: t for t in other["transfers"]}  # its own download of the checkpoint, and the restore
    assert set(moved) == {"download", "restore"}
    assert moved["restore"]["bytes"] == sum(f["size"] for f in manifest["files"])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_finetuned_weights_jit_build(
    tmp_path: Path, testbed_env: dict, hub: Any, standin_image: str, unique: str, cleanup_containers: list, where: str
) -> None:
    name, repo = f"ft-{where}-{unique}", f"org/base-{unique}"
    publish_tiny(hub, repo, tmp_path)
    finetuned = write_tiny_llama(tmp_path / "finetuned", seed=7)
    for side_file in ("tokenizer.json", "tokenizer_config.json"):
        (finetuned / side_file).unlink()  # taken from the base checkpoint
    spec = make_spec(tmp_path, name, repo, standin_image, build="nim-jit")
    spec["finetune"] = {"path": str(finetuned)}
    if where == "s3":
        s3 = boto3.client("s3", endpoint_url=testbed_env["AWS_ENDPOINT_URL"], region_name="us-east-1")
        for path in finetuned.iterdir():
            s3.upload_file(str(path), ENGINE_BUCKET, f"finetunes/{name}/{path.name}")
        spec["finetune"] = {"path": f"s3://{ENGINE_BUCKET}/finetunes/{name}"}
    cleanup_containers.append(f"nimflow-{name}")

    record = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)))

    engine_dir = Path(record["model_path"])
    assert record["engine_origin"] == "built"
    assert (engine_dir / "local_manifest.yaml").is_file()  # harvested from NIM's local_cache
    assert (engine_dir / "trtllm_engine" / "rank0.engine").is_file()
    assert (engine_dir / "tokenizer.json").is_file()
    assert "received" in record["completion"]


def test_served_without_engine(
    tmp_path: Path, testbed_env: dict, hub: Any, standin_image: str, unique: str, cleanup_containers: list
) -> None:
    name, repo = f"hf-{unique}", f"org/hf-{unique}"
    sha = publish_tiny(hub, repo, tmp_path)
    spec = make_spec(tmp_path, name, repo, standin_image, build=None)
    cleanup_containers.append(f"nimflow-{name}")

    record = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)))

    assert record["engine_key"] is None
    assert record["model_path"].endswith(f"models/{repo.replace('/', '--')}/{sha}")
    assert "received" in record["completion"]
