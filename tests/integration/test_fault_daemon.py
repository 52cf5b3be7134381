"""Docker daemon faults during a run: not running at the start, restarted mid-deploy and mid-verify.

Each run goes through the `nimflow host` command, as a user runs it, so what is checked is what a
user reads: the command either recovers (the endpoint answers) or ends with one clear line that
names the Docker daemon, and never with a docker/requests traceback.

The restarts are real (see test_daemon_restart.py): stopping dockerd stops every container on it,
so these tests are few, and the daemon answers again when each ends, whatever happened.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from nimflow.testbed.docker_engine import ensure_docker_engine
from tests.conftest import write_spec
from tests.integration.test_daemon_restart import restart_docker_daemon
from tests.integration.test_host_model import make_spec, publish_tiny

pytestmark = pytest.mark.testbed

#: Words every daemon-fault message must contain: what failed, so the user knows where to look.
DAEMON = "Docker daemon"
#: How a traceback of a raw library exception ends (its last line), e.g. `requests.exceptions.ConnectionError: ...`.
RAW_LIBRARY_ERRORS = ("docker.errors.", "requests.exceptions.", "urllib3.exceptions.", "http.client.")


def _nimflow_host(config: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    command = [str(Path(sys.executable).with_name("nimflow")), "host", str(config)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})


def _untranslated(output: str) -> list[str]:
    """Raw docker/requests/urllib3 exceptions that ended a traceback in ``output``.

    Prefect logs a task's transient failure with its traceback (nimflow.log_filter keeps those), and
    a translated error's traceback shows the library exception it was raised from, followed by
    "The above exception was the direct cause" (or, inside that cause's own chain, "During handling
    of the above exception"). A library exception that ends a traceback reached Prefect (or the
    user) untranslated.
    """
    lines = [line for line in output.splitlines() if line.strip()]
    chained = ("The above exception was the direct cause", "During handling of the above exception")
    return [line for line, after in zip(lines, [*lines[1:], ""], strict=False)
            if line.startswith(RAW_LIBRARY_ERRORS) and not after.startswith(chained)]


def _assert_clear_failure(returncode: int, stdout: str, stderr: str) -> str:
    """The command failed with a last message naming the daemon, and no library exception went untranslated;
    return that message (`nimflow: <ErrorClass>: ...`, which may go on with the container's log lines)."""
    assert returncode == 1, (stdout[-2000:], stderr[-4000:])
    assert "\nnimflow: " in f"\n{stderr}", stderr[-4000:]
    message = f"\n{stderr}".rsplit("\nnimflow: ", 1)[1].strip()
    assert DAEMON in message, message
    assert not _untranslated(stdout + stderr), stderr[-6000:]
    return f"nimflow: {message}"


def test_daemon_not_running_at_start_is_one_clear_line(
    tmp_path: Path, testbed_env: dict, prefect_api: str, hub: Any, standin_image: str, unique: str
) -> None:
    """No daemon behind DOCKER_HOST: the command ends with one line naming it and how to start it."""
    repo = f"org/nodaemon-{unique}"
    publish_tiny(hub, repo, tmp_path)
    config = write_spec(tmp_path / "spec.yaml", make_spec(tmp_path, f"nodaemon-{unique}", repo, standin_image))
    socket = f"unix://{tmp_path}/no-docker.sock"

    process = _nimflow_host(config, {**testbed_env, "PREFECT_API_URL": prefect_api, "DOCKER_HOST": socket})
    stdout, stderr = process.communicate(timeout=300)

    last = _assert_clear_failure(process.returncode, stdout, stderr)
    assert last.startswith("nimflow: ServiceUnavailable: ")
    assert f"the Docker daemon at {socket} does not answer" in last
    assert "systemctl start docker" in last


# --- real daemon restarts ---------------------------------------------------------------------------


def _restart_when(event_filter: dict[str, Any], since: float) -> tuple[threading.Thread, list[BaseException]]:
    """A thread that restarts dockerd as soon as the daemon reports an event matching ``event_filter``."""
    errors: list[BaseException] = []

    def watch() -> None:
        try:
            client = docker.from_env(timeout=30)
            for _ in client.events(since=since, filters=event_filter, decode=True):
                break
            client.close()
            restart_docker_daemon()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=watch, name="restart-dockerd", daemon=True)
    thread.start()
    return thread, errors


@pytest.fixture
def daemon_back() -> Iterator[None]:
    """Whatever a test did to dockerd, it answers again for the tests after it."""
    yield
    ensure_docker_engine()


def _answers(endpoint: str, model: str) -> bool:
    try:
        response = httpx.post(f"{endpoint}/v1/chat/completions", timeout=10,
                              json={"model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 8})
    except httpx.TransportError:
        return False
    return response.status_code == 200 and "ping" in response.text


@pytest.mark.parametrize("moment", ["deploy", "verify"])
def test_daemon_restart_mid_rollout_fails_clearly_or_recovers(
    tmp_path: Path, testbed_env: dict, prefect_api: str, hub: Any, standin_image: str, unique: str,
    docker_client: Any, cleanup_containers: list[str], daemon_back: None, moment: str,
) -> None:
    """dockerd restarted while the candidate is started (deploy) or while it loads (verify)."""

    name, repo = f"dr{moment[0]}-{unique}", f"org/dr-{unique}"
    publish_tiny(hub, repo, tmp_path)
    # verify: the candidate takes 30 s to be ready, longer than dockerd takes to stop its containers,
    # so the restart (on the candidate's start event) lands while it is verified.
    delay = "30" if moment == "verify" else "0.5"
    spec = make_spec(tmp_path, name, repo, standin_image, build=None, deadline_seconds=90,
                     env={"NIMSTANDIN_READY_DELAY": delay})
    config = write_spec(tmp_path / "spec.yaml", spec)
    cleanup_containers.append(f"nimflow-{name}")
    candidate = f"nimflow-{name}-blue"
    event = {"type": "container", "event": "create" if moment == "deploy" else "start", "container": candidate}
    restarter, restart_errors = _restart_when(event, since=time.time())

    env = {**testbed_env, "PREFECT_API_URL": prefect_api}
    process = _nimflow_host(config, env)
    stdout, stderr = process.communicate(timeout=400)
    restarter.join(timeout=200)

    assert not restart_errors, restart_errors
    assert not restarter.is_alive(), f"the daemon was never restarted: no {event} event"
    outcome = "recovered"
    if process.returncode != 0:
        outcome = _assert_clear_failure(process.returncode, stdout, stderr)
        # The daemon is back: the next run serves (a candidate the failed run could not remove while
        # the daemon was away is replaced). It need not wait 30 s for readiness.
        spec["deploy"]["env"]["NIMSTANDIN_READY_DELAY"] = "0.5"
        rerun = _nimflow_host(write_spec(config, spec), env)
        out, err = rerun.communicate(timeout=400)
        assert rerun.returncode == 0, err[-4000:]
    assert _answers(f"http://127.0.0.1:{spec['deploy']['host_port']}", spec["deploy"]["served_model_name"])
    print(f"\ndaemon restart mid-{moment}: {outcome}")
