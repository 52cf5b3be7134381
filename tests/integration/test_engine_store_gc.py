"""`nimflow cache gc` cannot break a published engine, keeps what the fleet serves, and cleans leaks.

Real moto S3 server on loopback (fixture ``s3_server``); where one actor must be paused at an exact
request while another acts, the paused one talks through :class:`FaultProxy` with a hold on that
request (its manifest PUT, or one part of a multipart upload). The gc side always talks to moto
directly. Each test says how it was checked to fail on the code before this change (main at
356d66a, with these tests copied in).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from nimflow.tasks.upload import publish_engine

from nimflow.build_lease import BuildLeases, Lease
from nimflow.cache_admin import plan_gc, run_gc
from nimflow.engine_cache import engine_record
from nimflow.engine_store import EngineStore, scratch_dir, write_manifest
from nimflow.spec import CacheSpec
from nimflow.testbed.fault_proxy import FaultProxy
from nimflow.testbed.services import S3_TEST_CREDENTIALS, Service
from tests.conftest import ENGINE_BUCKET

pytestmark = pytest.mark.testbed

DAY = timedelta(hours=24)


@pytest.fixture
def s3_env(s3_server: Service, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """nimflow pointed at moto (no hub or Prefect needed here)."""
    env = {"AWS_ENDPOINT_URL": s3_server.url, **S3_TEST_CREDENTIALS}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def proxy(s3_server: Service) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.url) as started:
        yield started


def key_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def inputs(revision: str, tp_size: int = 1) -> dict[str, Any]:
    """Key inputs as the compile stage records them (weights, build, GPU, image, TensorRT-LLM)."""
    return {
        "schema": "nimflow-engine-key/2", "weights": f"hf:org/base@{revision}",
        "build": {"backend": "nim-optimize", "dtype": "float16", "tp_size": tp_size, "pp_size": 1, "max_seq_len": 1024},
        "gpu": {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}, "image_id": "sha256:" + "ab" * 32,
        "trtllm_version": "0.16.0",
    }


def fake_engine(root: Path, key: str, content: bytes, key_inputs: dict[str, Any] | None = None,
                rank_bytes: int = 4096) -> tuple[Path, dict[str, Any]]:
    """An engine directory with its local manifest; ``content`` makes each build's bytes differ."""
    engine = root / hashlib.sha256(content).hexdigest()[:8]
    (engine / "trtllm_engine").mkdir(parents=True)
    (engine / "trtllm_engine" / "rank0.engine").write_bytes((content * (rank_bytes // len(content) + 1))[:rank_bytes])
    (engine / "trtllm_engine" / "config.json").write_text('{"version": "0.16.0"}')
    (engine / "config.json").write_text('{"model_type": "llama"}')
    return engine, write_manifest(engine, key, key_inputs or inputs("r1"), {"tp_size": 1, "pp_size": 1})


def store_at(uri: str, endpoint: str, **cache: Any) -> EngineStore:
    return EngineStore(CacheSpec(uri=uri, endpoint_url=endpoint, **cache))


def restores_whole(store: EngineStore, key: str, dest: Path) -> dict[str, Any]:
    """The published manifest of ``key``, after restoring it into ``dest`` (every byte verified)."""
    manifest = store.manifest(key)
    assert manifest is not None, f"{store.uri(key)} has no manifest"
    store.restore(manifest, dest, engine_key=key)  # raises on a missing or corrupt file
    return manifest


def wait_until(condition: Callable[[], bool], what: str, bound: float = 60.0) -> None:
    deadline = time.monotonic() + bound
    while not condition():
        assert time.monotonic() < deadline, f"never happened within {bound:g}s: {what}"
        time.sleep(0.05)


def store_clock_past(store: EngineStore, object_key: str) -> None:
    """Wait until the store's clock (a response's Date) is past an object's Last-Modified (1 s steps)."""
    written = store.client.head_object(Bucket=ENGINE_BUCKET, Key=object_key)["LastModified"]

    def past() -> bool:
        answer = store.client.list_objects_v2(Bucket=ENGINE_BUCKET, Prefix=object_key, MaxKeys=1)
        return parsedate_to_datetime(answer["ResponseMetadata"]["HTTPHeaders"]["date"]) > written

    wait_until(past, f"the store's clock passes {written}")


def nimflow_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).with_name("nimflow")), *args]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env, "COLUMNS": "200"}, timeout=180)


