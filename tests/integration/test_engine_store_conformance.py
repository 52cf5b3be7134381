"""The engine store's guarantees need a store that enforces conditional writes, and a holder that
knows when its lease is gone: checked on the real S3 server (moto) behind the fault proxy.

* A store that ignores ``If-None-Match`` / ``If-Match`` is refused before the first write (unless
  the spec says ``cache.single_writer: true``).
* ``409 ConditionalRequestConflict`` on the manifest write is retried, and publishes.
* A holder that lost its lease (paused past the TTL, renews hung) does not publish.
* A store that answers without a ``Date`` header still lets a crashed holder's lease expire.

Each test says how it failed on old main (356d66a): run in this clone with only the proxy's
``strip_headers`` and the names the tests import (``PROBE_DIR``, ``forget_checked_stores``,
``BuildLeaseLost``) added, before any of the fix.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from nimflow.tasks.upload import publish_engine

from nimflow.build_lease import BuildLeases, Lease, LeaseHolder
from nimflow.engine_cache import EnginePlan, obtain_engine
from nimflow.engine_store import EngineStore, read_local_manifest, write_manifest
from nimflow.errors import BuildLeaseLost, EngineStoreError, is_transient
from nimflow.records import Engine
from nimflow.spec import BuildSpec, CacheSpec
from nimflow.store_conformance import PROBE_DIR
from nimflow.testbed.fault_proxy import FaultProxy, s3_error
from nimflow.testbed.services import Service
from tests.conftest import ENGINE_BUCKET

pytestmark = pytest.mark.testbed

CONDITIONAL_HEADERS = ("If-None-Match", "If-Match")



def _key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _engine(root: Path, key: str, content: bytes = b"engine-bytes") -> Engine:
    """A small engine directory with its local manifest, as the compile stage leaves it."""
    engine = root / hashlib.sha256(content).hexdigest()[:8]
    (engine / "trtllm_engine").mkdir(parents=True)
    (engine / "trtllm_engine" / "rank0.engine").write_bytes(content * 1000)
    (engine / "trtllm_engine" / "config.json").write_text("{}")
    (engine / "config.json").write_text('{"model_type": "llama"}')
    manifest = write_manifest(engine, key, {"test": True}, {"tp_size": 1})
    return Engine(engine_key=key, path=str(engine), origin="built", files=len(manifest["files"]), bytes=1)


def _objects(prefix: str) -> list[str]:
    """Every object key under ``prefix`` in the engine bucket."""
    client = boto3.client("s3", region_name="us-east-1")
    return [o["Key"] for o in client.list_objects_v2(Bucket=ENGINE_BUCKET, Prefix=prefix).get("Contents", [])]


def _taken(leases: BuildLeases, key: str) -> Lease | None:
    """The lease of ``key`` if this try took it, else None."""
    got = leases.try_acquire(key)
    return got if isinstance(got, Lease) else None


def _poll(condition: Callable[[], Any], *, bound: float, what: str) -> Any:
    """``condition()`` once it is truthy, polled for at most ``bound`` seconds."""
    deadline = time.monotonic() + bound
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what}: not within {bound:g}s"
        time.sleep(0.2)
    return value


# --- a store that ignores conditional writes --------------------------------------------------------


def test_a_store_that_ignores_conditional_writes_is_refused(
    tmp_path: Path, s3_proxy: FaultProxy, unique: str
) -> None:
    """Through a proxy that strips If-None-Match / If-Match, the upload and compile stages refuse the store
    before their first write, naming the store, the ignored conditions and the fix; nothing is published.

    Reproduced on old main (356d66a) with this proxy: two BuildLeases.try_acquire calls on one key BOTH
    returned a Lease, two EngineStore.upload calls of different builds BOTH returned published=True (the
    second manifest replaced the first), and a release with the first holder's stale ETag deleted the
    second holder's lease. This test failed there with "DID NOT RAISE": publish_engine published
    through the non-conforming store.
    """
    s3_proxy.strip_headers(request=CONDITIONAL_HEADERS)
    prefix = f"ignored-{unique}"
    cache = CacheSpec(uri=f"s3://{ENGINE_BUCKET}/{prefix}")
    engine = _engine(tmp_path, _key(prefix))

    with pytest.raises(EngineStoreError) as refused:
        publish_engine(engine, cache)

    message = str(refused.value)
    assert not is_transient(refused.value)
    assert s3_proxy.url in message and f"bucket {ENGINE_BUCKET}" in message
    assert "If-None-Match" in message and "If-Match" in message
    assert "conditional writes" in message and "cache.single_writer: true" in message
    assert _objects(f"{prefix}/") == []  # refused before any write, probe removed

    # The compile stage refuses the same store before it looks up, leases or builds anything.
    plan = EnginePlan(key=engine.engine_key, inputs={}, target=None, model_config={}, serving_differences=[])  # type: ignore[arg-type]
    build = BuildSpec(backend="trtllm-build", image="nimflow/never-run:1")
    model_dir = tmp_path / "checkpoint"
    model_dir.mkdir()
    with pytest.raises(EngineStoreError, match="cache.single_writer: true"):
        obtain_engine(None, plan, build, cache, model_dir, tmp_path / "nim-cache", logging.getLogger("test"))  # type: ignore[arg-type]
    assert _objects(f"{prefix}/") == []


def test_a_single_writer_store_proceeds_with_a_warning(
    tmp_path: Path, s3_proxy: FaultProxy, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With cache.single_writer: true the same store is used (one host, no fleet guarantees), with a warning.

    On old main (356d66a) CacheSpec refused the field: "single_writer: Extra inputs are not permitted".
    """
    s3_proxy.strip_headers(request=CONDITIONAL_HEADERS)
    prefix = f"single-{unique}"
    cache = CacheSpec(uri=f"s3://{ENGINE_BUCKET}/{prefix}", single_writer=True)
    engine = _engine(tmp_path, _key(prefix))

    with caplog.at_level(logging.WARNING, logger="nimflow.store_conformance"):
        published = publish_engine(engine, cache)

    assert published.published_by_this_run
    assert any("single_writer" in r.getMessage() and "If-None-Match" in r.getMessage() for r in caplog.records)
    assert f"{prefix}/{engine.engine_key}/manifest.json" in _objects(f"{prefix}/")
    assert not _objects(f"{prefix}/{PROBE_DIR}/")


