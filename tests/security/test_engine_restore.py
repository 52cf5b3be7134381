"""An engine store's manifest is checked before a byte of it is restored (issue 13).

Whoever can write the engine store can publish a manifest for any key. Each hostile manifest is
planted in the test bed's S3 under the key a spec needs (computed as ``nimflow plan`` does), then
the spec is hosted: ``nimflow host`` as a subprocess, or the ``host_model`` flow. The run must be
refused with a ``ManifestRefused`` (an ``EngineStoreError``) naming the store URI and the offending entry, write nothing
outside the restore directory (the escape targets and the parent directories are checked), and
leave no engine published on this host.

Checked before the fix: on the code as it was, the ``../`` and absolute entries were written next to
the cache directory and their hash check passed (it compares with the same manifest); the manifest
of another key and the 4 TiB declaration were restored as the engine and the runs went on to deploy.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from nimflow.flows.host_model import host_model

from nimflow.engine_store import MANIFEST_SCHEMA, EngineStore, local_engine_path
from nimflow.errors import EngineStoreError
from nimflow.plan import make_plan
from nimflow.spec import CacheSpec, parse_spec
from nimflow.testbed.services import Service
from nimflow.testbed.tiny_model import write_tiny_llama
from tests.conftest import ENGINE_BUCKET, write_spec
from tests.integration.test_host_model import make_spec
from tests.security.test_paths import assert_nothing_escaped, holding, nimflow_host, refusal_line, s3_client

pytestmark = pytest.mark.testbed
UPLOAD_ID = "0123456789abcdef01234567"
TIB = 1 << 40


def _entry(path: str, content: bytes, size: int | None = None) -> dict[str, Any]:
    return {"path": path, "size": len(content) if size is None else size, "sha256": hashlib.sha256(content).hexdigest()}


def _plant(s3_server: Service, prefix: str, key: str, files: list[tuple[dict[str, Any], bytes]], *,
           engine_key: str | None = None) -> str:
    """Put the files under one upload of ``key`` and a manifest naming them; return the manifest's URI."""
    client = s3_client(s3_server)
    for entry, content in files:
        client.put_object(Bucket=ENGINE_BUCKET, Key=f"{prefix}/{key}/uploads/{UPLOAD_ID}/{entry['path']}", Body=content)
    manifest = {
        "schema": MANIFEST_SCHEMA, "engine_key": engine_key or key, "key_inputs": {"weights": "w"}, "engine": {"tp_size": 1},
        "upload_id": UPLOAD_ID, "built_by": "elsewhere", "created_at": "2025-01-01T00:00:00Z",
        "files": [entry for entry, _ in files],
    }
    client.put_object(Bucket=ENGINE_BUCKET, Key=f"{prefix}/{key}/manifest.json", Body=json.dumps(manifest).encode())
    return f"s3://{ENGINE_BUCKET}/{prefix}/{key}/manifest.json"


def _hosted_spec(tmp_path: Path, unique: str, standin_image: str) -> tuple[dict[str, Any], str]:
    """A spec that builds an engine (so it restores one from the store first) and the engine key it needs."""
    base = write_tiny_llama(tmp_path / "base")
    spec = make_spec(tmp_path, f"restore-{unique}", "org/unused", standin_image, deadline_seconds=20)
    spec["source"] = {"local_dir": str(base)}
    key = make_plan(parse_spec(spec)).engine_key
    assert key is not None
    return spec, key


ENGINE_FILE = ("trtllm_engine/rank0.engine", b"ENGINE-BYTES")


def test_manifest_entry_with_dotdot_is_refused(
    tmp_path: Path, testbed_env: dict, prefect_api: str, s3_server: Service, standin_image: str, unique: str,
    cleanup_containers: list,
) -> None:
    spec, key = _hosted_spec(tmp_path, unique, standin_image)
    cleanup_containers.append(f"nimflow-{spec['name']}")
    marker = f"MARKER-{unique}".encode()
    # The restore directory is <cache>/engines/.tmp-restore-*: three levels below tmp_path.
    hostile = f"../../../escaped-{unique}.py"
    uri = _plant(s3_server, spec["name"], key, [(_entry(*ENGINE_FILE), ENGINE_FILE[1]), (_entry(hostile, marker), marker)])

    line = refusal_line(nimflow_host(write_spec(tmp_path / "spec.yaml", spec), {**testbed_env, "PREFECT_API_URL": prefect_api}))

    assert "ManifestRefused" in line and uri in line and repr(hostile) in line, line  # an EngineStoreError
    cache_dir = Path(spec["deploy"]["cache_dir"])
    assert_nothing_escaped(tmp_path, cache_dir, [tmp_path / f"escaped-{unique}.py"], marker)
    assert not local_engine_path(cache_dir, key).exists()


def _refused_run(tmp_path: Path, spec: dict[str, Any]) -> EngineStoreError:
    state = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)), return_state=True)
    assert state.is_failed(), "the run should have failed"
    with pytest.raises(EngineStoreError) as caught:
        state.result()
    return caught.value


