"""Rollouts on the real Docker engine with the NIM stand-in: the stable endpoint never drops a request.

The rollout functions are driven directly (start candidate -> a minimal verification -> promote or
abort), as the flow drives them; clients talk to the front proxy over loopback.
"""

from __future__ import annotations

import http.client
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nimflow.containers import exit_watch
from nimflow.errors import DeploymentError, EndpointUnhealthy
from nimflow.front_proxy import read_route, route_dir
from nimflow.nim_api import list_models, wait_until_ready
from nimflow.records import Deployment, ServingImage
from nimflow.rollout import abort, promote, start_candidate
from nimflow.spec import DeploySpec, RolloutSpec
from nimflow.testbed.services import free_port
from nimflow.testbed.tiny_model import write_tiny_llama

pytestmark = pytest.mark.testbed
WAIT = 60.0  # bound for waits that end as soon as their condition holds


@dataclass
class Rig:
    """One deployment on the test bed: its names, cache dir and deploy section."""

    name: str
    container_name: str
    cache: Path
    deploy: DeploySpec
    serving: ServingImage
    client: Any

    def model(self, tag: str, seed: int = 0) -> str:
        """A tiny checkpoint inside the cache dir (so /v1/models `root` names it)."""
        return str(write_tiny_llama(self.cache / "models" / tag, seed=seed))

    def root(self, tag: str) -> str:
        """The container path the stand-in reports as `root` for a model made by :meth:`model`."""
        return f"/opt/nim/.cache/models/{tag}"

    def start(self, model: str, *, strategy: str = "blue-green", deploy: DeploySpec | None = None,
              weights: str = "w") -> Deployment:
        return start_candidate(deploy or self.deploy, RolloutSpec(drain_seconds=30), strategy, self.name, self.container_name,
                               self.serving, model, None, [], "completions", {"nimflow.weights": weights})

    def roll(self, model: str, **options: Any) -> Deployment:
        """Start, verify and promote: a successful rollout."""
        candidate = self.start(model, **options)
        verify(self.client, candidate)
        promote(candidate, RolloutSpec(drain_seconds=30))
        return candidate

    def containers(self) -> dict[str, Any]:
        """This deployment's containers by name (labelled ones only)."""
        found = self.client.containers.list(all=True, filters={"label": f"nimflow.deployment={self.name}"})
        return {c.name: c for c in found}


def make_rig(tmp_path: Path, docker_client: Any, standin_image: str, unique: str, cleanup_containers: list[str]) -> Rig:
    """A deployment with unique names and port, whose containers the test's clean-up removes."""
    name = f"ro-{unique}"
    container_name = f"nimflow-{name}"
    cleanup_containers.extend([f"{container_name}-front", f"{container_name}-blue", f"{container_name}-green", container_name])
    deploy = DeploySpec(image=standin_image, served_model_name=f"test/{name}", host_port=free_port(),
                        # root as the served directory's path (vLLM's answer), so the tests can tell rollouts apart
                        cache_dir=tmp_path / "cache", env={"NIMSTANDIN_READY_DELAY": "0.3", "NIMSTANDIN_MODELS_ROOT": "path"})
    serving = ServingImage(image=standin_image, nim_api="1.x", detected_by="test")
    return Rig(name, container_name, tmp_path / "cache", deploy, serving, docker_client)


@pytest.fixture
def rig(tmp_path: Path, docker_client: Any, standin_image: str, unique: str, cleanup_containers: list[str]) -> Rig:
    return make_rig(tmp_path, docker_client, standin_image, unique, cleanup_containers)


def verify(client: Any, deployment: Deployment, deadline: float = WAIT) -> None:
    """The minimal verification: ready (giving up when the container exits), and the model listed.

    Raises:
        EndpointUnhealthy: the candidate exited, was not ready in time, or does not list the model.
    """
    wait_until_ready(deployment.endpoint, deadline_seconds=deadline,
                     give_up=exit_watch(client, deployment.container_id, deployment.container_name))
    if deployment.served_model_name not in list_models(deployment.endpoint):
        raise EndpointUnhealthy(f"{deployment.endpoint} does not list {deployment.served_model_name}")


def complete(endpoint: str, model: str) -> str:
    """One completion through ``endpoint``; its answer (the tiny model has no chat template)."""
    host, port = endpoint.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=WAIT)
    try:
        body = json.dumps({"model": model, "prompt": "ping"})
        connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        assert response.status == 200, data
        return str(json.loads(data)["choices"][0]["text"])
    finally:
        connection.close()


