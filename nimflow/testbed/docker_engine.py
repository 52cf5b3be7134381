"""Make sure a Docker engine answers, installing and starting one on a fresh Debian machine.

CI machines start bare: no ``dockerd`` and no systemd to start it. As root we do what
testbed.md §2 measured: ``apt-get install docker.io`` and run ``dockerd`` detached. Anything else
(not root, no apt, a daemon that will not come up) is a :class:`TestbedError` saying what to do.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import docker
from docker.errors import DockerException

from nimflow.testbed import TestbedError

DOCKERD_LOG = Path("/var/log/nimflow-dockerd.log")
_LOCK = Path("/var/lock/nimflow-dockerd.lock")  # serialises install/start across processes


def _ping() -> docker.DockerClient | None:
    """A client for the configured engine if it answers, else None."""
    try:
        client = docker.from_env(timeout=10)
        client.ping()
        return client
    except (DockerException, OSError):
        return None


def _log_tail(lines: int = 20) -> str:
    try:
        return "\n".join(DOCKERD_LOG.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no dockerd log)"


def _apt_install_docker() -> None:
    """``apt-get update && apt-get install -y docker.io`` (update first: a fresh machine has no lists)."""
    if shutil.which("apt-get") is None:
        raise TestbedError("dockerd is not installed and apt-get is not available: install Docker")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "docker.io"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise TestbedError(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr[-2000:]}")


def ensure_docker_engine(timeout: float = 90.0) -> docker.DockerClient:
    """Return a connected ``docker.DockerClient``, starting (and if need be installing) dockerd.

    Only as root and only for the local socket: a configured remote ``DOCKER_HOST`` that does not
    answer is reported, not papered over with a local daemon. Raises TestbedError on failure.
    """
    client = _ping()
    if client is not None:
        return client
    docker_host = os.environ.get("DOCKER_HOST", "")
    if docker_host and not docker_host.startswith("unix:///var/run/docker.sock"):
        raise TestbedError(f"DOCKER_HOST={docker_host} does not answer; start that engine or unset it")
    if os.geteuid() != 0:
        raise TestbedError(
            "No Docker engine answers and this process is not root, so it cannot start one. Run "
            "`sudo apt-get install -y docker.io && sudo dockerd &` (or start Docker Desktop), and "
            "make sure this user can use /var/run/docker.sock (e.g. the `docker` group).")

    _LOCK.parent.mkdir(parents=True, exist_ok=True)
    with _LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a parallel caller may have started it meanwhile
        client = _ping()
        if client is not None:
            return client
        dockerd = shutil.which("dockerd")
        if dockerd is None:
            _apt_install_docker()
            dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
        DOCKERD_LOG.parent.mkdir(parents=True, exist_ok=True)
        with DOCKERD_LOG.open("ab") as log:
            # Own session: the daemon outlives this process and its terminal (no systemd here).
            proc = subprocess.Popen([dockerd], stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            client = _ping()
            if client is not None:
                return client
            if proc.poll() is not None:  # it died: one last look (another daemon may own the socket)
                client = _ping()
                if client is not None:
                    return client
                break
            time.sleep(0.5)
    raise TestbedError(
        f"dockerd did not answer within {timeout:.0f}s (exit code {proc.poll()}). "
        f"See {DOCKERD_LOG}; last lines:\n{_log_tail()}")


def main() -> int:
    """``python -m nimflow.testbed.docker_engine``: ensure the engine, print its version."""
    try:
        client = ensure_docker_engine()
    except TestbedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    version = client.version()
    print(f"Docker engine {version.get('Version')} (API {version.get('ApiVersion')}) is running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
