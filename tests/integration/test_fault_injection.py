"""Transfers through the fault proxy: resets, 503 bursts, latency and hangs between nimflow and its servers.

The proxy (nimflow/testbed/fault_proxy.py) sits between nimflow and the real hub and S3 servers, so
huggingface_hub and boto3 meet genuine faults on the wire. Every run must complete, every file's
sha256 must match its source, and a transfer interrupted after some files must not send them again.
Also here: the flow process killed with SIGKILL mid-upload, and the S3 server down longer than the
retry budget while a deployment serves.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from nimflow.flows.host_model import host_model
from nimflow.tasks.download import download_checkpoint
from nimflow.tasks.upload import upload_engine
from prefect import flow

from nimflow.cache_admin import list_entries
from nimflow.engine_store import EngineStore, read_local_manifest, write_manifest
from nimflow.errors import NimflowError, is_transient
from nimflow.records import Engine
from nimflow.settings import get_settings
from nimflow.spec import CacheSpec, SourceSpec
from nimflow.testbed.fault_proxy import Exchange, FaultProxy, hub_error, s3_error
from nimflow.testbed.hub_server import publish
from nimflow.testbed.services import Service
from nimflow.testbed.tiny_model import write_tiny_llama
from tests.conftest import ENGINE_BUCKET, write_spec
from tests.integration.test_host_model import make_spec, publish_tiny, task_runs

pytestmark = pytest.mark.testbed

MIB = 1024 * 1024
#: Seconds an S3 request may hang before botocore retries it (the default is minutes).
S3_HANG_TIMEOUT = "3"
#: Armed after the specific faults, it catches every other request (faults are tried in order).
EVERY_REQUEST = 10**6


@flow(name="test-fault-download")
def download_flow(source: SourceSpec, cache_dir: str) -> Any:
    return download_checkpoint(source, cache_dir)


@flow(name="test-fault-upload")
def upload_flow(engine: Engine, cache: CacheSpec) -> Any:
    return upload_engine(engine, cache)


@pytest.fixture
def hub_proxy(hub: Any, testbed_env: dict, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    with FaultProxy(hub.url) as proxy:
        monkeypatch.setenv("HF_ENDPOINT", proxy.url)
        yield proxy



def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(MIB):
            digest.update(block)
    return digest.hexdigest()


def varied_bytes(path: Path, size: int, seed: int) -> None:
    """``size`` bytes that differ block by block (a part sent twice or out of place changes the hash)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        for block in range(0, size, 64 * 1024):
            handle.write(hashlib.sha256(f"{seed}-{block}".encode()).digest() * 2048)
        handle.truncate(size)


def engine_dir(root: Path, key: str, ranks: dict[str, int]) -> Engine:
    """An engine directory in NIM's layout with rank files of the given sizes, and its manifest."""
    engine = root / key
    for index, (name, size) in enumerate(ranks.items()):
        varied_bytes(engine / "trtllm_engine" / name, size, seed=index)
    (engine / "trtllm_engine" / "config.json").write_text('{"build_config": {"max_batch_size": 4}}')
    (engine / "config.json").write_text('{"model_type": "llama"}')
    (engine / "tokenizer.json").write_text('{"model": {"vocab": {}}}')
    manifest = write_manifest(engine, key, {"test": True}, {"tp_size": len(ranks)})
    return Engine(engine_key=key, path=str(engine), origin="built", files=len(manifest["files"]),
                  bytes=sum(f["size"] for f in manifest["files"]))


def engine_key(unique: str, salt: str) -> str:
    return hashlib.sha256(f"{unique}-{salt}".encode()).hexdigest()


def file_puts(proxy: FaultProxy, upload_prefix: str) -> dict[str, list[Exchange]]:
    """The PUTs of each engine file (path relative to the upload), in order."""
    found: dict[str, list[Exchange]] = {}
    base = f"/{ENGINE_BUCKET}/{upload_prefix}/"
    for exchange in proxy.exchanges:
        path = exchange.path.split("?")[0]
        if exchange.method == "PUT" and path.startswith(base):
            found.setdefault(path[len(base):], []).append(exchange)
    return found


def stored_files_match(s3_url: str, store_prefix: str, manifest: dict[str, Any], local: Path) -> None:
    """Every file the manifest lists is stored with the manifest's sha256, which is the local file's."""
    client = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1")
    for entry in manifest["files"]:
        key = f"{store_prefix}/uploads/{manifest['upload_id']}/{entry['path']}"
        body = client.get_object(Bucket=ENGINE_BUCKET, Key=key)["Body"]
        digest = hashlib.sha256()
        while block := body.read(MIB):
            digest.update(block)
        assert digest.hexdigest() == entry["sha256"] == sha256(local / entry["path"]), entry["path"]


