"""Engines stay whole on disk and in the store: damaged copies are set aside and healed, never served or spread.

Issue 14, item 2 and "Self-healing". A "host" is a cache directory; engines are obtained with
:func:`nimflow.engine_cache.obtain_engine` (the NIM stand-in builds them, with different bytes on every
build, as real builds do) and published with :func:`nimflow.tasks.upload.publish_engine`, on the real
test bed (Docker engine, moto's S3 server). Faults are made by hand: bytes flipped in a local engine file,
a directory whose manifest never reached the disk, objects deleted or rewritten in the store.

How each test failed on the code before the fix (run in this clone with the fix stashed) is in its
docstring.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from nimflow.tasks.upload import publish_engine

from nimflow.build_lease import BuildLeases, Lease
from nimflow.engine_cache import EnginePlan, obtain_engine, plan_engine
from nimflow.engine_check import check_local_engine, record_verified
from nimflow.engine_store import MANIFEST_NAME, EngineStore, local_engine_path, write_manifest
from nimflow.errors import EngineStoreError, StoredEngineBroken, is_transient
from nimflow.records import Engine
from nimflow.spec import HostingSpec, parse_spec
from nimflow.testbed.fault_proxy import FaultProxy, s3_error
from nimflow.testbed.tiny_model import write_tiny_llama
from tests.conftest import ENGINE_BUCKET
from tests.integration.test_host_model import make_spec

LOG_NAME = "nimflow.test.integrity"
RANK0 = "trtllm_engine/rank0.engine"
#: Generous bound for a state another thread reaches (polled, never slept on).
STATE_DEADLINE_S = 120


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def s3() -> Any:
    return boto3.client("s3", region_name="us-east-1")  # AWS_ENDPOINT_URL comes from testbed_env


class Fleet:
    """One spec's engine on several hosts (cache directories), built by the NIM stand-in."""

    def __init__(self, tmp_path: Path, spec: HostingSpec, plan: EnginePlan, model_dir: Path, docker_client: Any) -> None:
        assert spec.build is not None and spec.cache is not None
        self.tmp_path, self.build, self.cache, self.plan, self.model_dir = tmp_path, spec.build, spec.cache, plan, model_dir
        self.client = docker_client
        self.key = plan.key
        self.store = EngineStore(spec.cache)

    def host(self, name: str) -> Path:
        return self.tmp_path / f"host-{name}"

    def obtain(self, host: str) -> Engine:
        return obtain_engine(self.client, self.plan, self.build, self.cache, self.model_dir, self.host(host),
                             logging.getLogger(LOG_NAME))

    def engine_dir(self, host: str) -> Path:
        return local_engine_path(self.host(host), self.key)

    def set_aside_local(self, host: str) -> list[Path]:
        return sorted((self.host(host) / "engines").glob(f".damaged-{self.key[:12]}-*"))

    def stored_objects(self, *parts: str) -> list[str]:
        prefix = self.store.object_key(self.key, *parts)
        return [o["Key"] for o in s3().list_objects_v2(Bucket=ENGINE_BUCKET, Prefix=prefix).get("Contents", [])]

    def assert_restores_whole(self, host: str) -> dict[str, Any]:
        """A fresh host restores the published engine, every file as the store's manifest says."""
        published = self.store.manifest(self.key)
        assert published is not None
        engine = self.obtain(host)
        assert engine.origin == "engine-store"
        for entry in published["files"]:
            assert sha256(self.engine_dir(host) / entry["path"]) == entry["sha256"], entry["path"]
        return published

    def plant(self, content: bytes) -> dict[str, Any]:
        """Publish a small hand-made engine under the plan's key (what another host's upload leaves)."""
        engine = self.tmp_path / f"planted-{content.decode()}"
        (engine / "trtllm_engine").mkdir(parents=True)
        (engine / RANK0).write_bytes(content * 4096)
        (engine / "trtllm_engine" / "config.json").write_text('{"version": "planted"}')
        (engine / "config.json").write_text('{"model_type": "llama"}')
        manifest = write_manifest(engine, self.key, self.plan.inputs, {"tp_size": 1})
        assert self.store.upload(engine, manifest).published
        return manifest


@pytest.fixture
def fleet(tmp_path: Path, testbed_env: dict, standin_image: str, unique: str, docker_client: Any) -> Fleet:
    model_dir = write_tiny_llama(tmp_path / "model")
    spec = parse_spec(make_spec(tmp_path, f"integrity-{unique}", "org/unused", standin_image))
    assert spec.build is not None
    plan = plan_engine(docker_client, spec.build, model_dir, f"test:integrity-{unique}", None)
    return Fleet(tmp_path, spec, plan, model_dir, docker_client)


