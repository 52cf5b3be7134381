"""Verification levels against a small NIM-like HTTP server on loopback (real HTTP, no mocks).

The server answers like NIM's documented surface (/v1/health/*, /v1/models with root/parent,
/v1/version, /v1/metadata, chat and text completions); each test changes one thing about it and
asserts the level that fails, never how long anything took.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest

from nimflow.errors import EndpointUnhealthy
from nimflow.nim_api import text_completion
from nimflow.records import Deployment
from nimflow.spec import VerifySpec
from nimflow.testbed.background_server import BackgroundServer
from nimflow.verification import ContainerProbe, check_levels, container_identity_problem

SERVED, ROOT = "my-model", "/opt/nim/.cache/models/org--tiny/abc"


@dataclass
class NimBehaviour:
    """What the fake NIM answers; tests change one field each."""

    models: list[dict[str, Any]] = field(default_factory=lambda: [{"id": SERVED, "root": ROOT, "parent": None}])
    not_ready_polls: int = 0  # /v1/health/ready answers 503 this many times first
    live_status: int = 200
    version: str | None = None  # /v1/version release; None: 404
    metadata: dict[str, Any] | None = None  # /v1/metadata; None: 404
    chat_template: bool = True  # False: chat is refused with 400, like vLLM without a template
    answer_prefix: str = "echo: "
    slow_prompt: str | None = None  # completions of this prompt sleep `slow_seconds` first
    slow_seconds: float = 0.0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    @property
    def nim(self) -> FakeNim:
        return self.server.owner  # type: ignore[attr-defined]

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        b = self.nim.behaviour
        self.nim._record("GET", self.path)
        if self.path == "/v1/health/live":
            self._send(b.live_status, {"message": "live"})
        elif self.path == "/v1/health/ready":
            polls = sum(1 for r in self.nim.requests if r == ("GET", "/v1/health/ready"))
            self._send(503 if polls <= b.not_ready_polls else 200, {"message": "ready?"})
        elif self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"object": "model", **m} for m in b.models]})
        elif self.path == "/v1/version" and b.version is not None:
            self._send(200, {"release": b.version, "api": "1.0.0"})
        elif self.path == "/v1/metadata" and b.metadata is not None:
            self._send(200, b.metadata)
        else:
            self._send(404, {"error": {"message": f"Not found: {self.path}"}})

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        b = self.nim.behaviour
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.nim._record("POST", self.path, request.get("model"))
        if request.get("model") not in {m["id"] for m in b.models}:
            self._send(404, {"error": {"message": f"The model `{request.get('model')}` does not exist."}})
        elif self.path == "/v1/chat/completions":
            if not b.chat_template:
                self._send(400, {"error": {"message": "this model's tokenizer has no chat_template"}})
                return
            text = b.answer_prefix + request["messages"][-1]["content"]
            self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})
        elif self.path == "/v1/completions":
            if b.slow_prompt is not None and request["prompt"] == b.slow_prompt:
                time.sleep(b.slow_seconds)
            self._send(200, {"choices": [{"index": 0, "text": b.answer_prefix + request["prompt"]}]})
        else:
            self._send(404, {"error": {"message": f"Not found: {self.path}"}})


class FakeNim(BackgroundServer):
    handler = _Handler

    def __init__(self, behaviour: NimBehaviour) -> None:
        super().__init__()
        self.behaviour = behaviour


@pytest.fixture
def nim() -> Any:
    with FakeNim(NimBehaviour()) as server:
        yield server


def deployment(endpoint: str, **changes: Any) -> Deployment:
    fields: dict[str, Any] = dict(
        name="t", container_id="0" * 64, container_name="nimflow-t", endpoint=endpoint, stable_endpoint=endpoint,
        served_model_name=SERVED, model_root=ROOT, nim_api="1.x", api="chat", adapters=[],
    )
    return Deployment(**{**fields, **changes})


def verify(**changes: Any) -> VerifySpec:
    return VerifySpec(**{"deadline_seconds": 30, "progress_seconds": 0.01, **changes})


def failure(nim: FakeNim, dep: Deployment | None = None, spec: VerifySpec | None = None, **kwargs: Any) -> str:
    with pytest.raises(EndpointUnhealthy) as caught:
        check_levels(dep or deployment(nim.url), spec or verify(), poll_seconds=0.05, **kwargs)
    return str(caught.value)


def test_all_levels_pass_in_order(nim: FakeNim) -> None:
    nim.behaviour.not_ready_polls = 2
    spec = verify(golden=[{"prompt": "capital of France", "expect": ["France"]}], max_latency_seconds=60)
    health = check_levels(deployment(nim.url), spec, poll_seconds=0.05)
    assert health.checks == ["live", "ready", "model", "answer", "golden", "latency"]
    assert health.models == [SERVED]
    assert health.completion == "echo: " + spec.prompt
    assert health.latency_seconds is not None


def test_optional_levels_are_not_claimed_when_not_configured(nim: FakeNim) -> None:
    assert check_levels(deployment(nim.url), verify(), poll_seconds=0.05).checks == ["live", "ready", "model", "answer"]


def test_nim_without_live_endpoint_still_passes_live(nim: FakeNim) -> None:
    nim.behaviour.live_status = 404  # NIM 1.0 documented only /v1/health/ready
    assert check_levels(deployment(nim.url), verify(), poll_seconds=0.05).checks[:2] == ["live", "ready"]


def test_root_naming_another_model_fails_at_model(nim: FakeNim) -> None:
    # What a model-specific NIM image answers when it serves its bundled model instead.
    nim.behaviour.models = [{"id": SERVED, "root": "meta/llama-3.1-8b-instruct", "parent": None}]
    message = failure(nim)
    assert message.startswith("verification failed at model: ")
    assert "meta/llama-3.1-8b-instruct" in message and ROOT in message and "NIM_MODEL_NAME" in message


@pytest.mark.parametrize("root, model_root", [
    (SERVED, ROOT),  # a name: the served name, for the directory nimflow gave
    ("meta/llama3-8b-instruct", "meta/llama3-8b-instruct"),  # published 1.x answer: root = the model's name
    ("/opt/nim/workspace/model", ROOT),  # a path: vLLM reports the path it loaded, maybe NIM's own copy
])
def test_root_as_real_nim_reports_it_passes(nim: FakeNim, root: str, model_root: str) -> None:
    """Real NIM 1.x reports ``root`` as the model's name (``"root": "meta/llama3-8b-instruct"`` in a
    published /v1/models answer), vLLM as the path it loaded. On old main (6c010bf) the first and
    third cases failed: ``verification failed at model: 'my-model' is served from 'my-model', but
    the container was told to serve '/opt/nim/.cache/models/org--tiny/abc'`` (checked by running
    this test against old main's nimflow/verification.py)."""
    nim.behaviour.models = [{"id": SERVED, "root": root, "parent": None}]
    health = check_levels(deployment(nim.url, model_root=model_root), verify(), poll_seconds=0.05)
    assert health.checks == ["live", "ready", "model", "answer"]


def test_container_identity_problem_fails_at_model(nim: FakeNim) -> None:
    probe = ContainerProbe(identity=lambda: "container nimflow-t carries nimflow.weights='x', not 'y'")
    message = failure(nim, probe=probe)
    assert message == "verification failed at model: container nimflow-t carries nimflow.weights='x', not 'y'"


def test_trailing_slash_is_the_same_root(nim: FakeNim) -> None:
    nim.behaviour.models = [{"id": SERVED, "root": ROOT + "/", "parent": None}]
    assert "model" in check_levels(deployment(nim.url), verify(), poll_seconds=0.05).checks


def test_served_name_not_listed_fails_at_model(nim: FakeNim) -> None:
    message = failure(nim, deployment(nim.url, served_model_name="other-name"))
    assert message.startswith("verification failed at model: ") and "deploy.served_model_name" in message


def test_missing_adapter_fails_at_model(nim: FakeNim) -> None:
    message = failure(nim, deployment(nim.url, adapters=["sql-lora"]))
    assert message.startswith("verification failed at model: ") and "'sql-lora'" in message and "lora.adapters" in message


def test_adapter_on_another_parent_fails_at_model(nim: FakeNim) -> None:
    nim.behaviour.models.append({"id": "sql-lora", "root": "/loras/sql-lora", "parent": "someone-else"})
    message = failure(nim, deployment(nim.url, adapters=["sql-lora"]))
    assert message.startswith("verification failed at model: ") and "someone-else" in message


def test_adapters_listed_and_answering_pass(nim: FakeNim) -> None:
    nim.behaviour.models.append({"id": "sql-lora", "root": "/loras/sql-lora", "parent": SERVED})
    health = check_levels(deployment(nim.url, adapters=["sql-lora"]), verify(), poll_seconds=0.05)
    assert health.checks == ["live", "ready", "model", "answer"]
    assert ("POST", "/v1/chat/completions", "sql-lora") in nim.requests  # the adapter answered by its name


def test_nim2_image_routed_as_1x_fails_at_model_naming_the_fix(nim: FakeNim) -> None:
    nim.behaviour.version = "2.0.12"
    message = failure(nim)
    assert message.startswith("verification failed at model: ")
    assert "NIM 2.x" in message and "deploy.nim_api: 2.x" in message


def test_1x_version_on_1x_route_passes(nim: FakeNim) -> None:
    nim.behaviour.version = "1.8.4"
    assert "model" in check_levels(deployment(nim.url), verify(), poll_seconds=0.05).checks


#: A /v1/metadata answer with the fields NIM 2.x documents (API reference, "Deployment metadata").
METADATA_2X = {"version": "2.0.12", "modelInfo": [{"shortName": SERVED}], "selectedModelProfileId": "ab12",
               "repository_override": "", "assetInfo": [], "licenseInfo": {}}


def test_2x_metadata_of_the_documented_shape_passes_without_the_model_path(nim: FakeNim) -> None:
    """The documented schema has no field for where the model was loaded from. On old main
    (6c010bf) this failed: ``verification failed at model: http://...//v1/metadata does not name
    '/opt/nim/.cache/models/org--tiny/abc' (NIM_MODEL_PATH)`` (run against old main's verification.py)."""
    nim.behaviour.version = "2.0.12"
    nim.behaviour.metadata = METADATA_2X
    assert "model" in check_levels(deployment(nim.url, nim_api="2.x"), verify(), poll_seconds=0.05).checks


@pytest.mark.parametrize("change, named", [
    ({"selectedModelProfileId": None}, "selectedModelProfileId (str)"),
    ({"version": 2}, "version (str)"),
    ({"modelInfo": []}, "lists no model in modelInfo"),
])
def test_2x_metadata_without_a_documented_field_fails_at_model(nim: FakeNim, change: dict[str, Any], named: str) -> None:
    nim.behaviour.version = "2.0.12"
    nim.behaviour.metadata = {**METADATA_2X, **change}
    message = failure(nim, deployment(nim.url, nim_api="2.x"))
    assert message.startswith("verification failed at model: ") and "/v1/metadata" in message and named in message


def test_2x_without_metadata_fails_at_model(nim: FakeNim) -> None:
    message = failure(nim, deployment(nim.url, nim_api="2.x"))
    assert message.startswith("verification failed at model: ") and "deploy.nim_api" in message


def test_chat_refused_without_template_fails_at_answer_with_the_fix(nim: FakeNim) -> None:
    nim.behaviour.chat_template = False
    message = failure(nim)
    assert message.startswith("verification failed at answer: ")
    assert "no chat_template" in message  # the server's own words
    assert "verify.api: completions" in message


def test_completions_api_uses_v1_completions(nim: FakeNim) -> None:
    nim.behaviour.chat_template = False
    health = check_levels(deployment(nim.url, api="completions"), verify(), poll_seconds=0.05)
    assert health.completion == "echo: " + verify().prompt
    assert ("POST", "/v1/completions", SERVED) in nim.requests
    assert not any(r[:2] == ("POST", "/v1/chat/completions") for r in nim.requests)


def test_text_completion_reads_choices_text(nim: FakeNim) -> None:
    assert text_completion(nim.url, SERVED, "abc") == "echo: abc"


def test_golden_mismatch_fails_at_golden(nim: FakeNim) -> None:
    spec = verify(golden=[{"prompt": "2+2?", "expect": ["2+2", "four"]}])
    message = failure(nim, spec=spec)
    assert message.startswith("verification failed at golden: ")
    assert "verify.golden[0]" in message and "['four']" in message


def test_latency_budget_fails_at_latency(nim: FakeNim) -> None:
    nim.behaviour.slow_prompt, nim.behaviour.slow_seconds = "slow one", 0.5
    spec = verify(golden=[{"prompt": "slow one", "expect": ["slow"]}], max_latency_seconds=0.01)
    message = failure(nim, deployment(nim.url, api="completions"), spec)
    assert message.startswith("verification failed at latency: ")
    assert "golden prompt 0" in message and "verify.max_latency_seconds" in message


def test_never_ready_fails_at_ready_at_the_deadline(nim: FakeNim) -> None:
    nim.behaviour.not_ready_polls = 10**9
    message = failure(nim, spec=verify(deadline_seconds=0.3))
    assert message.startswith("verification failed at ready: ")
    assert "verify.deadline_seconds" in message and "HTTP 503" in message


def test_nothing_listening_fails_at_live() -> None:
    from nimflow.testbed.services import free_port

    dep = deployment(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(EndpointUnhealthy) as caught:
        check_levels(dep, verify(deadline_seconds=0.3), poll_seconds=0.05)
    assert str(caught.value).startswith("verification failed at live: ")


def test_give_up_fails_at_once_naming_the_level_waited_for(nim: FakeNim) -> None:
    nim.behaviour.not_ready_polls = 10**9
    # With live answered, the watch fires while waiting for ready; the deadline is far away.
    calls = iter([None, None] + ["container nimflow-t exited with exit code 1"] * 100)
    probe = ContainerProbe(give_up=lambda: next(calls))
    message = failure(nim, spec=verify(deadline_seconds=600), probe=probe)
    assert message.startswith("verification failed at ready: container nimflow-t exited with exit code 1")


def test_progress_reports_container_state_while_waiting(nim: FakeNim, caplog: pytest.LogCaptureFixture) -> None:
    nim.behaviour.not_ready_polls = 3
    probe = ContainerProbe(describe=lambda: "running, restarts 0; latest log line: building engine 40%")
    log = logging.getLogger("test.verification.progress")
    with caplog.at_level(logging.INFO, logger=log.name):
        check_levels(deployment(nim.url), verify(progress_seconds=0.01), probe=probe, log=log, poll_seconds=0.05)
    progress = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert progress and "building engine 40%" in progress[0] and "HTTP 503" in progress[0]


# --- container identity: docker inspect of the container behind the endpoint ----------------------

HOST_DIR = "/srv/cache/models/org--tiny/abc"


def inspected(**changes: Any) -> dict[str, Any]:
    """``docker inspect`` of a container as nimflow starts one for :func:`identity_deployment`."""
    attrs: dict[str, Any] = {
        "Config": {"Labels": {"nimflow.weights": "org/tiny@abc", "nimflow.engine-key": "k1", "other": "x"},
                   "Env": [f"NIM_MODEL_NAME={ROOT}", "NIM_SERVED_MODEL_NAME=my-model"]},
        "Mounts": [{"Type": "bind", "Source": "/srv/cache/nimflow-nim/t", "Destination": "/opt/nim/.cache", "RW": True},
                   {"Type": "bind", "Source": HOST_DIR, "Destination": ROOT, "RW": False}],
        "NetworkSettings": {"Ports": {"8000/tcp": [{"HostIp": "127.0.0.1", "HostPort": "18001"}]}},
    }
    return {**attrs, **changes}


def identity_deployment(**changes: Any) -> Deployment:
    fields = {"model_source": HOST_DIR, "labels": {"nimflow.weights": "org/tiny@abc", "nimflow.engine-key": "k1"}}
    return deployment("http://127.0.0.1:18001", **{**fields, **changes})


def test_container_nimflow_started_for_the_deployment_has_no_identity_problem() -> None:
    assert container_identity_problem(inspected(), identity_deployment()) is None
    # A manifest model (no directory of nimflow's): only the port and the labels are compared.
    assert container_identity_problem(inspected(Mounts=[]), identity_deployment(model_source=None)) is None


def test_container_identity_problems_name_what_differs() -> None:
    dep = identity_deployment()
    config = inspected()["Config"]
    old_weights = {**config["Labels"], "nimflow.weights": "org/tiny@old"}
    wrong_label = container_identity_problem(inspected(Config={**config, "Labels": old_weights}), dep)
    assert wrong_label is not None and "nimflow.weights='org/tiny@old', not 'org/tiny@abc'" in wrong_label
    wrong_env = container_identity_problem(inspected(Config={**config, "Env": ["NIM_MODEL_NAME=/other"]}), dep)
    assert wrong_env is not None and "NIM_MODEL_NAME='/other'" in wrong_env
    other_dir = [{"Type": "bind", "Source": "/srv/elsewhere", "Destination": ROOT, "RW": False}]
    wrong_mount = container_identity_problem(inspected(Mounts=other_dir), dep)
    assert wrong_mount is not None and "/srv/elsewhere (ro)" in wrong_mount and HOST_DIR in wrong_mount
    writable = [{"Type": "bind", "Source": HOST_DIR, "Destination": ROOT, "RW": True}]
    assert "read-only" in str(container_identity_problem(inspected(Mounts=writable), dep))
    other_port = inspected(NetworkSettings={"Ports": {"8000/tcp": [{"HostIp": "127.0.0.1", "HostPort": "18002"}]}})
    assert "another server answers there" in str(container_identity_problem(other_port, dep))
