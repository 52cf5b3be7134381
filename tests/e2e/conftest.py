"""The unattended set-up, as an operator runs it: a Prefect server with triggers and the UI,
``nimflow bootstrap``, and two process workers (two "GPU hosts" with their own cache directories).

Everything is real and on loopback: the server, the workers, the flows they run, the Docker engine,
S3 (moto) and the Hub. One set-up serves every test of this package (it is torn down after the last).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from nimflow.testbed import TestbedError
from nimflow.testbed.services import S3_TEST_CREDENTIALS, Service, free_port, start_prefect_server
from tests.conftest import unavailable, write_spec

REPO_ROOT = Path(__file__).resolve().parents[2]
POOL = "nimflow-gpu"
HOSTS = ("host-a", "host-b")
#: How long a flow run may take on the test bed (download, stand-in build, upload, rollout): generous.
RUN_DEADLINE = 300.0
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = RUN_DEADLINE, every: float = 1.0) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)
    pytest.fail(f"timed out waiting for {what} (last seen: {last!r})")


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


@dataclass
class Worker:
    """``prefect worker start`` as a child process (its own process group, with its flow runs)."""

    name: str
    process: subprocess.Popen
    log_path: Path
    cache_dir: Path

    def stop(self) -> None:
        """A worker needs two signals to stop (prefect.md §3.4); then the group is killed."""
        for _ in range(2):
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGINT)
                time.sleep(1.0)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # flow-run subprocesses left behind, if any
        except OSError:
            pass
        if self.process.poll() is None:
            self.process.wait(timeout=5)


@dataclass
class E2E:
    """What the tests need to reach the set-up."""

    api_url: str
    ui_url: str
    env: dict[str, str]
    specs_dir: Path
    specs: dict[str, dict[str, Any]]  # by name
    hub: Any
    s3_url: str
    docker: Any
    workers: list[Worker]
    logs: Path
    started_at: datetime
    work_dir: Path
    published: dict[str, int] = field(default_factory=dict)
    shas: dict[str, str] = field(default_factory=dict)  # the head of main, by spec

    # --- commands, as an operator types them ------------------------------------------------
    def run_cli(self, *argv: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(list(argv), capture_output=True, text=True, env=self.env, cwd=REPO_ROOT, timeout=timeout)
        if check:
            assert result.returncode == 0, (
                f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def nimflow(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run_cli(_bin("nimflow"), *args, **kwargs)

    def prefect(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run_cli(_bin("prefect"), *args, **kwargs)

    # --- the Hub ---------------------------------------------------------------------------
    def publish(self, spec_name: str) -> str:
        """Publish a new commit (other weights) to the spec's repo on the Hub; return its sha."""
        from tests.integration.test_host_model import publish_tiny

        seed = self.published.get(spec_name, 0) + 1
        self.published[spec_name] = seed
        repo = self.specs[spec_name]["source"]["repo_id"]
        self.shas[spec_name] = publish_tiny(self.hub, repo, self.work_dir / f"{spec_name}-{seed}", seed=seed)
        return self.shas[spec_name]

    def hub_sha(self, spec_name: str) -> str:
        """The commit the spec's watched branch (main) points at now."""
        return self.shas[spec_name]

    # --- events ----------------------------------------------------------------------------
    def emit(self, event: str, resource: dict[str, str], payload: dict[str, Any]) -> str:
        """``POST /api/events``, as an S3 notification or another system would send it."""
        event_id = str(uuid.uuid4())
        body = [{
            "id": event_id,
            "occurred": datetime.now(timezone.utc).isoformat(),
            "event": event,
            "resource": resource,
            "payload": payload,
        }]
        response = httpx.post(f"{self.api_url}/events", json=body, timeout=30)
        assert response.status_code < 300, response.text
        return event_id

    def events(self, prefix: str, since: datetime | None = None) -> list[dict[str, Any]]:
        """``POST /api/events/filter`` for events whose name starts with ``prefix`` (all pages)."""
        body = {
            "filter": {
                "event": {"prefix": [prefix]},
                "occurred": {"since": (since or self.started_at).isoformat(),
                             "until": (datetime.now(timezone.utc) + timedelta(minutes=5)).isoformat()},
                "order": "ASC",
            },
            "limit": 50,
        }
        page = httpx.post(f"{self.api_url}/events/filter", json=body, timeout=30)
        assert page.status_code == 200, page.text
        data = page.json()
        events = list(data["events"])
        while data.get("next_page"):
            data = httpx.get(data["next_page"], timeout=30).json()
            events.extend(data["events"])
        return events

    # --- flow runs -------------------------------------------------------------------------
    def deployment(self, name: str) -> Any:
        """A deployment of this repo's prefect.yaml, by deployment name (any flow)."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

        with get_client(sync_client=True) as client:
            found = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))
        assert len(found) == 1, f"expected one deployment named {name!r}, found {[d.name for d in found]}"
        return found[0]

    def flow_runs(self, deployment_name: str) -> list[Any]:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
        from prefect.client.schemas.sorting import FlowRunSort

        deployment = self.deployment(deployment_name)
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(
                flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id])),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=200,
            )

    def flow_run(self, flow_run_id: Any) -> Any:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return client.read_flow_run(flow_run_id)

    def wait_final(self, flow_run_id: Any, timeout: float = RUN_DEADLINE) -> Any:
        """Wait until a flow run is in a final state; return the run."""
        def final() -> Any:
            run = self.flow_run(flow_run_id)
            return run if run.state is not None and run.state.is_final() else None

        return wait_for(f"flow run {flow_run_id} to finish", final, timeout)

    def record(self, flow_run_id: Any) -> dict[str, str]:
        """The hosting record of a host_model run, read back from its markdown artifact."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        tables = [a.data for a in artifacts if isinstance(a.data, str) and "| endpoint |" in a.data]
        assert len(tables) == 1, f"flow run {flow_run_id} has no hosting record artifact: {artifacts}"
        rows = dict(re.findall(r"^\| ([^|]+?) \| `?(.*?)`? \|$", tables[0], flags=re.M))
        engine = rows.get("engine", "-")
        rows["engine_origin"] = engine.split(" — ")[0] if engine != "-" else ""
        return rows

    def flow_logs(self, flow_run_id: Any) -> str:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        return "\n".join(log.message for log in logs)

    def server_log(self, tail: int | None = 6000) -> str:
        """The end of the Prefect server's log (the UI's requests fail there first); all of it with ``tail=None``."""
        path = self.logs / "prefect.log"
        if not path.exists():
            return f"(no {path})"
        text = path.read_text(errors="replace")
        return text if tail is None else text[-tail:]

    def worker_logs(self) -> str:
        return "\n".join(f"--- {w.name} ---\n{w.log_path.read_text(errors='replace')[-4000:]}" for w in self.workers)