def models_root(endpoint: str) -> str:
    """The `root` of the one model /v1/models lists at ``endpoint``."""
    host, port = endpoint.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=WAIT)
    try:
        connection.request("GET", "/v1/models")
        return str(json.loads(connection.getresponse().read())["data"][0]["root"])
    finally:
        connection.close()


class ClientLoop(threading.Thread):
    """A client calling the stable endpoint in a loop on ONE keep-alive connection.

    Each round: a completion, a streamed completion, and /v1/models (whose `root` tells
    which model answered). Any non-200, broken answer or dropped connection is a failure.
    """

    def __init__(self, endpoint: str, model: str) -> None:
        super().__init__(daemon=True)
        host, port = endpoint.removeprefix("http://").rsplit(":", 1)
        self.connection = http.client.HTTPConnection(host, int(port), timeout=WAIT)
        self.model = model
        self.roots: list[str] = []
        self.failures: list[str] = []
        self.sockets: set[int] = set()
        self.halt = threading.Event()
        self.progress = threading.Condition()

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> bytes:
        payload = None if body is None else json.dumps(body)
        self.connection.request(method, path, body=payload, headers={"Content-Type": "application/json"})
        self.sockets.add(id(self.connection.sock))
        response = self.connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise AssertionError(f"{method} {path}: HTTP {response.status}: {data[:300]!r}")
        return data

    def run(self) -> None:
        message = {"model": self.model, "prompt": "ping"}
        while not self.halt.is_set():
            try:
                answer = json.loads(self._request("POST", "/v1/completions", message))
                if self.model not in answer["choices"][0]["text"]:
                    raise AssertionError(f"unexpected answer {answer}")
                streamed = self._request("POST", "/v1/completions", {**message, "stream": True})
                if not streamed.endswith(b"data: [DONE]\n\n"):
                    raise AssertionError(f"unexpected stream {streamed[:300]!r}")
                root = json.loads(self._request("GET", "/v1/models"))["data"][0]["root"]
            except Exception as exc:  # noqa: BLE001 - every failure is recorded and asserted on
                self.failures.append(f"{type(exc).__name__}: {exc}")
                self.connection.close()
                continue
            with self.progress:
                self.roots.append(root)
                self.progress.notify_all()

    def wait_for(self, root: str, times: int = 3) -> None:
        """Block until ``root`` answered ``times`` times (failing after a generous bound)."""
        with self.progress:
            if not self.progress.wait_for(lambda: self.roots.count(root) >= times or bool(self.failures), WAIT):
                pytest.fail(f"the client loop never saw {root} {times} times: {self.roots[-5:]}")
            if self.failures:
                pytest.fail(f"the client loop failed: {self.failures[0]}")

    def finish(self) -> None:
        self.halt.set()
        self.join(WAIT)
        self.connection.close()


@pytest.fixture
def client_loops() -> Any:
    loops: list[ClientLoop] = []
    yield loops
    for loop in loops:
        loop.finish()