# --- the hub -------------------------------------------------------------------------------------


def test_download_survives_a_reset_a_503_burst_latency_and_a_hang(
    tmp_path: Path, hub: Any, hub_proxy: FaultProxy, unique: str
) -> None:
    repo = f"org/faulty-{unique}"
    source = write_tiny_llama(tmp_path / "src", seed=3, hidden_size=128, shards=2)
    publish(hub.root, repo, source)
    shards = sorted(p.name for p in source.glob("model-*.safetensors"))
    # A reset 100 kB into the first shard (huggingface_hub resumes with a Range request), a burst
    # of two 503s on config.json (not retried by huggingface_hub: the task retries, twice), a hang
    # on the second shard until huggingface_hub's own read timeout (HF_HUB_DOWNLOAD_TIMEOUT, 10 s),
    # and 50 ms of latency on everything else.
    hub_proxy.add_reset(100_000, method="GET", path_pattern=rf"/resolve/[0-9a-f]+/{shards[0]}$")
    hub_proxy.add_fault(method="GET", path_pattern=r"/resolve/[0-9a-f]+/config\.json$", count=2, **hub_error(503)._asdict())
    hub_proxy.add_hang(method="GET", path_pattern=rf"/resolve/[0-9a-f]+/{shards[1]}$")
    hub_proxy.add_latency(0.05, count=EVERY_REQUEST)

    state = download_flow(SourceSpec(repo_id=repo), str(tmp_path / "cache"), return_state=True)

    assert state.is_completed(), state.message
    checkpoint = Path(state.result().path)
    for path in sorted(source.iterdir()):
        assert sha256(checkpoint / path.name) == sha256(path), path.name
    faults = Counter(e.fault for e in hub_proxy.exchanges if e.fault not in (None, "latency"))
    assert faults == {"reset": 1, "answer": 2, "hang": 1}
    reset = next(e for e in hub_proxy.exchanges if e.fault == "reset")
    assert reset.status == 200 and reset.response_bytes == 100_000  # cut mid-body, not before it
    shard0 = (source / shards[0]).stat().st_size
    # Fetched again once (from where huggingface_hub had written to: it writes in 10 MB pieces, so
    # for a small file from the start), and never after the task's retries.
    after = [e for e in hub_proxy.exchanges if e.method == "GET" and e.path.endswith(shards[0]) and e.fault != "reset"]
    assert len(after) == 1 and after[0].status in (200, 206) and 0 < after[0].response_bytes <= shard0
    assert task_runs(state.state_details.flow_run_id)["download-checkpoint"].run_count == 3


# --- S3: upload and restore ------------------------------------------------------------------------