def _e2e_spec(work: Path, name: str, repo: str, image: str, *, watched: bool) -> dict[str, Any]:
    from tests.integration.test_host_model import make_spec

    spec = make_spec(work, name, repo, image)  # a quick nim-optimize build, engines cached on S3
    if watched:
        spec["watch"] = {"branches": ["main"]}
    return spec


def _start_server(session_dir: Path) -> Service:
    """``prefect server start`` on loopback: triggers and scheduler on, the UI on, quick loops."""
    settings = {
        "PREFECT_SERVER_UI_ENABLED": "true",
        "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "true",
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "true",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
        "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # SQLite answers a busy write with a 503 the Python client retries by itself; log each one,
        # so a UI toast or a slow run can be traced to it in the server log (test_prefect_ui.py).
        "PREFECT_SERVER_LOG_RETRYABLE_ERRORS": "true",
    }
    port = free_port()
    settings["PREFECT_UI_API_URL"] = f"http://127.0.0.1:{port}/api"  # the UI's default is port 4200
    with pytest.MonkeyPatch.context() as patch:
        for key, value in settings.items():
            patch.setenv(key, value)
        return start_prefect_server(session_dir / "e2e-prefect", session_dir / "logs" / "e2e", port=port)


def _start_worker(name: str, env: dict[str, str], logs: Path, cache_dir: Path) -> Worker:
    log_path = logs / f"worker-{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [_bin("prefect"), "worker", "start", "--pool", POOL, "--name", name],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO_ROOT,
            # NIMFLOW_HOME: the checkout the deployments' pull step runs the flows from (prefect.yaml).
            env={**env, "NIMFLOW_CACHE_DIR": str(cache_dir), "NIMFLOW_HOME": str(REPO_ROOT)}, start_new_session=True,
        )
    return Worker(name, process, log_path, cache_dir)