def test_a_store_fault_during_the_check_stays_transient_and_is_not_remembered(
    tmp_path: Path, s3_proxy: FaultProxy, unique: str
) -> None:
    """The store answers 503 to the probe (past botocore's retries): the check fails TRANSIENT (the task
    retries) and remembers nothing, so the retry probes again, passes and publishes.

    New behaviour (old main had no check; there this test failed with "DID NOT RAISE").
    """
    prefix = f"probe503-{unique}"
    cache = CacheSpec(uri=f"s3://{ENGINE_BUCKET}/{prefix}")
    engine = _engine(tmp_path, _key(prefix))
    s3_proxy.add_fault(method="PUT", path_pattern=rf"/{re.escape(PROBE_DIR)}/", count=10, **s3_error("SlowDown")._asdict())

    with pytest.raises(EngineStoreError) as unavailable:
        publish_engine(engine, cache)

    assert is_transient(unavailable.value) and "enforces conditional writes" in str(unavailable.value)
    s3_proxy.clear_faults()  # the store recovers
    assert publish_engine(engine, cache).published_by_this_run  # the retry probes again
    assert not _objects(f"{prefix}/{PROBE_DIR}/")


# --- 409 ConditionalRequestConflict ------------------------------------------------------------------


def test_a_409_conflict_on_the_manifest_is_retried_and_publishes(
    tmp_path: Path, s3_proxy: FaultProxy, unique: str
) -> None:
    """AWS answers 409 ConditionalRequestConflict to concurrent conditional writes and says to retry: two of
    them on the manifest PUT are retried, the engine is published and the build lease released.

    On old main (356d66a) this failed: publish_engine raised a PERMANENT EngineStoreError ("ClientError: An
    error occurred (ConditionalRequestConflict) when calling the PutObject operation"), released the lease
    and left the complete upload without a manifest.
    """
    prefix = f"conflict-{unique}"
    cache = CacheSpec(uri=f"s3://{ENGINE_BUCKET}/{prefix}")
    engine = _engine(tmp_path, _key(prefix))
    lease = BuildLeases(EngineStore(cache), cache.build_lease_seconds).try_acquire(engine.engine_key)
    assert isinstance(lease, Lease)
    conflict = s3_error("ConditionalRequestConflict", "A conflicting conditional operation is currently in progress "
                        "against this resource. Please try again.")
    s3_proxy.add_fault(method="PUT", path_pattern=r"/manifest\.json", count=2, **conflict._asdict())

    published = publish_engine(engine.model_copy(update={"build_lease": lease.token}), cache)

    assert published.published_by_this_run
    assert s3_proxy.pending_faults == 0  # both conflicts were answered, and retried past
    stored = EngineStore(cache).manifest(engine.engine_key)
    assert stored is not None and stored["files"]
    assert f"{prefix}/{engine.engine_key}/lease.json" not in _objects(f"{prefix}/")