def test_blue_green_switch_under_load_drops_no_request(rig: Rig, client_loops: list[ClientLoop]) -> None:
    """(a) A client on one keep-alive connection sees the old model, then the new, and never a failure."""
    model_a, model_b = rig.model("a", seed=1), rig.model("b", seed=2)
    first = rig.roll(model_a, weights="a")
    assert first.container_name == f"{rig.container_name}-blue" and first.previous_container_id is None
    loop = ClientLoop(first.stable_endpoint, rig.deploy.served_model_name)
    client_loops.append(loop)
    loop.start()
    loop.wait_for(rig.root("a"))

    second = rig.start(model_b, weights="b")
    assert second.container_name == f"{rig.container_name}-green"
    assert second.previous_container_id == first.container_id and second.model_root == rig.root("b")
    verify(rig.client, second)
    loop.wait_for(rig.root("a"), times=loop.roots.count(rig.root("a")) + 2)  # still served by A while B is verified
    promotion = promote(second, RolloutSpec(drain_seconds=30))
    loop.wait_for(rig.root("b"))
    loop.finish()

    assert loop.failures == []
    switch = loop.roots.index(rig.root("b"))
    assert switch > 0 and set(loop.roots[:switch]) == {rig.root("a")} and set(loop.roots[switch:]) == {rig.root("b")}
    assert len(loop.sockets) == 1  # the client's connection survived the switch
    assert promotion.switched and promotion.removed == [first.container_name] and promotion.still_in_flight == 0
    assert set(rig.containers()) == {f"{rig.container_name}-front", second.container_name}
    route = read_route(route_dir(rig.cache, rig.name))
    assert route is not None and (route.generation, route.upstream) == (2, f"{second.container_name}:8000")
    green = rig.containers()[second.container_name]
    assert green.labels["nimflow.role"] == "serve" and green.labels["nimflow.slot"] == "green"
    assert green.labels["nimflow.weights"] == "b" and green.attrs["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"

    # Unchanged spec: the serving container is kept and nothing is touched.
    again = rig.start(model_b, weights="b")
    assert again.reused and again.container_id == second.container_id
    assert promote(again, RolloutSpec()).removed == []
    assert rig.containers()[second.container_name].id == second.container_id


def test_failing_new_version_never_takes_traffic(rig: Rig, client_loops: list[ClientLoop]) -> None:
    """(b) A candidate that cannot load its model is removed; the old one answered throughout."""
    first = rig.roll(rig.model("a", seed=1))
    loop = ClientLoop(first.stable_endpoint, rig.deploy.served_model_name)
    client_loops.append(loop)
    loop.start()
    loop.wait_for(rig.root("a"))

    broken = rig.cache / "models" / "broken"
    broken.mkdir(parents=True)  # no config.json: NIM (and the stand-in) exit 1 at start-up
    candidate = rig.start(str(broken))
    with pytest.raises(EndpointUnhealthy, match="exit code 1"):
        verify(rig.client, candidate)
    abort(candidate)
    loop.wait_for(rig.root("a"), times=loop.roots.count(rig.root("a")) + 2)
    loop.finish()

    assert loop.failures == [] and set(loop.roots) == {rig.root("a")}
    assert set(rig.containers()) == {f"{rig.container_name}-front", first.container_name}
    assert rig.containers()[first.container_name].status == "running"
    route = read_route(route_dir(rig.cache, rig.name))
    assert route is not None and route.generation == 1
    assert "received: ping" in complete(first.stable_endpoint, rig.deploy.served_model_name)


def test_recreate_rolls_back_to_the_old_container(rig: Rig) -> None:
    """(c) recreate stops the old one first; when the new one fails, the old one is started again and answers."""
    first = rig.roll(rig.model("a", seed=1), strategy="recreate")
    broken = rig.cache / "models" / "broken"
    broken.mkdir(parents=True)

    candidate = rig.start(str(broken), strategy="recreate")
    assert candidate.previous_container_id == first.container_id
    assert rig.containers()[first.container_name].status == "exited"  # stopped, not removed
    with pytest.raises(EndpointUnhealthy):
        verify(rig.client, candidate)
    outcome = abort(candidate, deadline_seconds=WAIT)

    assert outcome.removed == candidate.container_name and outcome.restored == first.container_name
    assert set(rig.containers()) == {f"{rig.container_name}-front", first.container_name}
    assert models_root(first.stable_endpoint) == rig.root("a")
    assert "received: ping" in complete(first.stable_endpoint, rig.deploy.served_model_name)

    # A good recreate replaces it.
    second = rig.roll(rig.model("b", seed=2), strategy="recreate")
    assert set(rig.containers()) == {f"{rig.container_name}-front", second.container_name}
    assert models_root(second.stable_endpoint) == rig.root("b")


def test_foreign_containers_are_never_touched(rig: Rig, unique: str, cleanup_containers: list[str]) -> None:
    """(d) A container that is not this deployment's, holding one of its names or its port, is named, not removed."""
    first = rig.roll(rig.model("a", seed=1))
    green = f"{rig.container_name}-green"
    squatter = rig.client.containers.run(rig.serving.image, name=green, detach=True)
    with pytest.raises(DeploymentError) as caught:
        rig.start(rig.model("b", seed=2))
    message = str(caught.value)
    assert green in message and squatter.id[:12] in message and rig.serving.image in message and "docker rm" in message
    squatter.reload()
    assert squatter.status == "running"
    assert "received: ping" in complete(first.stable_endpoint, rig.deploy.served_model_name)
    squatter.remove(force=True)

    port = free_port()
    holder_name = f"foreign-{unique}"
    cleanup_containers.append(holder_name)
    holder = rig.client.containers.run(rig.serving.image, name=holder_name, detach=True, ports={"8000/tcp": ("127.0.0.1", port)})
    moved = rig.deploy.model_copy(update={"host_port": port})
    with pytest.raises(DeploymentError) as caught:
        rig.start(rig.model("b", seed=2), deploy=moved)
    message = str(caught.value)
    assert holder_name in message and holder.id[:12] in message and f"127.0.0.1:{port}" in message and "deploy.host_port" in message
    holder.reload()
    assert holder.status == "running"
    assert set(rig.containers()) == {f"{rig.container_name}-front", first.container_name}  # nothing started


def test_legacy_container_is_retired_by_the_first_rollout(rig: Rig) -> None:
    """A container from nimflow before rollouts (name cn, publishing host_port itself) is replaced by front + backend."""
    rig.model("a", seed=1)
    legacy = rig.client.containers.run(
        rig.serving.image, name=rig.container_name, detach=True,
        environment={"NIM_MODEL_NAME": rig.root("a"), "NIM_SERVED_MODEL_NAME": rig.deploy.served_model_name,
                     "NIMSTANDIN_READY_DELAY": "0"},
        volumes={str(rig.cache.resolve()): {"bind": "/opt/nim/.cache", "mode": "rw"}},
        ports={"8000/tcp": (rig.deploy.host, rig.deploy.host_port)},
        labels={"nimflow.deployment": rig.name, "nimflow.role": "serve", "nimflow.spec-hash": "old"},
    )
    stable = f"http://127.0.0.1:{rig.deploy.host_port}"
    wait_until_ready(stable, deadline_seconds=WAIT)

    candidate = rig.start(rig.model("b", seed=2))
    assert candidate.previous_container_id == legacy.id and candidate.container_name.endswith("-blue")
    verify(rig.client, candidate)
    promotion = promote(candidate, RolloutSpec(drain_seconds=5))

    assert promotion.removed == [rig.container_name] and promotion.front == "created"
    assert set(rig.containers()) == {f"{rig.container_name}-front", candidate.container_name}
    assert models_root(stable) == rig.root("b")


def test_new_nim_image_keeps_the_front_proxy(rig: Rig) -> None:
    """The front container is replaced only when the proxy program changes, never for a new NIM image."""
    from nimflow.testbed.nim_image import build_standin_image

    first = rig.roll(rig.model("a", seed=1))
    front = rig.containers()[f"{rig.container_name}-front"]
    other_image = "nimflow/nim-standin:rollout-other"
    build_standin_image(rig.client, other_image, trtllm_version="0.0.1+rollout")
    moved = rig.deploy.model_copy(update={"image": other_image})

    candidate = start_candidate(moved, RolloutSpec(), "blue-green", rig.name, rig.container_name,
                                rig.serving.model_copy(update={"image": other_image}), rig.model("a", seed=1), None, [],
                                "completions", {"nimflow.weights": "w"})
    assert not candidate.reused and candidate.previous_container_id == first.container_id
    verify(rig.client, candidate)
    promotion = promote(candidate, RolloutSpec(drain_seconds=5))

    assert promotion.front == "kept" and promotion.switched
    assert rig.containers()[f"{rig.container_name}-front"].id == front.id
    assert rig.containers()[candidate.container_name].attrs["Config"]["Image"] == other_image


def test_a_recreated_front_is_waited_for_not_its_predecessors_report(rig: Rig, tmp_path: Path) -> None:
    """A promotion that (re)creates the front proxy returns only once the *new* proxy process reports.

    Another host taking over the deployment on this Docker host (another cache dir, so another route
    dir) recreates the front. Its state dir holds a report left by an earlier proxy process, at a
    generation above the new route's. Before the fix, ``wait_applied`` took that stale report, the
    promotion returned at once, and the first client after it met a proxy not yet listening (the
    reconcile heal in the e2e suite failed this way: "still unhealthy ... RemoteProtocolError").
    Checked on the code before the fix: ``read_applied`` after the promotion still showed the stale
    upstream.
    """
    from nimflow.front_proxy import read_applied

    rig.roll(rig.model("a", seed=1))
    other_cache = tmp_path / "other-host-cache"
    other = rig.deploy.model_copy(update={"cache_dir": other_cache})
    stale_state = route_dir(other_cache, rig.name) / "state"
    stale_state.mkdir(parents=True)
    (stale_state / "applied.json").write_text(json.dumps({"generation": 99, "upstream": "http://gone:8000", "inflight": {}}))

    candidate = rig.start(rig.model("b", seed=2), deploy=other)
    verify(rig.client, candidate)
    promotion = promote(candidate, RolloutSpec(drain_seconds=5))

    assert promotion.front == "recreated"
    applied = read_applied(route_dir(other_cache, rig.name))
    assert applied is not None and applied.upstream != "http://gone:8000", applied
    # The very first request after the promotion is answered by the new backend.
    assert models_root(f"http://127.0.0.1:{rig.deploy.host_port}") == models_root(candidate.endpoint) != rig.root("a")
