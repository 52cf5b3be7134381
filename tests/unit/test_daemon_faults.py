"""Docker daemon faults become nimflow errors that name the daemon (rollouts and verification).

The real restarts are in tests/integration/test_fault_daemon.py; these drive the translation with
the exceptions the docker SDK raises when its socket is gone, and a scripted container watch.
"""

from __future__ import annotations

from typing import Any

import docker
import pytest
import requests

from nimflow.containers import daemon_errors
from nimflow.errors import DeploymentError, ServiceUnavailable, is_transient
from nimflow.verification import _log_lines_or_why, container_watch

GONE = requests.exceptions.ConnectionError("('Connection aborted.', FileNotFoundError(2, 'No such file or directory'))")


def test_a_daemon_that_went_away_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///run/elsewhere.sock")
    with pytest.raises(ServiceUnavailable) as caught, daemon_errors("starting a candidate for deployment d"):
        raise GONE
    message = str(caught.value)
    assert message.startswith("starting a candidate for deployment d: the Docker daemon at unix:///run/elsewhere.sock "
                              "did not answer (ConnectionError: ")
    assert "systemctl start docker" in message and is_transient(caught.value)
    assert caught.value.__cause__ is GONE


def test_other_docker_faults_keep_their_translation() -> None:
    response = requests.Response()
    response.status_code = 404
    with pytest.raises(DeploymentError, match="No such container"), daemon_errors("switching"):
        raise docker.errors.NotFound("404 Client Error", response=response, explanation="No such container: x")
    response_500 = requests.Response()
    response_500.status_code = 500
    with pytest.raises(ServiceUnavailable) as caught, daemon_errors("switching"):
        raise docker.errors.APIError("500 Server Error", response=response_500, explanation="context deadline exceeded")
    assert "did not answer" not in str(caught.value)  # the daemon answered, with a 500 that names it
    with pytest.raises(DeploymentError, match="port is already allocated"), daemon_errors("starting"):
        raise DeploymentError("port is already allocated")  # nimflow's own errors pass unchanged


class ScriptedContainer:
    """inspect_container / containers.get(...).logs answering from scripts (an exception raises)."""

    def __init__(self, inspects: list[Any], logs: Any = b"line\n") -> None:
        self._inspects = iter(inspects)
        self._logs = logs
        self.api = self
        self.containers = self

    def inspect_container(self, container_id: str) -> Any:
        answer = next(self._inspects)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def get(self, container_id: str) -> ScriptedContainer:
        return self

    def logs(self, tail: int) -> bytes:
        if isinstance(self._logs, Exception):
            raise self._logs
        return bytes(self._logs)


def _state(status: str, code: int = 0, oom: bool = False) -> dict[str, Any]:
    return {"State": {"Status": status, "ExitCode": code, "OOMKilled": oom}, "RestartCount": 0}


@pytest.mark.parametrize(("inspects", "expected"), [
    ([_state("running"), _state("exited", 1)], "exited with exit code 1"),
    ([_state("running"), _state("exited", 137)], "exited with exit code 137 (stopped by SIGKILL: `docker stop`/`docker kill`, "
                                                 "a Docker daemon restart"),
    ([_state("running"), _state("exited", 137, oom=True)], "(killed by the kernel's OOM killer"),
    ([_state("running"), GONE, _state("exited", 0)], "exited with exit code 0 after the Docker daemon stopped answering"),
])
def test_an_exit_says_who_may_have_stopped_the_container(inspects: list[Any], expected: str) -> None:
    check = container_watch(ScriptedContainer(inspects), "c0ffee", "nimflow-x-blue", daemon_grace_seconds=60)  # type: ignore[arg-type]
    reasons = [check() for _ in inspects[1:]]
    assert reasons[:-1] == [None] * (len(reasons) - 1)  # a silent daemon is waited for, not a reason
    assert expected in str(reasons[-1])


def test_logs_that_cannot_be_read_do_not_replace_the_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///run/elsewhere.sock")
    assert _log_lines_or_why(ScriptedContainer([], logs=b"ready soon\n"), "c") == "ready soon"  # type: ignore[arg-type]
    why = _log_lines_or_why(ScriptedContainer([], logs=GONE), "c")  # type: ignore[arg-type]
    assert why.startswith("(not available: the Docker daemon at unix:///run/elsewhere.sock did not answer: ConnectionError")
