"""nimflow's Docker clients do not pile up: repeated calls reuse one client (and its connections) per thread.

Measured on the real Docker engine by counting this process's open sockets while the clients
are held, as the frames of a task and its helpers hold them. (A client that is dropped closes its
sockets at once with docker 7 and urllib3 2: what piled up was clients held at the same time.)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import pytest

from nimflow.containers import docker_client

pytestmark = pytest.mark.testbed

CALLS = 12


def _open_sockets() -> int:
    """How many sockets this process holds open."""
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except OSError:  # closed meanwhile (the fd of the listing itself)
            pass
    return count


def _sockets_opened_by(calls: Callable[[], Any]) -> int:
    before = _open_sockets()
    kept = [calls() for _ in range(CALLS)]  # held, as a caller's frame would while it works
    opened = _open_sockets() - before
    del kept
    return opened


def _pinged(client: Any) -> Any:
    assert client.ping()
    return client


def test_repeated_calls_reuse_one_client_and_open_no_sockets(docker_client: Any) -> None:  # noqa: ARG001 - the fixture starts the engine
    docker_client_of_nimflow().ping()  # this thread's client and its connections exist from here on
    assert _sockets_opened_by(lambda: _pinged(docker_client_of_nimflow())) == 0
    assert docker_client_of_nimflow() is docker_client_of_nimflow()

    # The measure sees what a client per call costs: fresh SDK clients, held the same way, keep sockets open.
    assert _sockets_opened_by(lambda: _pinged(docker.from_env(timeout=30))) >= CALLS


def test_each_thread_has_its_own_client(docker_client: Any) -> None:  # noqa: ARG001
    """The docker SDK does not promise thread safety: another thread gets (and keeps) its own client."""
    mine = docker_client_of_nimflow()
    seen: list[Any] = []

    def other() -> None:
        seen.extend([docker_client_of_nimflow(), docker_client_of_nimflow()])
        assert seen[0].ping()

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen[0] is seen[1] and seen[0] is not mine


def test_a_changed_docker_host_gets_a_new_client_and_the_old_one_is_closed(
    docker_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A different DOCKER_HOST (here: the same socket spelt out) is another daemon: a new client; the old one closes."""
    host = docker_client.api.base_url  # e.g. http+docker://localhost: the engine the fixture found
    if not host.startswith("http+docker://"):
        pytest.skip(f"the engine is not on a unix socket ({host})")
    socket_path = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    first = docker_client_of_nimflow()
    first.ping()
    before = _open_sockets()
    monkeypatch.setenv("DOCKER_HOST", socket_path)
    second = docker_client_of_nimflow()
    second.ping()
    assert second is not first
    assert _open_sockets() <= before  # the first client's connection was closed, the second's opened


def docker_client_of_nimflow() -> Any:
    """nimflow.containers.docker_client (named apart from the conftest fixture of the same name)."""
    return docker_client()