def test_manifest_entry_with_absolute_path_is_refused(
    tmp_path: Path, testbed_env: dict, prefect_api: str, s3_server: Service, standin_image: str, unique: str,
    cleanup_containers: list,
) -> None:
    spec, key = _hosted_spec(tmp_path, unique, standin_image)
    cleanup_containers.append(f"nimflow-{spec['name']}")
    marker, target = f"MARKER-{unique}".encode(), tmp_path / f"escaped-abs-{unique}.py"
    uri = _plant(s3_server, spec["name"], key, [(_entry(*ENGINE_FILE), ENGINE_FILE[1]), (_entry(str(target), marker), marker)])

    error = _refused_run(tmp_path, spec)

    assert uri in str(error) and repr(str(target)) in str(error) and "absolute" in str(error)
    cache_dir = Path(spec["deploy"]["cache_dir"])
    assert_nothing_escaped(tmp_path, cache_dir, [target], marker)
    assert not local_engine_path(cache_dir, key).exists()


def test_manifest_of_another_engine_key_is_refused(
    tmp_path: Path, testbed_env: dict, prefect_api: str, s3_server: Service, standin_image: str, unique: str,
    cleanup_containers: list,
) -> None:
    """A well-formed engine published under this key but naming another key in its manifest."""
    spec, key = _hosted_spec(tmp_path, unique, standin_image)
    cleanup_containers.append(f"nimflow-{spec['name']}")
    other = hashlib.sha256(b"another engine").hexdigest()
    uri = _plant(s3_server, spec["name"], key, [(_entry(*ENGINE_FILE), ENGINE_FILE[1])], engine_key=other)

    error = _refused_run(tmp_path, spec)

    assert uri in str(error) and other in str(error) and key in str(error)
    cache_dir = Path(spec["deploy"]["cache_dir"])
    assert not local_engine_path(cache_dir, key).exists() and not holding(cache_dir, ENGINE_FILE[1])


def test_manifest_declaring_more_than_the_size_bound_is_refused(
    tmp_path: Path, testbed_env: dict, prefect_api: str, s3_server: Service, standin_image: str, unique: str,
    cleanup_containers: list,
) -> None:
    """A manifest declaring 4 TiB is refused before anything is fetched (the object itself is small:
    the old code restored it, since the size was never compared with anything)."""
    spec, key = _hosted_spec(tmp_path, unique, standin_image)
    cleanup_containers.append(f"nimflow-{spec['name']}")
    huge = _entry(*ENGINE_FILE, size=4 * TIB)
    uri = _plant(s3_server, spec["name"], key, [(huge, ENGINE_FILE[1])])

    error = _refused_run(tmp_path, spec)

    assert uri in str(error) and "bytes" in str(error)
    cache_dir = Path(spec["deploy"]["cache_dir"])
    assert not local_engine_path(cache_dir, key).exists() and not holding(cache_dir, ENGINE_FILE[1])


# --- EngineStore.restore on its own (focused) -----------------------------------------------------------


def test_restore_checks_the_manifest_it_is_given(tmp_path: Path, testbed_env: dict, s3_server: Service, unique: str) -> None:
    """``restore`` trusts no manifest, even one handed to it directly: a ``..`` entry writes nothing."""
    key = hashlib.sha256(unique.encode()).hexdigest()
    marker = f"MARKER-{unique}".encode()
    _plant(s3_server, f"direct-{unique}", key, [(_entry(*ENGINE_FILE), ENGINE_FILE[1]), (_entry("../escaped", marker), marker)])
    manifest = json.loads(s3_client(s3_server).get_object(
        Bucket=ENGINE_BUCKET, Key=f"direct-{unique}/{key}/manifest.json")["Body"].read())
    store = EngineStore(CacheSpec(uri=f"s3://{ENGINE_BUCKET}/direct-{unique}"))
    dest = tmp_path / "restore" / "dest"

    with pytest.raises(EngineStoreError, match="'../escaped'"):
        store.restore(manifest, dest, engine_key=key)
    with pytest.raises(EngineStoreError, match="refused"):
        store.manifest(key)
    assert not holding(tmp_path, marker) and not (tmp_path / "restore" / "escaped").exists()


def test_restore_stops_an_object_larger_than_declared(tmp_path: Path, testbed_env: dict, s3_server: Service, unique: str) -> None:
    """An object that grew past its declared size is cut off, not streamed to the end of the disk."""
    key = hashlib.sha256(unique.encode()).hexdigest()
    declared = _entry(*ENGINE_FILE)
    grown = ENGINE_FILE[1] + bytes(3 << 20)  # the bytes on S3 are 3 MiB longer than the manifest says
    _plant(s3_server, f"grown-{unique}", key, [(declared, grown)])
    store = EngineStore(CacheSpec(uri=f"s3://{ENGINE_BUCKET}/grown-{unique}"))
    manifest = store.manifest(key)
    assert manifest is not None
    dest = tmp_path / "dest"

    with pytest.raises(EngineStoreError, match="larger than"):
        store.restore(manifest, dest, engine_key=key)
    written = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    assert written < len(grown)
