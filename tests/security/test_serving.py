"""Hostile inputs against what serves: the front proxy's clients, and what a NIM container is given.

Trust boundary: anyone who can reach ``deploy.host:deploy.host_port`` can send the front proxy any
bytes; a NIM container runs a vendor image nimflow does not control. The proxy must stay bounded
whatever its clients send (memory, body size, connections), and a NIM container must get only what
it needs to serve: no secrets unless it downloads its model, what it serves read-only, a cache of
its own, and never the front proxy's route files.

Everything runs on the real test bed: the stand-in NIM and the front proxy in Docker containers,
deployed through nimflow's rollout functions or the host_model flow; clients on loopback.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from nimflow.flows.host_model import host_model

from nimflow.front_proxy import LIMITS_LABEL, ROUTE_ROOT, route_dir
from nimflow.rollout import nim_cache_dir
from nimflow.testbed.tiny_model import write_tiny_llama
from tests.conftest import write_spec
from tests.integration.test_host_model import make_spec
from tests.integration.test_rollout import complete, make_rig

pytestmark = pytest.mark.testbed
WAIT = 60.0  # bound for waits that end as soon as their condition holds
MIB = 1 << 20
#: The limits the deployments below run with (set in nimflow's environment, passed on by nimflow).
BODY_LIMIT_MIB = 8
CONNECTION_LIMIT = 6
#: Each attacking client sends at most this much: the loops end by themselves.
ATTACK_BYTES_PER_CLIENT = 48 * MIB
ATTACK_CHUNK = b"x" * (64 << 10)
#: The bound on the proxy's peak resident memory while three clients push up to 3 x 48 MiB at it.
#: Measured here: 24 MiB streaming; 295 MiB for the proxy as it was, which buffered bodies (792 MiB in
#: the report that found it).
PROXY_PEAK_RSS_MIB = 48


def peak_rss_mib(docker_client: Any, container_name: str) -> float:
    """The peak resident memory (VmHWM) of a container's main process, read from the host's /proc."""
    pid = docker_client.containers.get(container_name).attrs["State"]["Pid"]
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB$", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) / 1024


def send_endless_chunked_body(port: int, results: list[bytes]) -> None:
    """POST a chunked body that never ends (up to ATTACK_BYTES_PER_CLIENT), stopping once the proxy answers;
    append everything the proxy answered."""
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: attacker\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    frame = b"%x\r\n%s\r\n" % (len(ATTACK_CHUNK), ATTACK_CHUNK)
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(head)
        for _ in range(ATTACK_BYTES_PER_CLIENT // len(ATTACK_CHUNK)):
            if select.select([sock], [], [], 0)[0]:
                break  # the proxy answered (or closed): stop sending
            try:
                sock.sendall(frame)
            except OSError:
                break
        else:  # the bound reached without an answer: end the body, so a proxy that waits for it answers
            sock.sendall(b"0\r\n\r\n")
        answer = b""
        try:
            while piece := sock.recv(65536):
                answer += piece
        except OSError as exc:
            answer += f"<{type(exc).__name__}>".encode()
        results.append(answer)


def raw_request(port: int, request: bytes) -> bytes:
    """Send one request and return everything the proxy sent back until it closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(request)
        answer = b""
        while piece := sock.recv(65536):
            answer += piece
        return answer


@pytest.fixture
def limited_deployment(tmp_path: Path, docker_client: Any, standin_image: str, unique: str, cleanup_containers: list[str],
                       monkeypatch: pytest.MonkeyPatch) -> Any:
    """A stand-in deployment rolled out behind its front proxy, with small limits set in nimflow's environment."""
    monkeypatch.setenv("NIMFLOW_PROXY_MAX_BODY_MIB", str(BODY_LIMIT_MIB))
    monkeypatch.setenv("NIMFLOW_PROXY_MAX_CONNECTIONS", str(CONNECTION_LIMIT))
    rig = make_rig(tmp_path, docker_client, standin_image, unique, cleanup_containers)
    rig.roll(rig.model("a"))
    front = docker_client.containers.get(f"{rig.container_name}-front")
    # nimflow passed its settings on: the proxy runs with them, and they are part of the front's identity.
    assert front.labels[LIMITS_LABEL] == f"max_body_bytes={BODY_LIMIT_MIB * MIB},max_connections={CONNECTION_LIMIT}"
    assert "--max-body-bytes" in front.attrs["Args"] and str(BODY_LIMIT_MIB * MIB) in front.attrs["Args"]
    return rig


def test_endless_chunked_bodies_keep_the_proxy_small_and_are_answered_413(limited_deployment: Any,
                                                                           docker_client: Any) -> None:
    """Three clients each send a chunked body that never ends: the proxy streams, stays under its memory
    bound, answers each 413 once the body passes the limit, and serves on.

    Failed before the fix (checked by running it against the proxy as it was): the proxy buffered the
    bodies (peak 295 MiB) and, once the clients gave up and ended them, answered 502, not 413.
    """
    rig = limited_deployment
    port = rig.deploy.host_port
    assert complete(f"http://127.0.0.1:{port}", rig.deploy.served_model_name)  # it serves before the attack
    results: list[bytes] = []
    clients = [threading.Thread(target=send_endless_chunked_body, args=(port, results)) for _ in range(3)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(WAIT * 3)
    peak = peak_rss_mib(docker_client, f"{rig.container_name}-front")
    assert peak < PROXY_PEAK_RSS_MIB, f"the front proxy's peak resident memory was {peak:.0f} MiB"
    assert len(results) == 3
    for answer in results:
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:300]
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["type"] == "RequestEntityTooLargeError"
        assert f"limit of {BODY_LIMIT_MIB * MIB} bytes" in body["error"]["message"]
    # A declared length over the limit is refused before a byte of the body is read.
    answer = raw_request(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                         % (BODY_LIMIT_MIB * MIB + 1))
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert "received" in complete(f"http://127.0.0.1:{port}", rig.deploy.served_model_name)  # and serves on


