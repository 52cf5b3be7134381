"""Engine store faults carry their domain and their retryability, on the real S3 server (moto).

A 503 that outlasts botocore's own retries is an ``EngineStoreError`` (what callers catch) and
transient (what the task retries): ``EngineStoreUnavailable``. A refusal stays a permanent
``EngineStoreError``. Faults are injected by a proxy in front of moto, so botocore sees real answers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from nimflow.tasks.upload import publish_engine

from nimflow.engine_store import write_manifest
from nimflow.errors import EngineStoreError, EngineStoreUnavailable, is_transient
from nimflow.records import Engine
from nimflow.spec import CacheSpec
from nimflow.testbed.fault_proxy import FaultProxy, s3_error
from tests.conftest import ENGINE_BUCKET

pytestmark = pytest.mark.testbed



def _engine(root: Path, key: str) -> Engine:
    engine = root / key
    (engine / "trtllm_engine").mkdir(parents=True)
    (engine / "trtllm_engine" / "rank0.engine").write_bytes(b"engine-bytes" * 1000)
    (engine / "trtllm_engine" / "config.json").write_text("{}")
    (engine / "config.json").write_text('{"model_type": "llama"}')
    manifest = write_manifest(engine, key, {"test": True}, {"tp_size": 1})
    return Engine(engine_key=key, path=str(engine), origin="built", files=len(manifest["files"]), bytes=1)


def test_a_lasting_503_is_an_engine_store_error_and_transient(tmp_path: Path, s3_proxy: FaultProxy, unique: str) -> None:
    engine = _engine(tmp_path, unique * 8)
    status, body, headers = s3_error("ServiceUnavailable")
    s3_proxy.add_fault(method="PUT", path_pattern=r"rank0\.engine", status=status, body=body, headers=headers, count=50)

    with pytest.raises(EngineStoreError) as failed:
        publish_engine(engine, CacheSpec(uri=f"s3://{ENGINE_BUCKET}/domain-{unique}"))

    assert type(failed.value) is EngineStoreUnavailable and is_transient(failed.value)
    assert str(failed.value).startswith(f"publishing engine {engine.engine_key} to s3://{ENGINE_BUCKET}/domain-{unique}/")
    injected = [r[2] for r in s3_proxy.requests if r[3]]
    assert injected and set(injected) == {503}  # on the wire, after botocore's own retries


def test_a_refusal_stays_a_permanent_engine_store_error(tmp_path: Path, testbed_env: dict, unique: str) -> None:
    engine = _engine(tmp_path, unique * 8)

    with pytest.raises(EngineStoreError) as refused:
        publish_engine(engine, CacheSpec(uri=f"s3://no-such-bucket-{unique}/engines"))

    assert type(refused.value) is EngineStoreError and not is_transient(refused.value)
    assert "NoSuchBucket" in str(refused.value) and "create the bucket" in str(refused.value)