def published_while_gc_runs(engine_dir: Path, manifest: dict[str, Any], uri: str, proxy: FaultProxy,
                            gc: Callable[[], str]) -> tuple[Any, str]:
    """Re-publish a local engine (no build lease: a local-cache hit) through ``proxy``; run ``gc`` while
    its manifest PUT is held, i.e. after it checked which files the store holds and before it publishes."""
    key = manifest["engine_key"]
    gate = proxy.add_hold(method="PUT", path_pattern=rf"/{key}/manifest\.json")
    record = engine_record(key, engine_dir, "local-cache", manifest)
    with ThreadPoolExecutor(max_workers=1) as pool:
        publishing = pool.submit(publish_engine, record, CacheSpec(uri=uri, endpoint_url=proxy.url))
        wait_until(lambda: proxy.holding == 1 or publishing.done(), "the publisher reaches its manifest PUT")
        assert not publishing.done(), publishing.result()
        report = gc()
        gate.set()
        return publishing.result(timeout=60), report


# --- 1. a stale plan cannot delete an engine published after it -------------------------------------


def test_stale_gc_plan_never_breaks_an_engine_published_after_it(
    tmp_path: Path, s3_env: dict, s3_server: Service, proxy: FaultProxy, unique: str
) -> None:
    """gc X plans; gc Y removes the key; host H re-publishes it; gc X runs its old plan: H's engine restores whole.

    Checked on main before this change: gc X's ``delete_engine`` removed the whole ``<key>/`` prefix
    (H's upload and lease) while H was between its file checks and its manifest write; H's manifest
    was then created and the restore failed with ``NoSuchKey`` on ``trtllm_engine/config.json``.
    """
    uri, key = f"s3://{ENGINE_BUCKET}/stale-{unique}", key_of(f"stale-{unique}")
    direct = store_at(uri, s3_server.url)
    old_dir, old = fake_engine(tmp_path / "old", key, b"OLDBUILD")
    assert direct.upload(old_dir, old).published
    store_clock_past(direct, direct.object_key(key, "manifest.json"))

    def gc_plan() -> Any:
        return plan_gc(direct, keep=None, older_than=timedelta(0), abandoned_after=DAY, in_use={})

    plan_x = gc_plan()  # gc X plans to remove the old engine ...
    run_gc(direct, gc_plan(), dry_run=False)  # ... gc Y removes it first
    assert direct.manifest(key) is None

    # Host H has its own build of the key locally and publishes it; gc X acts while H is mid-publish.
    new_dir, new = fake_engine(tmp_path / "host-h", key, b"NEWBUILD")
    published, report = published_while_gc_runs(new_dir, new, uri, proxy, lambda: run_gc(direct, plan_x, dry_run=False))
    assert published.published_by_this_run
    assert restores_whole(direct, key, tmp_path / "restore-1")["upload_id"] == new["upload_id"]
    assert f"kept {key[:12]}: being built/uploaded by" in report, report

    # Once H is done (lease released), gc X's plan names a manifest version that no longer exists.
    report = run_gc(direct, plan_x, dry_run=False)
    assert f"kept engine {key[:12]}: its manifest was replaced or removed since the plan" in report, report
    assert restores_whole(direct, key, tmp_path / "restore-2")["upload_id"] == new["upload_id"]


# --- 2. a lease-less re-publish after a local hit, racing the abandoned-upload rule -----------------------