def test_engine_upload_and_restore_survive_resets_503_bursts_latency_and_hangs(
    tmp_path: Path, s3_server: Service, s3_proxy: FaultProxy, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NIMFLOW_S3_READ_TIMEOUT_SECONDS", S3_HANG_TIMEOUT)
    key = engine_key(unique, "faults")
    engine = engine_dir(tmp_path, key, {"rank0.engine": 12 * MIB + 4321, "rank1.engine": 3 * MIB})
    cache = CacheSpec(uri=f"s3://{ENGINE_BUCKET}/inject-{unique}", multipart_chunk_mib=5, max_concurrency=2, single_request_max_mib=0)
    manifest = read_local_manifest(Path(engine.path))
    assert manifest is not None

    # Upload: rank0 goes in three 5 MiB parts; part 2 is reset 1 MiB into its body. rank1 meets a
    # burst of two 503s (botocore retries up to 3 times), the engine's config.json a hang (retried
    # after NIMFLOW_S3_READ_TIMEOUT_SECONDS), everything else 20 ms of latency.
    s3_proxy.add_reset(MIB, method="PUT", path_pattern=r"rank0\.engine\?.*partNumber=2(&|$)", of="request")
    s3_proxy.add_fault(method="PUT", path_pattern=r"rank1\.engine$", count=2, **s3_error("ServiceUnavailable")._asdict())
    s3_proxy.add_hang(method="PUT", path_pattern=r"trtllm_engine/config\.json$")
    s3_proxy.add_latency(0.02, count=EVERY_REQUEST)

    state = upload_flow(engine, cache, return_state=True)

    assert state.is_completed(), state.message
    assert state.result().published_by_this_run
    assert Counter(e.fault for e in s3_proxy.exchanges if e.fault not in (None, "latency")) == {
        "reset": 1, "answer": 2, "hang": 1}
    store_prefix = f"inject-{unique}/{key}"
    stored_files_match(s3_server.url, store_prefix, manifest, Path(engine.path))

    # Restore through new faults: a ranged GET of rank0 cut after 1 MiB (s3transfer retries it), a
    # burst of two 503s on rank1, and a hang on the top-level config.json.
    s3_proxy.clear_faults()
    s3_proxy.clear_requests()
    s3_proxy.add_reset(MIB, method="GET", path_pattern=r"rank0\.engine$")
    s3_proxy.add_fault(method="GET", path_pattern=r"rank1\.engine$", count=2, **s3_error("SlowDown")._asdict())
    s3_proxy.add_hang(method="GET", path_pattern=rf"{upload_prefix(store_prefix, manifest)}/config\.json$")
    s3_proxy.add_latency(0.02, count=EVERY_REQUEST)
    store = EngineStore(cache)
    restored = tmp_path / "restored"

    files, size = store.restore(store.manifest(key) or {}, restored, engine_key=key)

    assert (files, size) == (len(manifest["files"]), engine.bytes)
    for entry in manifest["files"]:
        assert sha256(restored / entry["path"]) == entry["sha256"] == sha256(Path(engine.path) / entry["path"])
    assert Counter(e.fault for e in s3_proxy.exchanges if e.fault not in (None, "latency")) == {
        "reset": 1, "answer": 2, "hang": 1}


def upload_prefix(store_prefix: str, manifest: dict[str, Any]) -> str:
    return f"{store_prefix}/uploads/{manifest['upload_id']}"


def test_upload_retried_by_the_task_does_not_send_uploaded_files_again(
    tmp_path: Path, s3_server: Service, s3_proxy: FaultProxy, unique: str
) -> None:
    """The first attempt uploads every file but one, whose PUT is cut four times (botocore's budget);
    the task's retry sends only that file, and the manifest lists every file."""
    key = engine_key(unique, "resume")
    engine = engine_dir(tmp_path, key, {"rank0.engine": 2 * MIB, "rank1.engine": 2 * MIB + 17, "rank2.engine": MIB})
    cache = CacheSpec(uri=f"s3://{ENGINE_BUCKET}/resume-{unique}")
    manifest = read_local_manifest(Path(engine.path))
    assert manifest is not None
    s3_proxy.add_reset(64 * 1024, method="PUT", path_pattern=r"rank1\.engine$", count=4, of="request")

    state = upload_flow(engine, cache, return_state=True)

    assert state.is_completed(), state.message
    assert task_runs(state.state_details.flow_run_id)["upload-engine"].run_count == 2
    published = state.result()
    sizes = {f["path"]: f["size"] for f in manifest["files"]}
    assert (published.uploaded_files, published.uploaded_bytes) == (1, sizes["trtllm_engine/rank1.engine"])
    puts = file_puts(s3_proxy, upload_prefix(f"resume-{unique}/{key}", manifest))
    assert set(puts) == set(sizes)
    for path, exchanges in puts.items():
        stored = [e for e in exchanges if e.fault is None]
        # Each file reached the store exactly once, whole; only the faulted one was ever sent again.
        assert [(e.status, e.request_bytes) for e in stored] == [(200, sizes[path])], path
        assert len(exchanges) == (5 if path == "trtllm_engine/rank1.engine" else 1), (path, exchanges)
    client = boto3.client("s3", endpoint_url=s3_server.url, region_name="us-east-1")
    stored_manifest = json.loads(
        client.get_object(Bucket=ENGINE_BUCKET, Key=f"resume-{unique}/{key}/manifest.json")["Body"].read())
    assert stored_manifest["files"] == manifest["files"]
    stored_files_match(s3_server.url, f"resume-{unique}/{key}", stored_manifest, Path(engine.path))


# --- the flow process killed mid-upload --------------------------------------------------------------

_UPLOAD_SCRIPT = """
import sys
from prefect import flow
from nimflow.records import Engine
from nimflow.settings import get_settings
from nimflow.spec import CacheSpec
from nimflow.tasks.upload import upload_engine

@flow(name="test-sigkill-upload")
def upload(engine: Engine, cache: CacheSpec):
    return upload_engine(engine, cache)

upload(Engine.model_validate_json(sys.argv[1]), CacheSpec.model_validate_json(sys.argv[2]))
"""


def test_flow_killed_mid_upload_leaves_nothing_visible_and_a_rerun_publishes_once(
    tmp_path: Path, s3_server: Service, s3_proxy: FaultProxy, testbed_env: dict, prefect_api: str, unique: str
) -> None:
    key = engine_key(unique, "sigkill")
    engine = engine_dir(tmp_path, key, {"rank0.engine": 4 * MIB, "rank1.engine": 3 * MIB})
    # The killed run holds the key's lease (every upload does) and cannot release it: the rerun takes it
    # over once it lapses, so a short TTL keeps that wait short.
    cache = CacheSpec(uri=f"s3://{ENGINE_BUCKET}/sigkill-{unique}", build_lease_seconds=4)
    manifest = read_local_manifest(Path(engine.path))
    assert manifest is not None
    prefix = upload_prefix(f"sigkill-{unique}/{key}", manifest)
    s3_proxy.add_hang(method="PUT", path_pattern=r"rank0\.engine$")  # the upload is caught in the middle

    env = {**os.environ, **testbed_env, "AWS_ENDPOINT_URL": s3_proxy.url, "PREFECT_API_URL": prefect_api}
    process = subprocess.Popen([sys.executable, "-c", _UPLOAD_SCRIPT, engine.model_dump_json(), cache.model_dump_json()],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        others = {f["path"] for f in manifest["files"]} - {"trtllm_engine/rank0.engine"}
        deadline = time.monotonic() + 180
        # Killed once rank0's PUT is under way (its body reached the proxy) and every other file is stored.
        while not (s3_proxy.hanging and {p for p, e in file_puts(s3_proxy, prefix).items() if e[-1].status == 200} >= others):
            assert process.poll() is None, process.communicate()[0][-4000:]
            assert time.monotonic() < deadline, f"the upload never reached the hang: {s3_proxy.requests}"
            time.sleep(0.1)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL

    # Nothing partial is visible: no manifest, `nimflow cache ls` lists nothing, and rank0 is not
    # stored at all (S3 writes an object only when its PUT completes). What the killed run did
    # upload waits under its upload id; gc sees it as abandoned.
    direct = EngineStore(cache.model_copy(update={"endpoint_url": s3_server.url}))
    assert direct.manifest(key) is None
    assert list_entries(direct) == f"No engines in {cache.uri}"
    client = boto3.client("s3", endpoint_url=s3_server.url, region_name="us-east-1")
    stored = {o["Key"] for o in client.list_objects_v2(Bucket=ENGINE_BUCKET, Prefix=f"{prefix}/").get("Contents", [])}
    assert stored == {f"{prefix}/{path}" for path in others}
    assert [(a.engine_key, a.upload_id) for a in direct.abandoned_uploads()] == [(key, manifest["upload_id"])]

    s3_proxy.clear_faults()
    s3_proxy.clear_requests()
    state = upload_flow(engine, cache, return_state=True)

    assert state.is_completed(), state.message
    published = state.result()
    assert published.published_by_this_run and published.uploaded_files == 1  # only rank0 was missing
    assert set(file_puts(s3_proxy, prefix)) == {"trtllm_engine/rank0.engine"}
    manifests = direct.manifests()
    assert [m["engine_key"] for m in manifests] == [key]
    assert list_entries(direct).startswith(f"Engines in {cache.uri} (1):")
    stored_files_match(s3_server.url, f"sigkill-{unique}/{key}", manifests[0], Path(engine.path))
    assert direct.abandoned_uploads() == []


# --- S3 down longer than the retry budget, while a deployment serves ----------------------------------


def _completion(endpoint: str, model: str) -> str:
    response = httpx.post(f"{endpoint}/v1/chat/completions", timeout=10,
                          json={"model": model, "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 8})
    response.raise_for_status()
    return str(response.json()["choices"][0]["message"]["content"])


def test_s3_down_fails_the_run_naming_the_endpoint_and_the_deployment_keeps_serving(
    tmp_path: Path, testbed_env: dict, hub: Any, standin_image: str, unique: str, cleanup_containers: list,
    s3_proxy: FaultProxy, docker_client: Any,
) -> None:
    name, repo = f"s3down-{unique}", f"org/s3down-{unique}"
    publish_tiny(hub, repo, tmp_path)
    spec = make_spec(tmp_path, name, repo, standin_image)
    config = write_spec(tmp_path / "spec.yaml", spec)
    cleanup_containers.append(f"nimflow-{name}")
    first = host_model(spec=str(config))
    assert "still there?" in _completion(first["endpoint"], first["served_model_name"])

    # A new revision needs a new engine; the store is unreachable for the whole retry budget.
    publish_tiny(hub, repo, tmp_path, seed=1)
    store_endpoint = s3_proxy.url
    s3_proxy.stop()
    state = host_model(spec=str(config), return_state=True)

    assert state.is_failed()
    with pytest.raises(NimflowError) as caught:
        state.result()
    assert is_transient(caught.value)  # it was retried, and the budget ran out
    message = str(caught.value)
    assert store_endpoint in message and spec["cache"]["uri"] in message, message
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["compile-engine"].run_count == 1 + get_settings().max_retries and "deploy-nim" not in runs
    # The deployment that served before serves on, from the same container.
    assert "still there?" in _completion(first["endpoint"], first["served_model_name"])
    assert docker_client.containers.get(first["container_id"]).status == "running"