def flip_bytes(path: Path) -> None:
    """Damage a file in place, keeping its size (a bad disk block, a stray write)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    with path.open("r+b") as handle:
        handle.write(data)


# --- item 2: local engines are checked before they are served or published -------------------------


@pytest.mark.testbed
def test_corrupt_local_engine_is_set_aside_and_restored_from_the_store(fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    """Bytes flipped in a served rank file (size kept): the next run moves the directory aside and restores.

    Failed on the code before the fix: the second ``obtain_engine`` returned origin ``local-cache``
    with the damaged rank0.engine (the local manifest was trusted without looking at the files).
    """
    built = fleet.obtain("a")
    assert built.origin == "built" and publish_engine(built, fleet.cache).published_by_this_run
    rank = fleet.engine_dir("a") / RANK0
    flip_bytes(rank)
    damaged = rank.read_bytes()

    with caplog.at_level(logging.INFO, logger=LOG_NAME):
        again = fleet.obtain("a")

    assert again.origin == "engine-store"
    published = fleet.store.manifest(fleet.key)
    assert published is not None
    for entry in published["files"]:
        assert sha256(fleet.engine_dir("a") / entry["path"]) == entry["sha256"]
    [aside] = fleet.set_aside_local("a")
    assert (aside / RANK0).read_bytes() == damaged  # kept for a person to look at
    [line] = [r.getMessage() for r in caplog.records if "moved it aside" in r.getMessage()]
    assert RANK0 in line and "sha256" in line and str(aside) in line
    fleet.assert_restores_whole("c")


@pytest.mark.testbed
def test_corrupt_local_engine_is_not_published_and_is_rebuilt(fleet: Fleet) -> None:
    """A damaged local engine is never uploaded; the next run rebuilds it, and that engine restores whole elsewhere.

    Failed on the code before the fix: ``publish_engine`` uploaded the damaged rank0.engine under the
    hashes of the local manifest (no error), so the store held an engine whose restore then failed as
    "content does not match the manifest" on every other host.
    """
    built = fleet.obtain("b")
    assert built.origin == "built"
    flip_bytes(fleet.engine_dir("b") / RANK0)

    with pytest.raises(EngineStoreError) as refused:
        publish_engine(built, fleet.cache)

    assert RANK0 in str(refused.value) and "not published" in str(refused.value) and not is_transient(refused.value)
    assert fleet.store.manifest(fleet.key) is None and not fleet.stored_objects("uploads")
    assert BuildLeases(fleet.store, fleet.cache.build_lease_seconds).current(fleet.key) is None  # released: nobody waits

    rebuilt = fleet.obtain("b")  # the store has none: moved aside and built again
    assert rebuilt.origin == "built" and len(fleet.set_aside_local("b")) == 1
    assert publish_engine(rebuilt, fleet.cache).published_by_this_run
    fleet.assert_restores_whole("c")


@pytest.mark.testbed
@pytest.mark.parametrize("manifest_state", ["absent", "empty"])
def test_half_written_local_engine_is_set_aside_and_restored(fleet: Fleet, manifest_state: str) -> None:
    """An engine directory without a readable manifest (a crash between the rename and the manifest
    reaching the disk) is moved aside and restored.

    Failed on the code before the fix: ``obtain_engine`` downloaded the whole engine again and then
    raised ``OSError: [Errno 39] Directory not empty`` renaming it into place, on every run.
    """
    stored = fleet.plant(b"HALFWRIT")
    partial = fleet.engine_dir("b")
    (partial / "trtllm_engine").mkdir(parents=True)
    (partial / RANK0).write_bytes(b"HALFWRIT" * 1000)  # cut short, as after a crash
    if manifest_state == "empty":
        (partial / MANIFEST_NAME).write_bytes(b"")

    engine = fleet.obtain("b")

    assert engine.origin == "engine-store"
    for entry in stored["files"]:
        assert sha256(partial / entry["path"]) == entry["sha256"]
    [aside] = fleet.set_aside_local("b")
    assert (aside / RANK0).stat().st_size == 8000


# --- self-healing: a store manifest whose files are missing or corrupt is set aside and rebuilt ------


@pytest.mark.testbed
@pytest.mark.parametrize("fault", ["deleted", "corrupt"])
def test_broken_store_engine_is_set_aside_and_rebuilt_once(
    fleet: Fleet, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A manifest whose upload lost a file (gc race) or holds a corrupt one is set aside, the key rebuilt.

    Failed on the code before the fix: the restore raised a permanent ``EngineStoreError``
    (``NoSuchKey`` for the deleted object; "content does not match the manifest" for the corrupt one)
    and every later run on every host failed the same way until a person deleted the manifest.
    """
    planted = fleet.plant(b"BROKENST")
    object_key = fleet.store.object_key(fleet.key, "uploads", planted["upload_id"], RANK0)
    if fault == "deleted":
        s3().delete_object(Bucket=ENGINE_BUCKET, Key=object_key)
    else:
        s3().put_object(Bucket=ENGINE_BUCKET, Key=object_key, Body=b"X" * (8 * 4096))  # same size, other bytes

    with caplog.at_level(logging.INFO, logger=LOG_NAME):
        engine = fleet.obtain("b")

    assert engine.origin == "built"
    [aside_key] = fleet.stored_objects("set-aside")
    assert json.loads(s3().get_object(Bucket=ENGINE_BUCKET, Key=aside_key)["Body"].read()) == planted
    assert fleet.store.manifest(fleet.key) is None  # until the rebuilt engine is published
    [line] = [r.getMessage() for r in caplog.records if "set its manifest aside" in r.getMessage()]
    assert fleet.store.uri(fleet.key) in line and RANK0 in line and f"s3://{ENGINE_BUCKET}/{aside_key}" in line
    assert ("missing" if fault == "deleted" else "sha256") in line and "rebuilding" in line

    assert publish_engine(engine, fleet.cache).published_by_this_run
    published = fleet.assert_restores_whole("c")
    assert published["upload_id"] != planted["upload_id"]