def test_republish_after_a_local_hit_is_not_taken_for_an_abandoned_upload(
    tmp_path: Path, s3_env: dict, s3_server: Service, proxy: FaultProxy, unique: str
) -> None:
    """An earlier attempt left the upload's files; gc plans them as abandoned; the re-publish finds them and publishes.

    Checked on main before this change: the re-publish ran without a lease, found every file
    already stored, and was held at its manifest PUT while gc deleted "the abandoned upload"; its
    manifest was then created over an upload of which none of the 3 files was left.
    """
    uri, key = f"s3://{ENGINE_BUCKET}/republish-{unique}", key_of(f"republish-{unique}")
    direct = store_at(uri, s3_server.url)
    engine_dir, manifest = fake_engine(tmp_path / "host", key, b"LOCALHIT")
    for entry in manifest["files"]:  # an earlier attempt stored every file, then died before the manifest
        direct.client.upload_file(str(engine_dir / entry["path"]), ENGINE_BUCKET,
                                  direct.object_key(key, "uploads", manifest["upload_id"], entry["path"]),
                                  ExtraArgs={"Metadata": {"sha256": entry["sha256"]}})
    plan = plan_gc(direct, keep=100, older_than=None, abandoned_after=timedelta(0), in_use={})

    published, report = published_while_gc_runs(engine_dir, manifest, uri, proxy,
                                                 lambda: run_gc(direct, plan, dry_run=False))

    assert published.published_by_this_run and published.uploaded_files == 0  # every file was already there
    stored = direct.client.list_objects_v2(Bucket=ENGINE_BUCKET, Prefix=direct.object_key(key, "uploads") + "/").get("Contents", [])
    assert len(stored) == len(manifest["files"]), report
    restores_whole(direct, key, tmp_path / "restored")
    assert f"kept {key[:12]}: being built/uploaded by" in report, report
    assert BuildLeases(direct, 300).current(key) is None  # the re-publish released the lease it took


# --- 3. a killed multipart upload is aborted; one under a live lease is kept -------------------------------


