"""Waiting for a build container: a Docker daemon hiccup is not a build timeout.

A daemon outage cannot be produced on demand on the shared test bed without stopping every
other container, so these tests drive :func:`wait_for_exit` with a scripted stand-in for the
docker SDK's low-level API (``api.wait`` / ``api.inspect_container``): the logic under test is
ours, the script only says what the daemon answers and when.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests

from nimflow.containers import wait_for_exit
from nimflow.errors import ServiceUnavailable

READ_TIMEOUT = requests.exceptions.ConnectionError("UnixHTTPConnectionPool(host='localhost', port=None): Read timed out.")
REFUSED = requests.exceptions.ConnectionError("('Connection aborted.', FileNotFoundError(2, 'No such file or directory'))")


class ScriptedDaemon:
    """Answers ``wait`` and ``inspect_container`` from scripts (an exception to raise, or a value)."""

    def __init__(self, waits: list[Any], inspects: list[Any]) -> None:
        self._waits: Iterator[Any] = iter(waits)
        self._inspects: Iterator[Any] = iter(inspects)
        self.api = self
        self.calls: list[str] = []

    def _next(self, script: Iterator[Any], name: str) -> Any:
        self.calls.append(name)
        answer = next(script)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def wait(self, container_id: str, timeout: float) -> dict[str, int]:
        return self._next(self._waits, "wait")

    def inspect_container(self, container_id: str) -> dict[str, Any]:
        return self._next(self._inspects, "inspect")


RUNNING = {"State": {"Running": True, "Status": "running"}}


def test_exit_code_is_returned() -> None:
    assert wait_for_exit(ScriptedDaemon([{"StatusCode": 3}], []), "c", 10) == 3


def test_still_running_after_a_wait_timeout_keeps_waiting() -> None:
    """The SDK's read timeout looks like a lost daemon; the state says the build still runs."""
    daemon = ScriptedDaemon([READ_TIMEOUT, READ_TIMEOUT, {"StatusCode": 0}], [RUNNING, RUNNING])
    assert wait_for_exit(daemon, "c", 10) == 0
    assert daemon.calls == ["wait", "inspect", "wait", "inspect", "wait"]


def test_daemon_outage_then_recovery_keeps_the_same_build() -> None:
    """The daemon stops answering, comes back, and the same container's exit code is returned."""
    daemon = ScriptedDaemon([REFUSED, REFUSED, {"StatusCode": 0}], [REFUSED, RUNNING])
    assert wait_for_exit(daemon, "c", 30, daemon_grace_seconds=20) == 0


def test_exit_seen_by_inspect_after_a_hiccup() -> None:
    """If the build ended while the daemon was away, its exit code comes from the state."""
    daemon = ScriptedDaemon([REFUSED], [{"State": {"Running": False, "Status": "exited", "ExitCode": 137}}])
    assert wait_for_exit(daemon, "c", 10) == 137


def test_long_outage_is_transient_not_a_timeout() -> None:
    """A daemon gone for longer than the grace period is a transient fault, never a build timeout."""
    daemon = ScriptedDaemon([REFUSED] * 100, [REFUSED] * 100)
    with pytest.raises(ServiceUnavailable, match="Docker daemon has not answered"):
        wait_for_exit(daemon, "c", 60, daemon_grace_seconds=0.0)


def test_deadline_passes_while_running() -> None:
    """A build still running at its deadline returns None (the caller reports the timeout)."""
    daemon = ScriptedDaemon([READ_TIMEOUT] * 5, [RUNNING] * 5)
    assert wait_for_exit(daemon, "c", 0.0) is None


class ScriptedContainers:
    """``client.containers.get`` answering from a script, for :func:`exit_watch`."""

    def __init__(self, answers: list[Any]) -> None:
        self.containers = self
        self._answers = iter(answers)

    def get(self, container_id: str) -> Any:
        answer = next(self._answers)
        if isinstance(answer, Exception):
            raise answer
        return answer


class FakeContainer:
    def __init__(self, status: str, code: int | None) -> None:
        self.status = status
        self.attrs = {"State": {"ExitCode": code}}


def test_exit_watch_rides_out_a_daemon_hiccup() -> None:
    """While the daemon is silent the watch keeps waiting; an exit seen afterwards is reported."""
    from nimflow.containers import exit_watch

    watch = exit_watch(ScriptedContainers([REFUSED, FakeContainer("running", None), FakeContainer("exited", 1)]), "c", "jit")
    assert watch() is None and watch() is None
    assert watch() == "container jit exited with exit code 1"
    silent = exit_watch(ScriptedContainers([REFUSED, REFUSED]), "c", "jit", daemon_grace_seconds=0.0)
    assert silent() is None  # the first silence starts the clock
    with pytest.raises(ServiceUnavailable, match="has not answered"):
        silent()