@pytest.mark.testbed
def test_second_broken_manifest_in_one_run_fails_naming_both(fleet: Fleet) -> None:
    """A run heals at most once: a second broken manifest for the key fails permanently, naming both.

    Another host holds the lease, so after setting the first manifest aside this run waits; meanwhile
    a second manifest with a missing file appears. (On the code before the fix the first broken
    manifest already failed the run with ``NoSuchKey``, and nothing was set aside.)
    """
    first = fleet.plant(b"FIRSTBRK")
    s3().delete_object(Bucket=ENGINE_BUCKET, Key=fleet.store.object_key(fleet.key, "uploads", first["upload_id"], RANK0))
    leases = BuildLeases(fleet.store, fleet.cache.build_lease_seconds)
    other_host = leases.try_acquire(fleet.key)
    assert isinstance(other_host, Lease)
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            fleet.obtain("b")
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    runner = threading.Thread(target=run)
    runner.start()
    try:
        deadline = time.monotonic() + STATE_DEADLINE_S
        while not fleet.stored_objects("set-aside"):
            assert time.monotonic() < deadline and runner.is_alive(), outcome
            time.sleep(0.2)
        second = fleet.plant(b"SECONDBR")
        s3().delete_object(Bucket=ENGINE_BUCKET, Key=fleet.store.object_key(fleet.key, "uploads", second["upload_id"], RANK0))
        runner.join(STATE_DEADLINE_S)
    finally:
        leases.release(other_host)
    assert not runner.is_alive()

    error = outcome.get("error")
    assert isinstance(error, StoredEngineBroken) and not is_transient(error), outcome
    assert first["upload_id"] in str(error) and second["upload_id"] in str(error)
    assert len(fleet.stored_objects("set-aside")) == 1  # the second is left for a person (or the next run)
    assert (fleet.store.manifest(fleet.key) or {}).get("upload_id") == second["upload_id"]


@pytest.mark.testbed
def test_foreign_manifest_is_refused_not_set_aside(fleet: Fleet) -> None:
    """A manifest ``check_manifest`` refuses (it may be a newer nimflow's) fails with its message and stays.

    A guard for the self-healing, not a reproduction: it passed on the code before the fix too.
    """
    manifest_key = fleet.store.object_key(fleet.key, "manifest.json")
    s3().put_object(Bucket=ENGINE_BUCKET, Key=manifest_key, Body=json.dumps({"schema": "nimflow-engine-manifest/99"}).encode())

    with pytest.raises(EngineStoreError, match="refused the manifest") as refused:
        fleet.obtain("b")

    assert not isinstance(refused.value, StoredEngineBroken)
    assert not fleet.stored_objects("set-aside") and fleet.stored_objects("manifest.json")



