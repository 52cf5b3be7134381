"""Faults on the real test bed: transient ones retried to success, permanent ones failing at once.

Faults are injected by a reverse proxy in front of the real S3 and hub servers, so the clients
(huggingface_hub, boto3) see genuine 503 answers on the wire.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from nimflow.flows.host_model import host_model
from nimflow.tasks.download import download_checkpoint
from nimflow.tasks.upload import upload_engine
from prefect import flow

from nimflow.engine_store import read_local_manifest, write_manifest
from nimflow.errors import EngineStoreError
from nimflow.records import Engine
from nimflow.spec import CacheSpec, SourceSpec
from nimflow.testbed.fault_proxy import FaultProxy, hub_error, s3_error
from nimflow.testbed.services import Service
from nimflow.testbed.tiny_model import write_tiny_llama
from tests.conftest import ENGINE_BUCKET, write_spec
from tests.integration.test_host_model import make_spec, publish_tiny, task_runs

pytestmark = pytest.mark.testbed


@flow(name="test-download")
def download_flow(source: SourceSpec, cache_dir: str) -> Any:
    return download_checkpoint(source, cache_dir)


@flow(name="test-upload")
def upload_flow(engine: Engine, cache: CacheSpec) -> Any:
    return upload_engine(engine, cache)


@pytest.fixture
def hub_proxy(hub: Any, testbed_env: dict, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    proxy = FaultProxy(hub.url)
    proxy.start()
    monkeypatch.setenv("HF_ENDPOINT", proxy.url)
    yield proxy
    proxy.stop()



def test_hub_get_503_is_retried_to_success(tmp_path: Path, hub: Any, hub_proxy: FaultProxy, unique: str) -> None:
    repo = f"org/flaky-{unique}"
    publish_tiny(hub, repo, tmp_path)
    status, body, headers = hub_error(503)
    hub_proxy.add_fault(method="GET", path_pattern=r"/resolve/.*config\.json", status=status, body=body, headers=headers)

    state = download_flow(SourceSpec(repo_id=repo), str(tmp_path / "cache"), return_state=True)

    assert state.is_completed(), state.message
    checkpoint = state.result()
    assert (Path(checkpoint.path) / "config.json").is_file()
    injected = [r for r in hub_proxy.requests if r[3]]
    assert len(injected) == 1 and injected[0][2] == 503
    served_after = [r for r in hub_proxy.requests if r[1] == injected[0][1] and not r[3] and r[0] == "GET"]
    assert served_after and served_after[-1][2] == 200
    assert task_runs(state.state_details.flow_run_id)["download-checkpoint"].run_count == 2


def _engine_dir(root: Path, key: str) -> Engine:
    engine = root / key
    (engine / "trtllm_engine").mkdir(parents=True)
    (engine / "trtllm_engine" / "rank0.engine").write_bytes(b"engine-bytes" * 1000)
    (engine / "trtllm_engine" / "config.json").write_text("{}")
    (engine / "config.json").write_text('{"model_type": "llama"}')
    manifest = write_manifest(engine, key, {"test": True}, {"tp_size": 1})
    return Engine(engine_key=key, path=str(engine), origin="built", files=len(manifest["files"]), bytes=1)


@pytest.mark.parametrize(("failures", "task_attempts"), [(1, 1), (4, 2)])
def test_s3_put_503_is_retried_to_success(
    tmp_path: Path, s3_proxy: FaultProxy, unique: str, failures: int, task_attempts: int
) -> None:
    """One 503 is absorbed by botocore's per-request retry; four (1 + its 3 retries) exhaust it,
    the error surfaces as transient, and the task retries."""
    key = f"{unique}{failures}" * 4
    engine = _engine_dir(tmp_path, key)
    status, body, headers = s3_error("ServiceUnavailable")
    s3_proxy.add_fault(method="PUT", path_pattern="rank0\\.engine", status=status, body=body, headers=headers, count=failures)
    cache = CacheSpec(uri=f"s3://{ENGINE_BUCKET}/faults")

    state = upload_flow(engine, cache, return_state=True)

    assert state.is_completed(), state.message
    assert [r[2] for r in s3_proxy.requests if r[3]] == [503] * failures
    assert task_runs(state.state_details.flow_run_id)["upload-engine"].run_count == task_attempts
    client = boto3.client("s3", endpoint_url=s3_proxy.url, region_name="us-east-1")
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=ENGINE_BUCKET, Prefix=f"faults/{key}/")["Contents"]}
    upload_id = read_local_manifest(Path(engine.path))["upload_id"]  # type: ignore[index]
    assert keys == {f"faults/{key}/manifest.json", *(f"faults/{key}/uploads/{upload_id}/{p}" for p in
                    ("trtllm_engine/rank0.engine", "trtllm_engine/config.json", "config.json"))}


def test_unknown_revision_fails_once_naming_the_cause(
    tmp_path: Path, testbed_env: dict, hub: Any, standin_image: str, unique: str
) -> None:
    repo = f"org/revs-{unique}"
    publish_tiny(hub, repo, tmp_path)
    config = write_spec(tmp_path / "spec.yaml", make_spec(tmp_path, f"rev-{unique}", repo, standin_image))
    hub.clear_requests()

    state = host_model(spec=str(config), revision="no-such-branch", return_state=True)

    assert state.is_failed()
    with pytest.raises(Exception) as caught:
        state.result()
    assert type(caught.value).__name__ == "CheckpointNotFound"
    assert "no-such-branch" in str(caught.value) and repo in str(caught.value)
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["download-checkpoint"].run_count == 1  # permanent: no retry
    assert set(runs) == {"undo-dead-runs", "prepare-serving-image", "download-checkpoint"}  # nothing after it ran
    assert len([r for r in hub.requests if "/revision/" in r[1]]) == 1


def test_engine_dir_as_finetune_is_refused_before_any_container(
    tmp_path: Path, testbed_env: dict, hub: Any, standin_image: str, unique: str, docker_client: Any
) -> None:
    repo = f"org/ftbad-{unique}"
    publish_tiny(hub, repo, tmp_path)
    engine_dir = tmp_path / "OPT-llama"  # what nim-optimize produces, per the guide
    (engine_dir / "trtllm_engine").mkdir(parents=True)
    (engine_dir / "trtllm_engine" / "rank0.engine").write_bytes(b"\0" * 4096)
    (engine_dir / "trtllm_engine" / "config.json").write_text('{"version": "0.12", "build_config": {}}')
    (engine_dir / "config.json").write_text('{"model_type": "llama"}')
    spec = make_spec(tmp_path, f"ftbad-{unique}", repo, standin_image, build="nim-jit")
    spec["finetune"] = {"path": str(engine_dir)}
    before = {c.id for c in docker_client.containers.list(all=True)}

    state = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)), return_state=True)

    assert state.is_failed()
    with pytest.raises(Exception) as caught:
        state.result()
    assert type(caught.value).__name__ == "InvalidWeights"
    message = str(caught.value)
    assert "TensorRT-LLM engine directory" in message and "trtllm_engine/rank0.engine" in message
    assert "safetensors" in message  # says what is expected
    assert {c.id for c in docker_client.containers.list(all=True)} == before
    assert task_runs(state.state_details.flow_run_id)["import-finetune"].run_count == 1


def test_never_ready_fails_at_deadline_with_logs(
    tmp_path: Path, testbed_env: dict, hub: Any, standin_image: str, unique: str, cleanup_containers: list, docker_client: Any
) -> None:
    name, repo = f"slow-{unique}", f"org/slow-{unique}"
    publish_tiny(hub, repo, tmp_path)
    spec = make_spec(tmp_path, name, repo, standin_image, build=None, deadline_seconds=4,
                     env={"NIMSTANDIN_READY_DELAY": "3600"})
    cleanup_containers.append(f"nimflow-{name}")

    state = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)), return_state=True)

    assert state.is_failed()
    with pytest.raises(Exception) as caught:
        state.result()
    message = str(caught.value)
    assert type(caught.value).__name__ == "EndpointUnhealthy"
    assert message.startswith("verification failed at ready:") and "verify.deadline_seconds (4s" in message
    assert "/v1/health/ready answers 200 in 3600.0s" in message  # the container's own words are in the error
    # The candidate that never became ready is removed: it holds no GPU or port.
    assert not docker_client.containers.list(all=True, filters={"label": f"nimflow.deployment={name}"})


def test_exiting_container_fails_at_once_with_logs(
    tmp_path: Path, testbed_env: dict, standin_image: str, unique: str, cleanup_containers: list
) -> None:
    name = f"crash-{unique}"
    model = write_tiny_llama(tmp_path / "model", seed=1)
    for weights in model.glob("*.safetensors"):
        weights.unlink()  # NIM (and the stand-in) refuse a checkpoint without weights
    spec = make_spec(tmp_path, name, "org/unused", standin_image, build=None, deadline_seconds=300)
    spec["source"] = {"local_dir": str(model)}
    cleanup_containers.append(f"nimflow-{name}")

    state = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)), return_state=True)

    with pytest.raises(Exception) as caught:
        state.result()
    message = str(caught.value)
    # Failed because it exited, not because the 300 s deadline passed.
    assert "exit code 1" in message and "last log lines" in message and "deadline" not in message


def test_large_engine_files_go_multipart_and_restore_verified(
    tmp_path: Path, s3_server: Service, testbed_env: dict, unique: str
) -> None:
    """A file above the part size is uploaded in parts, streamed; a restore re-hashes every file."""
    from nimflow.engine_store import EngineStore

    key = (unique * 8)[:64]
    engine = _engine_dir(tmp_path, key)
    rank = Path(engine.path) / "trtllm_engine" / "rank0.engine"
    with rank.open("wb") as handle:  # 12 MiB of varied bytes
        for block in range(12):
            handle.write(bytes([block]) * (1024 * 1024))
    manifest = write_manifest(Path(engine.path), key, {"test": True}, {"tp_size": 1})
    cache = CacheSpec(uri=f"s3://{ENGINE_BUCKET}/multipart", multipart_chunk_mib=5, max_concurrency=2, single_request_max_mib=0)
    files_prefix = f"multipart/{key}/uploads/{manifest['upload_id']}"

    state = upload_flow(engine, cache, return_state=True)
    assert state.is_completed(), state.message

    client = boto3.client("s3", endpoint_url=s3_server.url, region_name="us-east-1")
    head = client.head_object(Bucket=ENGINE_BUCKET, Key=f"{files_prefix}/trtllm_engine/rank0.engine")
    assert head["ETag"].strip('"').endswith("-3")  # 5 + 5 + 2 MiB parts
    store = EngineStore(cache)
    restored = tmp_path / "restored"
    files, size = store.restore(store.manifest(key) or {}, restored, engine_key=key)
    assert files == len(manifest["files"]) and (restored / "trtllm_engine" / "rank0.engine").read_bytes() == rank.read_bytes()

    # A corrupted object in the store is refused on restore, not served.
    client.put_object(Bucket=ENGINE_BUCKET, Key=f"{files_prefix}/config.json", Body=b'{"tampered": true}')
    with pytest.raises(EngineStoreError, match="does not match the manifest"):
        store.restore(store.manifest(key) or {}, tmp_path / "restored-again", engine_key=key)


def test_port_in_use_fails_once_naming_the_field(
    tmp_path: Path, testbed_env: dict, hub: Any, standin_image: str, unique: str, cleanup_containers: list
) -> None:
    import socket

    name, repo = f"port-{unique}", f"org/port-{unique}"
    publish_tiny(hub, repo, tmp_path)
    spec = make_spec(tmp_path, name, repo, standin_image, build=None)
    cleanup_containers.append(f"nimflow-{name}")
    with socket.socket() as squatter:  # someone else holds the port
        squatter.bind(("127.0.0.1", spec["deploy"]["host_port"]))
        squatter.listen()
        state = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)), return_state=True)

    with pytest.raises(Exception) as caught:
        state.result()
    assert type(caught.value).__name__ == "DeploymentError"
    assert str(spec["deploy"]["host_port"]) in str(caught.value) and "deploy.host_port" in str(caught.value)
    assert task_runs(state.state_details.flow_run_id)["deploy-nim"].run_count == 1


def test_gated_repo_names_the_fix(tmp_path: Path, testbed_env: dict, hub: Any, unique: str) -> None:
    from nimflow.tasks.download import fetch_snapshot

    from nimflow.errors import CheckpointNotFound

    repo = f"org/gated-{unique}"
    publish_tiny(hub, repo, tmp_path, gated=True)
    with pytest.raises(CheckpointNotFound, match="accept the model's terms"):
        fetch_snapshot(repo, "main", None, tmp_path / "cache")