def test_gc_aborts_a_killed_multipart_upload_and_keeps_one_under_a_live_lease(
    tmp_path: Path, s3_env: dict, s3_server: Service, proxy: FaultProxy, unique: str
) -> None:
    """A publisher SIGKILLed mid multipart upload leaves parts no object lists; gc aborts them.

    moto reports every multipart upload's ``Initiated`` as a fixed date in 2010, so on the test bed
    an age bound protects nothing: what keeps an in-progress upload is its key's live build lease
    (every upload runs under it), which is what this test holds for the second one.

    Checked on main before this change: `nimflow cache gc` listed objects only, so the killed
    upload was still in ``list_multipart_uploads`` afterwards.
    """
    prefix = f"multipart-{unique}"
    uri, killed_key, live_key = f"s3://{ENGINE_BUCKET}/{prefix}", key_of(f"killed-{unique}"), key_of(f"live-{unique}")
    direct = store_at(uri, s3_server.url)
    engine_dir, manifest = fake_engine(tmp_path, killed_key, b"MULTIPRT", rank_bytes=24 << 20)
    gate = proxy.add_hold(method="PUT", path_pattern=r"partNumber=3")  # 5 MiB parts: the killed run gets 2 in
    script = (
        "import sys; from pathlib import Path\n"
        "from nimflow.engine_store import EngineStore, read_local_manifest\n"
        "from nimflow.spec import CacheSpec\n"
        "store = EngineStore(CacheSpec(uri=sys.argv[1], endpoint_url=sys.argv[2], multipart_chunk_mib=5,"
        " single_request_max_mib=1, max_concurrency=1))\n"
        "store.upload(Path(sys.argv[3]), read_local_manifest(Path(sys.argv[3])))\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script, uri, proxy.url, str(engine_dir)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: proxy.holding == 1 or process.poll() is not None, "the upload reaches part 3")
        assert process.poll() is None, process.communicate()[0][-4000:]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        gate.set()

    # Another host is uploading live_key right now: its lease is live, its multipart upload in progress.
    leases = BuildLeases(direct, 300)
    lease = leases.try_acquire(live_key)
    assert isinstance(lease, Lease)
    live_object = direct.object_key(live_key, "uploads", "0123abcd", "trtllm_engine", "rank0.engine")
    live_upload = direct.client.create_multipart_upload(Bucket=ENGINE_BUCKET, Key=live_object)["UploadId"]

    def pending() -> set[str]:
        uploads = direct.client.list_multipart_uploads(Bucket=ENGINE_BUCKET, Prefix=f"{prefix}/").get("Uploads", [])
        return {u["Key"].split("/")[1] for u in uploads}

    assert pending() == {killed_key, live_key}
    try:
        gc = nimflow_cli("cache", "gc", "--keep", "100", "--abandoned-after", "0s", "--store", uri,
                         "--endpoint-url", s3_server.url, env=s3_env)
        assert gc.returncode == 0, gc.stderr
        assert pending() == {live_key}, gc.stdout
        assert "aborted incomplete multipart upload of" in gc.stdout and f"{killed_key}/uploads/" in gc.stdout, gc.stdout
        assert f"kept incomplete multipart upload of {live_object}: being built/uploaded by" in gc.stdout, gc.stdout
    finally:
        direct.client.abort_multipart_upload(Bucket=ENGINE_BUCKET, Key=live_object, UploadId=live_upload)
        leases.release(lease)


# --- 4. --keep groups by every key input but the weights revision; ages from the store --------------------


def test_keep_groups_by_build_not_by_model_and_ages_by_the_store(
    tmp_path: Path, s3_env: dict, s3_server: Service, unique: str
) -> None:
    """`--keep 1`: an older revision of the same build goes; a tp2 build of the same base stays.

    The newest revision's builder had a wrong clock (``created_at`` in 2001): "newest" is the
    store's LastModified.

    Checked on main before this change: groups were (model, GPU) and ages ``created_at``, so
    `--keep 1` kept only the rev1 tp2 engine and removed the rev1 tp1 engine and the rev2 engine
    published last (its created_at the oldest); the restore of the rev2 engine found no manifest.
    """
    uri = f"s3://{ENGINE_BUCKET}/keep-{unique}"
    direct = store_at(uri, s3_server.url)
    engines = {}
    for name, revision, tp_size, created_at in (("rev1-tp1", "1" * 40, 1, None), ("rev1-tp2", "1" * 40, 2, None),
                                               ("rev2-tp1", "2" * 40, 1, "2001-01-01T00:00:00Z")):
        key = key_of(f"{name}-{unique}")
        engine_dir, manifest = fake_engine(tmp_path / name, key, name.encode(), inputs(revision, tp_size))
        if created_at:
            manifest = {**manifest, "created_at": created_at}
        assert direct.upload(engine_dir, manifest).published
        store_clock_past(direct, direct.object_key(key, "manifest.json"))  # published strictly in this order
        engines[name] = key

    gc = nimflow_cli("cache", "gc", "--keep", "1", "--store", uri, "--endpoint-url", s3_server.url, env=s3_env)

    assert gc.returncode == 0, gc.stderr
    assert direct.manifest(engines["rev1-tp1"]) is None, gc.stdout
    assert not direct.client.list_objects_v2(Bucket=ENGINE_BUCKET, Prefix=direct.object_key(engines["rev1-tp1"]) + "/").get("Contents")
    for kept in ("rev1-tp2", "rev2-tp1"):
        restores_whole(direct, engines[kept], tmp_path / f"restored-{kept}")
    assert f"removed engine {engines['rev1-tp1'][:12]}" in gc.stdout and "removed 1 engine(s)" in gc.stdout, gc.stdout


# --- 5. engines served anywhere in the fleet are kept ----------------------------------------------------


def test_live_in_use_marker_from_another_host_keeps_the_engine_and_a_lapsed_one_does_not(
    tmp_path: Path, s3_env: dict, s3_server: Service, unique: str
) -> None:
    """Host B serves engine P (its marker is live); host C's marker on Q lapsed: gc keeps P and removes Q.

    Checked on main before this change (with nimflow/engine_use.py copied in to write the markers):
    gc protected only engines served by containers on its own host, and removed both P and Q.
    """
    from nimflow.engine_use import EngineUse

    uri = f"s3://{ENGINE_BUCKET}/in-use-{unique}"
    direct = store_at(uri, s3_server.url)
    served, lapsed = key_of(f"served-{unique}"), key_of(f"lapsed-{unique}")
    for key in (served, lapsed):
        engine_dir, manifest = fake_engine(tmp_path / key[:8], key, key[:8].encode())
        assert direct.upload(engine_dir, manifest).published
    EngineUse(direct).mark(served, tmp_path / "host-b" / "cache", "chat-b", "nimflow-chat-b-blue")
    short = EngineUse(direct, ttl_seconds=1)
    short.mark(lapsed, tmp_path / "host-c" / "cache", "chat-c")
    wait_until(lambda: not any(m.live for m in short.markers(lapsed)), "host C's marker lapses (1 s TTL)")
    store_clock_past(direct, direct.object_key(lapsed, "manifest.json"))

    gc = nimflow_cli("cache", "gc", "--older-than", "0s", "--store", uri, "--endpoint-url", s3_server.url, env=s3_env)

    assert gc.returncode == 0, gc.stderr
    assert f"kept engine {served[:12]}: in use by chat-b on " in gc.stdout, gc.stdout
    restores_whole(direct, served, tmp_path / "restored")
    assert direct.manifest(lapsed) is None and f"removed engine {lapsed[:12]}" in gc.stdout, gc.stdout
    assert EngineUse(direct).markers(lapsed) == []  # the lapsed marker went with it (IfMatch on the version read)


# --- 6. scratch directories of killed runs ---------------------------------------------------------------


def test_gc_removes_a_killed_runs_scratch_dir_and_keeps_a_live_one(
    tmp_path: Path, s3_env: dict, s3_server: Service, unique: str
) -> None:
    """A `.tmp-restore-*` dir whose process was SIGKILLed goes; one a live process works in stays.

    Checked on main before this change: `nimflow cache gc` never looked at the cache dir, so the
    killed run's directory (and its partial file) was still there.
    """
    cache_dir = tmp_path / "nim-cache"
    spec = {
        "name": f"scratch-{unique}", "source": {"repo_id": "org/base", "revision": "main"},
        "deploy": {"image": "nimflow/none:1", "served_model_name": "test/scratch", "cache_dir": str(cache_dir)},
        "build": {"backend": "nim-optimize", "image": "nimflow/none:1"},
        "cache": {"uri": f"s3://{ENGINE_BUCKET}/scratch-{unique}"},
    }
    config = tmp_path / "spec.yaml"
    config.write_text(yaml.safe_dump(spec))
    script = (
        "import sys, time; from pathlib import Path\n"
        "from nimflow.engine_store import scratch_dir\n"
        "path = scratch_dir(Path(sys.argv[1]), 'restore-0123456789ab')\n"
        "(path / 'rank0.engine').write_bytes(b'partial')\n"
        "print(path, flush=True)\n"
        "time.sleep(600)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script, str(cache_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        killed = Path(process.stdout.readline().strip())
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    live = scratch_dir(cache_dir, "restore-live")  # this process works in it: locked
    assert killed.is_dir() and killed.name.startswith(".tmp-restore-")

    gc = nimflow_cli("cache", "gc", "--keep", "1", "--abandoned-after", "0s", "--config", str(config), env=s3_env)

    assert gc.returncode == 0, gc.stderr
    assert not killed.exists(), gc.stdout
    assert live.is_dir() and f"kept scratch directory {live}: in use by a running process" in gc.stdout, gc.stdout
    assert f"removed scratch directory {killed}" in gc.stdout, gc.stdout


def test_corrupt_manifest_is_reported_not_fatal_and_never_deleted(
    tmp_path: Path, s3_env: dict, s3_server: Service, unique: str
) -> None:
    """One hostile manifest: `cache ls` and `gc` name it as refused and go on with the others.

    Checked on main before this change: both commands stopped at the refused manifest (exit 1),
    listing nothing and removing nothing.
    """
    uri = f"s3://{ENGINE_BUCKET}/refused-{unique}"
    direct = store_at(uri, s3_server.url)
    good, bad = key_of(f"good-{unique}"), key_of(f"bad-{unique}")
    engine_dir, manifest = fake_engine(tmp_path, good, b"GOODBILD")
    assert direct.upload(engine_dir, manifest).published
    direct.client.put_object(Bucket=ENGINE_BUCKET, Key=direct.object_key(bad, "manifest.json"), Body=b'{"schema": 1}')
    store_clock_past(direct, direct.object_key(bad, "manifest.json"))

    listing = nimflow_cli("cache", "ls", "--store", uri, "--endpoint-url", s3_server.url, env=s3_env)
    assert listing.returncode == 0, listing.stderr
    assert good[:12] in listing.stdout and f"refused {direct.uri(bad)}: schema is 1" in listing.stdout, listing.stdout

    gc = nimflow_cli("cache", "gc", "--older-than", "0s", "--store", uri, "--endpoint-url", s3_server.url, env=s3_env)
    assert gc.returncode == 0, gc.stderr
    assert f"removed engine {good[:12]}" in gc.stdout and f"refused {direct.uri(bad)}: never removed" in gc.stdout, gc.stdout
    assert direct.client.get_object(Bucket=ENGINE_BUCKET, Key=direct.object_key(bad, "manifest.json"))["Body"].read() == b'{"schema": 1}'


def test_reconcile_refreshes_the_in_use_marker_of_each_deployment_serving_an_engine(
    tmp_path: Path, s3_env: dict, s3_server: Service, unique: str
) -> None:
    """A running deployment's marker is (re)written; a stopped one or one without an engine gets none;
    a store that refuses is reported as one line, never raised (serving goes on)."""
    from nimflow.deployments_admin import DeploymentStatus
    from nimflow.engine_use import EngineUse, record_in_use
    from nimflow.reconcile import refresh_in_use

    uri = f"s3://{ENGINE_BUCKET}/reconcile-{unique}"
    serving, stopped = key_of(f"serving-{unique}"), key_of(f"stopped-{unique}")
    statuses = [
        DeploymentStatus("chat", "http://127.0.0.1:1", "ready", active="nimflow-chat-blue", active_state="running", engine_key=serving),
        DeploymentStatus("old", None, "no endpoint", active="nimflow-old-blue", active_state="exited", engine_key=stopped),
        DeploymentStatus("weights", "http://127.0.0.1:2", "ready", active="nimflow-weights-blue", active_state="running"),
    ]

    def mark_in(cache: CacheSpec) -> Callable[[DeploymentStatus], str | None]:
        return lambda status: record_in_use(cache, str(status.engine_key), tmp_path / "cache", status.name, status.active)

    assert refresh_in_use(statuses, mark_in(CacheSpec(uri=uri, endpoint_url=s3_server.url))) == []
    use = EngineUse(store_at(uri, s3_server.url))
    assert [m.serving.split(" on ")[0] for m in use.live(serving)] == ["chat"]
    assert use.markers(stopped) == []

    refused = refresh_in_use(statuses, mark_in(CacheSpec(uri=f"s3://no-such-bucket-{unique}/x", endpoint_url=s3_server.url)))
    assert len(refused) == 1 and f"that chat serves engine {serving[:12]}" in refused[0] and "NoSuchBucket" in refused[0]
