"""A served model survives a Docker daemon restart (or a host reboot) without a nimflow run.

The daemon is really restarted: stopped with SIGTERM (live-restore off, as on the test bed, so
every container stops as in a reboot) and started again with the same command line and
environment, or by systemd where systemd runs it. The front proxy and the active backend come
back by their restart policy; the proxy reads the last route and finds the backend by name.

Stopping the daemon stops every container on it: run this where no other test session shares the
daemon. The daemon is running again when the test ends, whatever happened.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

# _LOCK: the lock the test bed takes around starting dockerd (shared on purpose, see restart_docker_daemon).
from nimflow.testbed.docker_engine import _LOCK, DOCKERD_LOG, ensure_docker_engine
from tests.conftest import unavailable
from tests.integration.test_rollout import Rig, complete, make_rig, models_root

pytestmark = pytest.mark.testbed
PID_FILE = Path("/var/run/docker.pid")
WAIT = 120.0


@pytest.fixture
def rig(tmp_path: Path, docker_client: Any, standin_image: str, unique: str, cleanup_containers: list[str]) -> Rig:
    return make_rig(tmp_path, docker_client, standin_image, unique, cleanup_containers)


def _ping() -> bool:
    try:
        return bool(docker.from_env(timeout=5).ping())
    except Exception:  # noqa: BLE001 - any failure means "not answering"
        return False


def _under_systemd() -> bool:
    if not Path("/run/systemd/system").is_dir() or shutil.which("systemctl") is None:
        return False
    return subprocess.run(["systemctl", "is-active", "--quiet", "docker"], check=False).returncode == 0


def restart_docker_daemon() -> None:
    """Restart the local dockerd with its own command line and environment; wait until it answers.

    Skips (fails under CI=true) where this process cannot do that: not root, a remote DOCKER_HOST,
    no pid file.
    """
    if os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock") != "unix:///var/run/docker.sock":
        unavailable("the Docker daemon is remote (DOCKER_HOST); cannot restart it from here")
    if os.geteuid() != 0:
        unavailable("restarting dockerd needs root")
    # The test bed's start-up lock: a concurrent ensure_docker_engine() waits for this restart and
    # then finds the daemon answering, instead of starting a second one in the gap.
    _LOCK.parent.mkdir(parents=True, exist_ok=True)
    with _LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _under_systemd():
            subprocess.run(["systemctl", "restart", "docker"], check=True, timeout=WAIT)
        else:
            _restart_by_signal()
        deadline = time.monotonic() + WAIT
        while not _ping():
            if time.monotonic() > deadline:
                pytest.fail(f"dockerd did not answer within {WAIT:g}s of its restart; see {DOCKERD_LOG}")
            time.sleep(0.5)


def _restart_by_signal() -> None:
    """SIGTERM the dockerd named by its pid file, then start it again with its argv and environment."""
    if not PID_FILE.is_file():
        unavailable(f"no {PID_FILE}: cannot find the running dockerd")
    pid = int(PID_FILE.read_text().strip())
    argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    environ = dict(item.decode().split("=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                   if b"=" in item)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + WAIT
    while Path(f"/proc/{pid}").exists() and not _zombie(pid):
        if time.monotonic() > deadline:
            pytest.fail(f"dockerd (pid {pid}) did not stop within {WAIT:g}s")
        time.sleep(0.2)
    with DOCKERD_LOG.open("ab") as log:
        # Its own session, as the test bed starts it: the daemon outlives this test process.
        subprocess.Popen(argv, env=environ, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)


def _zombie(pid: int) -> bool:
    """True when ``pid`` has exited but its parent has not reaped it yet (it is gone for our purpose)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _answers(endpoint: str, model: str) -> str | None:
    try:
        return complete(endpoint, model)
    except (OSError, httpx.TransportError, AssertionError, KeyError, ValueError):
        return None


def test_stable_endpoint_answers_again_after_a_daemon_restart(rig: Rig, docker_client: Any) -> None:
    first = rig.roll(rig.model("a", seed=1))
    front = f"{rig.container_name}-front"
    before = {name: c.id for name, c in rig.containers().items()}
    assert set(before) == {front, first.container_name}
    assert "received: ping" in complete(first.stable_endpoint, rig.deploy.served_model_name)

    try:
        restart_docker_daemon()
    finally:
        ensure_docker_engine()  # whatever failed above, the daemon runs for the tests after this one

    # No nimflow code runs from here on: Docker's restart policy and the proxy's route file do it all.
    deadline = time.monotonic() + WAIT
    while (answer := _answers(first.stable_endpoint, rig.deploy.served_model_name)) is None:
        if time.monotonic() > deadline:
            logs = {n: c.logs(tail=10).decode(errors="replace") for n, c in rig.containers().items()}
            pytest.fail(f"the stable endpoint did not answer within {WAIT:g}s of the restart; logs: {logs}")
        time.sleep(0.5)
    assert "received: ping" in answer
    assert models_root(first.stable_endpoint) == rig.root("a")
    after = rig.containers()
    assert {name: c.id for name, c in after.items()} == before  # the same containers, restarted by Docker
    assert all(c.status == "running" for c in after.values())
    assert docker_client.ping()  # the session's client still works for the tests after this one