def test_connections_over_the_cap_are_answered_503(limited_deployment: Any) -> None:
    """Clients holding NIMFLOW_PROXY_MAX_CONNECTIONS connections open: the next one is answered 503 and closed,
    and a slot freed is served again.

    Failed before the fix (checked against the proxy as it was): every connection got a thread and was
    served; the extra one got no 503 (it was served and kept open).
    """
    rig = limited_deployment
    port = rig.deploy.host_port
    held = []
    for _ in range(CONNECTION_LIMIT):  # each admitted: answered, and kept open
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        connection.request("GET", "/v1/health/live")
        response = connection.getresponse()
        assert response.status == 200, response.read()
        response.read()
        held.append(connection)
    answer = raw_request(port, b"GET /v1/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 503 "), answer[:300]
    assert f"too many connections (the limit is {CONNECTION_LIMIT}".encode() in answer
    held.pop().close()
    deadline = time.monotonic() + WAIT  # the slot is free once the proxy has seen the close
    while not raw_request(port, b"GET /v1/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(
            b"HTTP/1.1 200 "):
        assert time.monotonic() < deadline, "a freed connection slot was never served again"
        time.sleep(0.05)
    for connection in held:
        connection.close()


def test_nim_serving_local_weights_gets_no_secrets_read_only_weights_and_no_route_files(
    tmp_path: Path, testbed_env: dict, standin_image: str, unique: str, cleanup_containers: list, docker_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A NIM that serves local weights downloads nothing: with NGC_API_KEY and HF_TOKEN set where nimflow runs,
    its container has neither; what it serves is mounted read-only, its cache is its own, the route files
    are in none of its mounts, and it still serves and verifies.

    Failed before the fix (checked against main): both secrets were in `docker inspect`'s env, and the whole
    cache dir (route files included) was mounted read-write.
    """
    secrets = {"NGC_API_KEY": f"nvapi-SECRET{unique}ngc", "HF_TOKEN": f"hf_SECRET{unique}hf"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    weights = write_tiny_llama(tmp_path / "weights")
    name = f"local-{unique}"
    spec = make_spec(tmp_path, name, "unused/unused", standin_image, build=None)
    spec["source"] = {"local_dir": str(weights)}
    cleanup_containers.append(f"nimflow-{name}")

    record = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)))

    assert "received" in record["completion"]  # served and verified
    container = docker_client.containers.get(record["container_id"])
    inspected = json.dumps(container.attrs)
    for secret_name, value in secrets.items():
        assert value not in inspected, f"{secret_name} is in the NIM container's configuration"
        assert not any(entry.startswith(f"{secret_name}=") for entry in container.attrs["Config"]["Env"])
    cache = (tmp_path / "nim-cache").resolve()
    mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
    assert {d for d, m in mounts.items() if m["RW"]} == {"/opt/nim/.cache"}
    assert mounts["/opt/nim/.cache"]["Source"] == str(nim_cache_dir(cache, name))
    assert mounts["/opt/nim/model"]["Source"] == str(weights.resolve()) and not mounts["/opt/nim/model"]["RW"]
    routes = route_dir(cache, name)
    assert (routes / "route" / "route.json").is_file()  # the route exists: it is just not mounted
    for mount in mounts.values():
        source = Path(mount["Source"])
        assert not (routes.is_relative_to(source) or source.is_relative_to(cache / ROUTE_ROOT)), mount


@pytest.mark.parametrize(("build", "refused"), [(None, "the model to serve"), ("nim-optimize", "the checkpoint to build from")],
                         ids=["served", "built"])
def test_model_directory_holding_the_route_files_is_refused(
    tmp_path: Path, testbed_env: dict, prefect_api: str, standin_image: str, unique: str, cleanup_containers: list,
    docker_client: Any, build: str | None, refused: str,
) -> None:
    """A spec whose model directory holds the cache dir (so its mount would carry every deployment's route
    files and NIM caches into the container) ends with one `nimflow:` line and exit 1; no NIM or build
    container is started.

    Failed before the fix (checked against main, served): the model directory was mounted as it was and
    the run succeeded, the route files readable inside the NIM container.
    """
    weights = write_tiny_llama(tmp_path / "weights")
    name = f"holds-{unique}"
    spec = make_spec(tmp_path, name, "unused/unused", standin_image, build=build)
    spec["source"] = {"local_dir": str(weights)}
    spec["deploy"]["cache_dir"] = str(weights / "nim-cache")
    cleanup_containers.append(f"nimflow-{name}")
    config = write_spec(tmp_path / "spec.yaml", spec)

    result = subprocess.run([str(Path(sys.executable).with_name("nimflow")), "host", str(config)], capture_output=True,
                            text=True, timeout=600, env={**os.environ, **testbed_env, "PREFECT_API_URL": prefect_api})

    assert result.returncode == 1, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("nimflow:")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert f"{refused}, {weights.resolve()}, holds" in lines[0] and "nimflow's own directory" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not docker_client.containers.list(all=True, filters={"label": f"nimflow.deployment={name}"})
    assert "Building engine" not in result.stderr + result.stdout