@pytest.fixture(scope="package")
def e2e(session_dir: Path, docker_client: Any, standin_image: str, s3_server: Service, hub: Any) -> Iterator[E2E]:
    """Server, specs, ``nimflow bootstrap`` and two workers; all stopped after this package's tests."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    started_at = datetime.now(timezone.utc) - timedelta(seconds=5)
    work = session_dir / "e2e"
    specs_dir = work / "specs"
    specs_dir.mkdir(parents=True)
    suffix = uuid.uuid4().hex[:6]
    specs: dict[str, dict[str, Any]] = {}
    shas: dict[str, str] = {}
    for role in ("alpha", "beta"):
        name, repo = f"e2e-{role}-{suffix}", f"e2e/{role}-{suffix}"
        from tests.integration.test_host_model import publish_tiny

        shas[name] = publish_tiny(hub, repo, work / f"{name}-0")
        specs[name] = _e2e_spec(work / name, name, repo, standin_image, watched=role == "alpha")
        write_spec(specs_dir / f"{name}.yaml", specs[name])

    try:
        server = _start_server(session_dir)
    except TestbedError as exc:
        unavailable(f"no Prefect server: {exc}")
    ui_url = server.url.removesuffix("/api")
    env = {key: value for key, value in os.environ.items() if key not in ("HF_TOKEN", "NGC_API_KEY", "NGC_CLI_API_KEY")}
    env.update({
        "PREFECT_API_URL": server.url,
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "NIMFLOW_SPECS_DIR": str(specs_dir),
        "HF_ENDPOINT": hub.url,
        "AWS_ENDPOINT_URL": s3_server.url,
        **S3_TEST_CREDENTIALS,
        "COLUMNS": "200",
        # Prefect's default log batching for the workers' flow runs (the unit suite's 0.3 s would add
        # writes to the server's SQLite, whose busy writes the UI shows as error toasts).
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "2.0",
    })
    env.pop("PREFECT_PROFILE", None)
    logs = session_dir / "logs" / "e2e"
    setup = E2E(server.url, ui_url, env, specs_dir, specs, hub, s3_server.url, docker_client, [], logs, started_at, work, shas=shas)
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.url}):
            setup.nimflow("bootstrap", timeout=600)
            for host in HOSTS:
                setup.workers.append(_start_worker(host, env, logs, work / f"{host}-cache"))
            yield setup
            from prefect.logging.handlers import APILogHandler

            APILogHandler().flush()
    finally:
        for worker in setup.workers:
            worker.stop()
        for name in specs:
            for container in docker_client.containers.list(all=True, filters={"label": f"nimflow.deployment={name}"}):
                container.remove(force=True)
            for container in docker_client.containers.list(all=True, filters={"name": f"^/nimflow-{name}"}):
                container.remove(force=True)
        server.stop()


def artifacts_dir() -> Path:
    """Where test artifacts (screenshots) are kept: ``$NIMFLOW_TEST_ARTIFACTS`` or tests/e2e/artifacts."""
    path = Path(os.environ.get("NIMFLOW_TEST_ARTIFACTS") or REPO_ROOT / "tests" / "e2e" / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def dump_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))
