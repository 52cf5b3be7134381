"""Fixtures for the real local test bed: Docker engine, NIM stand-in image, S3, hub, Prefect API.

Every service is started by the tests themselves on free loopback ports. Where a service cannot
be had, a test is skipped with the reason on a developer machine, and FAILS under ``CI=true``:
a missing component is never passed off as coverage.
"""

from __future__ import annotations

import os

# Before nimflow's tasks are imported: their retry options are read at decoration time.
os.environ.setdefault("NIMFLOW_RETRY_DELAY_SECONDS", "0.2")
os.environ.setdefault("PREFECT_SERVER_UI_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from nimflow.testbed import TestbedError
from nimflow.testbed.services import S3_TEST_CREDENTIALS, Service, create_bucket, start_moto, start_prefect_server

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ENGINE_BUCKET = "nimflow-test-engines"


def unavailable(reason: str) -> None:
    """Skip on a developer machine; fail in CI, where every service must be present."""
    if IN_CI:
        pytest.fail(f"test bed component unavailable under CI=true: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_client() -> Any:
    """A client for a running Docker engine (installed and started when root and missing)."""
    from nimflow.testbed.docker_engine import ensure_docker_engine

    try:
        return ensure_docker_engine()
    except TestbedError as exc:
        unavailable(f"no Docker engine: {exc}")


@pytest.fixture(scope="session")
def standin_image(docker_client: Any) -> str:
    """The locally built CPU stand-in for NIM (tag)."""
    from nimflow.testbed.nim_image import build_standin_image, source_tag

    tag = source_tag()  # per stand-in source: other clones on this Docker host keep their own
    build_standin_image(docker_client, tag)
    return tag


@pytest.fixture(scope="session")
def standin_image_2x(docker_client: Any) -> str:
    """The stand-in's NIM 2.x variant: CMD nim-serve, label nimflow.nim-api=2.x, NIM_MODEL_PATH."""
    from nimflow.testbed.nim_image import build_standin_image, source_tag

    tag = source_tag("2.x")
    build_standin_image(docker_client, tag, nim_api="2.x")
    return tag


def standin_variant(docker_client: Any, **variant: Any) -> str:
    """A variant of the stand-in (``examples_layout``, ``trtllm_version``, ``manifest_path`` of
    :func:`nimflow.testbed.nim_image.build_standin_image`), built once per source and variant, under
    its own source-hash tag."""
    from nimflow.testbed.nim_image import build_standin_image, source_tag

    tag = source_tag(**variant)
    build_standin_image(docker_client, tag, **variant)
    return tag


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("testbed")


@pytest.fixture(scope="session")
def s3_server(session_dir: Path) -> Iterator[Service]:
    """moto's S3 server on loopback, with the engine bucket created."""
    try:
        service = start_moto(session_dir / "logs")
    except TestbedError as exc:
        unavailable(f"no S3 server: {exc}")
    create_bucket(service.url, ENGINE_BUCKET)
    yield service
    service.stop()


@pytest.fixture(scope="session")
def hub(session_dir: Path) -> Iterator[Any]:
    """The local Hugging Face Hub endpoint, in this process so tests can read its request log."""
    from nimflow.testbed.hub_server import HubServer

    server = HubServer(session_dir / "hub")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def prefect_api(session_dir: Path) -> Iterator[str]:
    """A real Prefect API (``prefect server start``) that flows in this session report to."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        service = start_prefect_server(session_dir / "prefect", session_dir / "logs")
    except TestbedError as exc:
        unavailable(f"no Prefect API: {exc}")
    with temporary_settings(updates={PREFECT_API_URL: service.url}):
        yield service.url
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()  # deliver queued logs before the API goes away
    service.stop()


@pytest.fixture
def testbed_env(monkeypatch: pytest.MonkeyPatch, s3_server: Service, hub: Any, prefect_api: str,
                session_dir: Path) -> dict[str, str]:
    """Point nimflow at the test bed, exactly as a user points it at real endpoints (image probe
    facts are kept in this session's directory, not the user's cache)."""
    env = {"HF_ENDPOINT": hub.url, "AWS_ENDPOINT_URL": s3_server.url, **S3_TEST_CREDENTIALS,
           "NIMFLOW_IMAGE_PROBE_DIR": str(session_dir / "image-probes")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_TOKEN", "NGC_API_KEY", "NGC_CLI_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    return env


@pytest.fixture
def s3_proxy(s3_server: Service, testbed_env: dict, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A fault proxy in front of moto, used by every S3 client of this process (and its children)."""
    from nimflow.store_conformance import forget_checked_stores
    from nimflow.testbed.fault_proxy import FaultProxy

    forget_checked_stores()  # a later proxy may get an earlier one's port: each store is checked afresh
    with FaultProxy(s3_server.url) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield proxy
    forget_checked_stores()


@pytest.fixture
def unique() -> str:
    """A short unique suffix for repo names, ports' owners and containers."""
    return uuid.uuid4().hex[:8]


@pytest.fixture
def cleanup_containers(docker_client: Any) -> Iterator[list[str]]:
    """Names of containers a test creates; removed afterwards, whatever happened.

    A name also covers the containers of a rollout named after it (``-front``, ``-blue``, ``-green``).
    """
    names: list[str] = []
    yield names
    for name in names:
        for container in docker_client.containers.list(all=True, filters={"name": f"^/{name}(-front|-blue|-green)?$"}):
            container.remove(force=True)


def write_spec(path: Path, spec: dict[str, Any]) -> Path:
    """Write a hosting spec as YAML and return its path."""
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