@pytest.mark.testbed
def test_transient_fault_during_a_restore_sets_nothing_aside(
    tmp_path: Path, standin_image: str, unique: str, docker_client: Any, s3_proxy: FaultProxy
) -> None:
    """A store that answers 503 while a file is restored is unavailable, not broken: the manifest stays.

    A guard for the self-healing, not a reproduction: it passed on the code before the fix too.
    """
    model_dir = write_tiny_llama(tmp_path / "model")
    spec = parse_spec(make_spec(tmp_path, f"transient-{unique}", "org/unused", standin_image))
    assert spec.build is not None
    fleet = Fleet(tmp_path, spec, plan_engine(docker_client, spec.build, model_dir, f"test:t-{unique}", None),
                  model_dir, docker_client)
    fleet.plant(b"TRANSIEN")
    status, body, headers = s3_error("ServiceUnavailable")
    s3_proxy.add_fault(method="GET", path_pattern=r"rank0\.engine", status=status, body=body, headers=headers, count=100)

    with pytest.raises(EngineStoreError) as failed:
        fleet.obtain("b")

    assert is_transient(failed.value) and not isinstance(failed.value, StoredEngineBroken)
    assert fleet.store.manifest(fleet.key) is not None and not fleet.stored_objects("set-aside")
    assert not fleet.engine_dir("b").exists()


# --- the verification record: a second local hit does not re-hash ----------------------------------


def wait_for_a_new_file_time(path: Path) -> None:
    """Poll until a file written now gets a later time than ``path`` has: file times have a coarse
    granularity (a clock tick), and a write within the tick of the last one would keep its times."""
    last = max(path.stat().st_mtime_ns, path.stat().st_ctime_ns)
    probe = path.parent / ".time-probe"
    deadline = time.monotonic() + 10
    while True:
        probe.write_bytes(b"")
        if probe.stat().st_ctime_ns > last:
            probe.unlink()
            return
        assert time.monotonic() < deadline, "the file system's clock did not move"
        time.sleep(0.001)


def _local_engine(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    key = hashlib.sha256(str(tmp_path).encode()).hexdigest()
    engine = tmp_path / "engines" / key
    (engine / "trtllm_engine").mkdir(parents=True)
    (engine / RANK0).write_bytes(b"RANKBYTE" * 4096)
    (engine / "trtllm_engine" / "config.json").write_text('{"version": "x"}')
    (engine / "config.json").write_text('{"model_type": "llama"}')
    return engine, write_manifest(engine, key, {"weights": "w"}, {"tp_size": 1})


def test_verification_record_skips_rehashing_until_a_file_changes(tmp_path: Path) -> None:
    """Files verified since their last write are trusted by (size, mtime_ns, ctime_ns, inode); others re-hashed.

    Failed on the code before the fix: there was no local check (``nimflow.engine_check`` did not exist).
    """
    engine, manifest = _local_engine(tmp_path)
    record_verified(engine, manifest)
    assert not (engine / ".verified").exists()  # the record lives outside the directory NIM serves

    first = check_local_engine(engine)
    assert first is not None and first.problem is None and first.rehashed == ()
    config = engine / "config.json"
    wait_for_a_new_file_time(config)
    config.write_text(config.read_text())  # same bytes, new mtime: verified again, once
    second = check_local_engine(engine)
    assert second is not None and second.problem is None and second.rehashed == ("config.json",)
    third = check_local_engine(engine)
    assert third is not None and third.rehashed == ()

    # An in-place edit that puts the old mtime back still changes ctime (only the kernel sets it): caught.
    rank = engine / RANK0
    before = rank.stat()
    wait_for_a_new_file_time(rank)
    flip_bytes(rank)
    os.utime(rank, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert rank.stat().st_mtime_ns == before.st_mtime_ns
    fourth = check_local_engine(engine)
    assert fourth is not None and fourth.manifest is None and fourth.problem is not None
    assert RANK0 in fourth.problem and "sha256" in fourth.problem


@pytest.mark.parametrize(("damage", "said"), [
    ("missing", "missing"), ("truncated", "bytes"), ("no-manifest", MANIFEST_NAME), ("not-a-file", "not a regular file"),
])
def test_local_check_names_what_is_wrong(tmp_path: Path, damage: str, said: str) -> None:
    """Sizes and presence are checked on every hit, whatever the record says.

    Failed on the code before the fix: there was no local check (``nimflow.engine_check`` did not exist);
    a local hit read only the manifest.
    """
    engine, manifest = _local_engine(tmp_path)
    record_verified(engine, manifest)
    rank = engine / RANK0
    if damage == "missing":
        rank.unlink()
    elif damage == "truncated":
        os.truncate(rank, 100)
    elif damage == "no-manifest":
        (engine / MANIFEST_NAME).unlink()
    else:
        rank.unlink()
        rank.mkdir()

    found = check_local_engine(engine)

    assert found is not None and found.manifest is None and found.problem is not None
    assert said in found.problem
    if damage != "no-manifest":
        assert RANK0 in found.problem
    shutil.rmtree(engine)
    assert check_local_engine(engine) is None  # no directory: nothing to check