# --- a holder that lost its lease --------------------------------------------------------------------

_HOLDER = """
import sys
from pathlib import Path
from nimflow.build_lease import BuildLeases, Lease, LeaseHolder
from nimflow.engine_store import EngineStore, read_local_manifest
from nimflow.records import Engine
from nimflow.spec import CacheSpec
from nimflow.tasks.upload import publish_engine

uri, key, engine_dir, ttl = sys.argv[1:5]
cache = CacheSpec(uri=uri, build_lease_seconds=float(ttl))
lease = BuildLeases(EngineStore(cache), cache.build_lease_seconds).try_acquire(key)
assert isinstance(lease, Lease), lease
print("LEASE", lease.token, flush=True)
files = read_local_manifest(Path(engine_dir))["files"]
engine = Engine(engine_key=key, path=engine_dir, origin="built", files=len(files), bytes=1, build_lease=lease.token)
print("PUBLISHED", publish_engine(engine, cache).published_by_this_run, flush=True)
"""


def test_a_paused_lease_holder_does_not_publish(tmp_path: Path, s3_proxy: FaultProxy, unique: str) -> None:
    """Host A (a process) takes the lease and uploads; it is paused (SIGSTOP) mid-upload past the TTL; host B
    takes the expired lease and uploads its own build. Resumed, A must not publish: it says it lost the
    lease, and B's engine is the one published.

    On old main (356d66a) this failed: A, resumed, published its manifest ("PUBLISHED True", exit 0) although
    B held the lease; B's manifest write then lost (PreconditionFailed) and B's upload was removed.
    """
    prefix = f"paused-{unique}"
    ttl = 3.0
    cache = CacheSpec(uri=f"s3://{ENGINE_BUCKET}/{prefix}", build_lease_seconds=ttl)
    key = _key(prefix)
    engine_a = _engine(tmp_path, key, b"HOST-A-BUILD")
    engine_b = _engine(tmp_path, key, b"HOST-B-BUILD")
    # A's upload of its engine file hangs in the proxy, so A is paused before it could publish.
    s3_proxy.add_hang(method="PUT", path_pattern=r"/uploads/[0-9a-f]+/trtllm_engine/rank0\.engine")
    env = {**os.environ, "NIMFLOW_S3_READ_TIMEOUT_SECONDS": "2"}
    host_a = subprocess.Popen([sys.executable, "-c", _HOLDER, cache.uri, key, engine_a.path, str(ttl)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert host_a.stdout is not None
        assert host_a.stdout.readline().startswith("LEASE "), host_a.communicate(timeout=60)
        _poll(lambda: s3_proxy.hanging == 1 or host_a.poll() is not None, bound=60, what="A's upload reaching the proxy")
        assert host_a.poll() is None
        os.kill(host_a.pid, signal.SIGSTOP)

        leases_b = BuildLeases(EngineStore(cache), ttl)
        lease_b = _poll(lambda: _taken(leases_b, key), bound=60, what="B taking over A's expired lease")
        os.kill(host_a.pid, signal.SIGCONT)
        out, err = host_a.communicate(timeout=120)
    finally:
        if host_a.poll() is None:
            os.kill(host_a.pid, signal.SIGCONT)
            host_a.kill()
            host_a.wait()

    assert host_a.returncode != 0, f"A published although it lost the lease: {out}"
    assert "lost the build lease" in err and "not publishing" in err, err[-3000:]
    assert EngineStore(cache).manifest(key) is None  # A left no manifest

    with leases_b.kept_alive(lease_b) as held:
        outcome = EngineStore(cache).upload(Path(engine_b.path), _local_manifest(engine_b), before_publish=held.confirm)
    leases_b.release(held.lease)
    published = EngineStore(cache).manifest(key)
    assert outcome.published and published is not None and published["upload_id"] == outcome.upload_id


def _local_manifest(engine: Engine) -> dict[str, Any]:
    manifest = read_local_manifest(Path(engine.path))
    assert manifest is not None
    return manifest


def test_a_holder_whose_renewals_hang_does_not_publish(tmp_path: Path, s3_proxy: FaultProxy, unique: str) -> None:
    """Every renewal of the lease hangs in the store, and the upload takes longer than the TTL: each renew
    gives up long before the TTL (so it cannot outlive the lease), the lease expires, another host could take
    it, and the holder refuses to publish, saying so. Nothing is published.

    On old main (356d66a) this failed with "DID NOT RAISE BuildLeaseLost": the renewal waited on the hung
    request (botocore's retries, 120 s each), the lease expired, and publish_engine published the manifest anyway.
    """
    prefix = f"hung-{unique}"
    ttl = 4.0
    cache = CacheSpec(uri=f"s3://{ENGINE_BUCKET}/{prefix}", build_lease_seconds=ttl)
    engine = _engine(tmp_path, _key(prefix))
    leases = BuildLeases(EngineStore(cache), ttl)
    lease = leases.try_acquire(engine.engine_key)
    assert isinstance(lease, Lease)
    s3_proxy.add_hang(method="PUT", path_pattern=r"/lease\.json", count=1000)
    s3_proxy.add_latency(ttl + 2, method="PUT", path_pattern=r"rank0\.engine")

    with pytest.raises(BuildLeaseLost) as lost:
        publish_engine(engine.model_copy(update={"build_lease": lease.token}), cache)

    assert is_transient(lost.value)
    assert "lost the build lease" in str(lost.value) and "not renewed for" in str(lost.value)
    assert EngineStore(cache).manifest(engine.engine_key) is None
    # The hung renewals were given up by the client (each one shows up once its client hung up).
    assert len([e for e in s3_proxy.exchanges if e.fault == "hang"]) >= 2
    s3_proxy.clear_faults()
    assert isinstance(leases.try_acquire(engine.engine_key), Lease)  # expired: another host may take it now


def test_a_build_whose_lease_was_lost_is_not_used_and_the_retry_restores_the_winner(
    tmp_path: Path, s3_proxy: FaultProxy, unique: str, standin_image: str, docker_client: Any
) -> None:
    """The compile stage: while the stand-in build runs (longer than the TTL) every renewal of the lease hangs,
    so the lease is lost; the finished build is then not used (no local engine, no scratch left) and the
    stage fails TRANSIENT. Another host publishes the key meanwhile; the retry restores that engine.

    Checked with old main's _build (this change's lease check removed): it failed with "AssertionError: None":
    obtain_engine returned the build as "built", published into the host's cache, although the lease had
    gone unrenewed past its TTL (any host could have taken it over).
    """
    from nimflow.engine_cache import plan_engine
    from nimflow.engine_store import local_engine_path
    from nimflow.testbed.tiny_model import write_tiny_llama

    prefix = f"buildlost-{unique}"
    ttl = 3.0
    cache = CacheSpec(uri=f"s3://{ENGINE_BUCKET}/{prefix}", build_lease_seconds=ttl)
    build = BuildSpec(backend="nim-optimize", image=standin_image, max_seq_len=1024, max_batch_size=4,
                      max_num_tokens=1024, timeout_seconds=120, env={"NIMSTANDIN_BUILD_SECONDS": "8"})
    model_dir = write_tiny_llama(tmp_path / "checkpoint")
    cache_dir = tmp_path / "nim-cache"
    plan = plan_engine(docker_client, build, model_dir, f"local:{unique}", None)
    log = logging.getLogger("test")

    def first_attempt() -> BaseException | None:
        try:
            obtain_engine(docker_client, plan, build, cache, model_dir, cache_dir, log)
        except BaseException as exc:  # noqa: BLE001 - the outcome is what is asserted
            return exc
        return None

    with ThreadPoolExecutor(max_workers=1) as pool:
        attempt = pool.submit(first_attempt)
        _poll(lambda: _objects(f"{prefix}/{plan.key}/lease.json") or attempt.done(), bound=60, what="the build lease taken")
        s3_proxy.add_hang(method="PUT", path_pattern=r"/lease\.json", count=1000)  # every renewal from now on
        failed = attempt.result(timeout=300)

    assert isinstance(failed, BuildLeaseLost) and is_transient(failed), repr(failed)
    assert "lost the build lease" in str(failed)
    assert not local_engine_path(cache_dir, plan.key).exists()  # the build was not used
    assert not [p.name for p in (cache_dir / "engines").iterdir() if p.name.startswith(".tmp-")]

    s3_proxy.clear_faults()  # another host takes the expired lease and publishes its build
    winner = _engine(tmp_path, plan.key, b"WINNER-BUILD")
    other = BuildLeases(EngineStore(cache), ttl)
    taken = _poll(lambda: _taken(other, plan.key), bound=60, what="the other host taking the lease")
    with other.kept_alive(taken) as held:
        EngineStore(cache).upload(Path(winner.path), _local_manifest(winner), before_publish=held.confirm)
    other.release(held.lease)

    retried = obtain_engine(docker_client, plan, build, cache, model_dir, cache_dir, log)  # the task's retry
    assert retried.origin == "engine-store"
    restored = read_local_manifest(local_engine_path(cache_dir, plan.key))
    assert restored is not None and restored["upload_id"] == _local_manifest(winner)["upload_id"]


def test_a_renewal_whose_answer_was_lost_keeps_the_lease(s3_proxy: FaultProxy, unique: str) -> None:
    """The store wrote a renewal but its answer never arrived, so botocore sent it again on the ETag the holder
    knew and got 412: the lease is still the holder's (its token is in it), not lost; others still wait.

    On old main (356d66a) this failed: renew answered None (lost) to the retried renewal.
    """
    store = EngineStore(CacheSpec(uri=f"s3://{ENGINE_BUCKET}/renewed-{unique}"))
    key = _key(f"renewed-{unique}")
    leases = BuildLeases(store, ttl_seconds=60)
    lease = leases.try_acquire(key)
    assert isinstance(lease, Lease)
    landed = leases.renew(lease)  # written by the store; its answer is the one "lost"
    assert landed is not None

    again = leases.renew(lease)  # the retry, conditioned on the ETag the holder still knows

    assert again is not None and again.token == lease.token and again.etag == landed.etag
    assert isinstance(BuildLeases(store, ttl_seconds=60).try_acquire(key), LeaseHolder)


# --- no Date header ----------------------------------------------------------------------------------


def test_without_a_date_header_an_expired_lease_is_taken_over(s3_proxy: FaultProxy, unique: str) -> None:
    """A store whose answers carry no Date header: a lease nobody renews still expires (its age is measured
    against the LastModified of a fresh probe object), and no probe object is left behind.

    On old main (356d66a) this failed: the lease's own LastModified stood in for "now", its age was always 0,
    and the second host never got the lease (the poll ran out).
    """
    s3_proxy.strip_headers(response=("Date",))
    prefix = f"nodate-{unique}"
    store = EngineStore(CacheSpec(uri=f"s3://{ENGINE_BUCKET}/{prefix}"))
    key = _key(prefix)
    first = BuildLeases(store, ttl_seconds=2).try_acquire(key)
    assert isinstance(first, Lease)
    assert all(e.status for e in s3_proxy.exchanges)  # the proxy answers, without Date

    taker = BuildLeases(store, ttl_seconds=2)
    taken = _poll(lambda: _taken(taker, key), bound=60, what="taking the expired lease")

    assert taken.token != first.token
    assert store.engine_keys() == [key]
    assert _objects(f"{prefix}/{PROBE_DIR}/") == []


def test_gc_deletes_nothing_in_a_store_that_ignores_conditional_writes(
    tmp_path: Path, s3_proxy: FaultProxy, s3_server: Service, unique: str
) -> None:
    """gc's safety rests on If-Match deletes and the lease: in a store that ignores them it removes nothing.

    On old main gc deleted the engine through this proxy (it never checked the store).
    """
    from nimflow.cache_admin import plan_gc, run_gc

    prefix = f"gc-ignored-{unique}"
    engine = _engine(tmp_path, _key(prefix))
    direct = EngineStore(CacheSpec(uri=f"s3://{ENGINE_BUCKET}/{prefix}", endpoint_url=s3_server.url))
    manifest = read_local_manifest(Path(engine.path))
    assert manifest is not None and direct.upload(Path(engine.path), manifest).published
    stored = _objects(f"{prefix}/")

    s3_proxy.strip_headers(request=CONDITIONAL_HEADERS)
    store = EngineStore(CacheSpec(uri=f"s3://{ENGINE_BUCKET}/{prefix}"))
    deadline = time.monotonic() + 30  # the store's clock has 1 s steps: older than 0 s once it ticks
    while not (plan := plan_gc(store, keep=None, older_than=timedelta(0), abandoned_after=timedelta(hours=1),
                               in_use={})).engines and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [s.manifest["engine_key"] for s in plan.engines] == [engine.engine_key]
    with pytest.raises(EngineStoreError, match="cache.single_writer: true"):
        run_gc(store, plan, dry_run=False)

    assert _objects(f"{prefix}/") == stored
