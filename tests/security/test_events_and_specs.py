"""Issue 13: events, deployment-run parameters, spec files and endpoint URLs from outside stay contained.

Attacks, each through a public entry point:

* a deployment run whose ``spec`` is the path of a YAML file elsewhere on the host;
* ``nimflow.checkpoint.landed`` events (``POST /api/events``, the trigger of prefect.yaml) whose
  ``checkpoint_uri`` is outside the spec's ``watch.s3_prefix``: another bucket, ``..``, a sibling prefix;
* a 531-byte YAML alias bomb in the specs directory, beside a valid spec;
* an ``HF_ENDPOINT`` with ``user:password@`` that cannot be reached, under ``nimflow host``.

Deployment runs are created on the test bed's Prefect API and executed as a process worker executes
them (``python -m prefect.engine`` with ``PREFECT__FLOW_RUN_ID``, from the deployment's path).
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

import boto3
import pytest
import yaml

from nimflow.testbed.services import S3_TEST_CREDENTIALS, Service, create_bucket
from tests.conftest import write_spec

pytestmark = pytest.mark.testbed

REPO_ROOT = Path(__file__).resolve().parents[2]
PREFECT_YAML = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
DEPLOYMENTS = {d["name"]: d for d in PREFECT_YAML["deployments"]}
#: How long a created run may take to appear, and an executed run to end (generous: a loaded machine).
DEADLINE_S = 120.0


# --- deployment runs on the test bed's Prefect API ------------------------------------------------


def _flow(entrypoint: str) -> Any:
    from prefect.flows import load_flow_from_entrypoint

    path, _, function = entrypoint.partition(":")
    return load_flow_from_entrypoint(f"{REPO_ROOT / path}:{function}", use_placeholder_flow=False)


def _deploy(prefect_name: str, unique: str) -> UUID:
    """The deployment ``prefect_name`` of prefect.yaml (entrypoint, schema, enforcement), under a unique name."""
    from prefect.client.orchestration import get_client
    from prefect.utilities.callables import parameter_schema

    config = DEPLOYMENTS[prefect_name]
    flow = _flow(config["entrypoint"])
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(flow.name)
        return client.create_deployment(
            flow_id=flow_id, name=f"{prefect_name}-{unique}", entrypoint=config["entrypoint"], path=str(REPO_ROOT),
            parameter_openapi_schema=parameter_schema(flow).model_dump(),
            enforce_parameter_schema=config.get("enforce_parameter_schema", True),
        )


def _execute(run_id: UUID, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], Any]:
    """Run a created flow run as a process worker does; return the process and the run as the API holds it."""
    from prefect.client.orchestration import get_client

    done = subprocess.run([sys.executable, "-m", "prefect.engine"], capture_output=True, text=True, timeout=DEADLINE_S * 2,
                          env={**os.environ, **env, "PREFECT__FLOW_RUN_ID": str(run_id)}, cwd=REPO_ROOT)
    with get_client(sync_client=True) as client:
        return done, client.read_flow_run(run_id)


def _runs_of(deployment_id: UUID) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def _wait_for(what: str, probe: Any) -> Any:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


def _assert_refused(done: subprocess.CompletedProcess[str], run: Any, *needles: str) -> str:
    """The run failed with one ConfigError naming ``needles``; the process exited normally (no signal)."""
    assert done.returncode >= 0, f"killed by signal {-done.returncode}"
    assert run.state.is_failed(), (run.state, done.stderr[-3000:])
    message = run.state.message or ""
    assert "ConfigError" in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


@pytest.fixture
def specs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "specs"
    folder.mkdir()
    monkeypatch.setenv("NIMFLOW_SPECS_DIR", str(folder))
    return folder


def _tree_holds(root: Path, marker: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and marker in p.read_bytes()] if root.exists() else []


def test_a_deployment_run_cannot_name_a_spec_file(
    tmp_path: Path, specs_dir: Path, prefect_api: str, unique: str
) -> None:
    """A run of the host-model deployment with ``spec`` = a YAML file elsewhere on the host is refused.

    The attacker turns schema enforcement off for the run (any API client may), so only the flow stands
    between the parameter and ``load_spec``. Checked before the fix: the file was loaded and the run went
    on with it, failing later with ``DeploymentError: image 'nimflow/<marker>:x' is not on this Docker host``.
    """
    marker = f"marker-{uuid.uuid4().hex}"
    write_spec(specs_dir / "good.yaml", {"name": f"good-{unique}", "source": {"repo_id": "org/good"},
                                         "deploy": {"image": "nimflow/none:x", "served_model_name": "good",
                                                    "cache_dir": str(tmp_path / "cache")}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    evil_cache = tmp_path / "evil-cache"
    evil = write_spec(elsewhere / "evil.yaml", {
        "name": f"evil-{unique}", "source": {"repo_id": f"org/{marker}"},
        "deploy": {"image": f"nimflow/{marker}:x", "served_model_name": marker, "cache_dir": str(evil_cache)},
    })
    from prefect.client.orchestration import get_client

    deployment_id = _deploy("host-model", unique)
    with get_client(sync_client=True) as client:  # the raw API call: Prefect's client has no such switch
        response = client.request("POST", f"/deployments/{deployment_id}/create_flow_run",  # type: ignore[arg-type]
                                  json={"parameters": {"spec": str(evil)}, "enforce_parameter_schema": False})
        response.raise_for_status()
    done, final = _execute(UUID(response.json()["id"]), {"PREFECT_API_URL": prefect_api, "NIMFLOW_SPECS_DIR": str(specs_dir)})

    message = _assert_refused(done, final, "spec", str(evil), "not a spec name", f"good-{unique}")
    assert marker not in message  # nothing of the file was read into the run
    assert not evil_cache.exists() and not (tmp_path / "cache").exists()
    assert _tree_holds(tmp_path / "specs", marker.encode()) == []


def _s3(s3_server: Service) -> Any:
    return boto3.client("s3", endpoint_url=s3_server.url, region_name="us-east-1",
                        aws_access_key_id=S3_TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])


@pytest.fixture
def checkpoint_automation(unique: str, prefect_api: str) -> Iterator[tuple[UUID, UUID]]:
    """host-on-checkpoint as prefect.yaml defines it (entrypoint, schema, enforcement) with the checkpoint
    trigger as bootstrap creates it (nimflow/checkpoint_trigger.py), under a unique name; its trigger
    matches only this test's sources. Yields (deployment id, automation id)."""
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.events import ResourceSpecification

    from nimflow.checkpoint_trigger import checkpoint_automation as owned_trigger

    deployment_id = _deploy("host-on-checkpoint", unique)
    automation = owned_trigger(deployment_id)
    automation.name = f"host-on-checkpoint-{unique}"
    automation.trigger.match = ResourceSpecification({"prefect.resource.id": f"nimflow.source.s3.{unique}-*", "nimflow.spec": "?*"})
    with get_client(sync_client=True) as client:
        automation_id = client.create_automation(automation)
    yield deployment_id, automation_id
    with get_client(sync_client=True) as client:
        client.delete_automation(automation_id)


def _emit(resource: dict[str, str], payload: dict[str, Any]) -> None:
    """``POST /api/events``, as any holder of API access can."""
    from prefect.client.orchestration import get_client

    body = [{"id": str(uuid.uuid4()), "occurred": datetime.now(timezone.utc).isoformat(),
             "event": "nimflow.checkpoint.landed", "resource": resource, "payload": payload}]
    with get_client(sync_client=True) as client:
        client.request("POST", "/events", json=body).raise_for_status()


def _action_failures(automation_id: UUID) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    flt = EventFilter(event=EventNameFilter(name=["prefect.automation.action.failed"]),
                      resource=EventResourceFilter(id=[f"prefect.automation.{automation_id}"]))
    with get_client(sync_client=True) as client:
        return list(client.read_events(filter=flt, limit=50).events)


def test_an_event_cannot_aim_a_run_outside_the_watch_prefix(
    tmp_path: Path, specs_dir: Path, s3_server: Service, prefect_api: str, unique: str,
    checkpoint_automation: tuple[UUID, UUID],
) -> None:
    """Events whose ``uri`` lies outside ``watch.s3_prefix`` start runs that refuse it before any byte moves.

    Outside: another bucket (the attacker's, holding weights with a marker), ``prefix/../other``, and a
    sibling ``prefix-evil/``. An event whose spec is a path creates no run at all (the trigger's schema).
    Checked before the fix: the first run took the URI as ``finetune.path`` and went on (it failed later,
    ``DeploymentError: image 'nimflow/none:x' is not on this Docker host``, no word about ``checkpoint_uri``).
    """
    deployment_id, automation_id = checkpoint_automation
    marker = f"marker-{uuid.uuid4().hex}".encode()
    good, evil = f"{unique}-ckpts", f"{unique}-evil"
    s3 = _s3(s3_server)
    for bucket in (good, evil):
        create_bucket(s3_server.url, bucket)
    for key in ("c1/config.json", "c1/model.safetensors", "runs-evil/c1/model.safetensors"):
        s3.put_object(Bucket=evil if key.startswith("c1") else good, Key=key, Body=marker)
    s3.put_object(Bucket=good, Key="runs/c0/model.safetensors", Body=b"ok")
    prefix = f"s3://{good}/runs/"
    name = f"watched-{unique}"
    cache = tmp_path / "cache"
    write_spec(specs_dir / "watched.yaml", {
        "name": name, "source": {"repo_id": "org/base"},
        "finetune": {"path": f"{prefix}c0/", "endpoint_url": s3_server.url},
        "watch": {"s3_prefix": prefix, "endpoint_url": s3_server.url},
        "deploy": {"image": "nimflow/none:x", "served_model_name": name, "cache_dir": str(cache)},
    })
    resource = {"prefect.resource.id": f"nimflow.source.s3.{good}/runs", "prefect.resource.name": prefix,
                "nimflow.spec": name}
    env = {"PREFECT_API_URL": prefect_api, "NIMFLOW_SPECS_DIR": str(specs_dir), "AWS_ENDPOINT_URL": s3_server.url,
           **S3_TEST_CREDENTIALS}

    for uri in (f"s3://{evil}/c1/", f"{prefix}../../{evil}/c1/", f"s3://{good}/runs-evil/c1/"):
        _emit(resource, {"spec": name, "uri": uri})
        run = _wait_for(f"the run of the event for {uri}",
                        lambda uri=uri: [r for r in _runs_of(deployment_id) if r.parameters.get("checkpoint_uri") == uri])[0]
        assert run.parameters["spec"] == name
        done, final = _execute(run.id, env)
        _assert_refused(done, final, "checkpoint_uri", repr(uri), prefix)
        assert _tree_holds(cache, marker) == [] and _tree_holds(tmp_path, marker) == []

    # A spec that is a path never becomes a run: the trigger's schema refuses it (action.failed).
    _emit({**resource, "nimflow.spec": str(specs_dir / "watched.yaml")}, {"uri": f"{prefix}c2/"})
    failure = _wait_for("the trigger's refusal of a path as spec", lambda: _action_failures(automation_id))[0]
    assert "spec" in json.dumps(failure.payload), failure.payload
    assert not [r for r in _runs_of(deployment_id) if r.parameters.get("checkpoint_uri") == f"{prefix}c2/"]


# --- spec files -----------------------------------------------------------------------------------

#: "Billion laughs": nine levels of nine aliases in 428 bytes (the review's was 531), 9**9 strings expanded.
ALIAS_BOMB = (
    'name: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8))
    + "source: *i\n"
)

_REGISTRY_CHILD = """
import json, sys, time
from nimflow.spec_registry import find_specs, load_named_spec
started = time.process_time()
names = sorted(find_specs())
spec = load_named_spec(sys.argv[1])
print(json.dumps({"cpu_s": time.process_time() - started, "names": names, "loaded": spec.name}))
"""


def _limited() -> None:
    """In the child: a CPU and memory ceiling, so the code before the fix ends instead of eating the machine."""
    resource.setrlimit(resource.RLIMIT_CPU, (60, 60))
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def test_an_alias_bomb_in_the_specs_directory_is_refused_fast_and_others_still_load(tmp_path: Path, unique: str) -> None:
    """The registry parses every spec on every run: the bomb is reported and skipped in well under 2 s of CPU.

    Before the fix the child spent its whole 60 s CPU ceiling on the bomb and was killed (SIGKILL).
    """
    assert len(ALIAS_BOMB.encode()) <= 531, len(ALIAS_BOMB.encode())
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "bomb.yaml").write_text(ALIAS_BOMB)
    name = f"good-{unique}"
    write_spec(specs / "good.yaml", {"name": name, "source": {"repo_id": "org/good"},
                                     "deploy": {"image": "nimflow/none:x", "served_model_name": name,
                                                "cache_dir": str(tmp_path / "cache")}})
    done = subprocess.run([sys.executable, "-c", _REGISTRY_CHILD, name], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NIMFLOW_SPECS_DIR": str(specs)}, cwd=REPO_ROOT, preexec_fn=_limited)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["cpu_s"] < 2.0, result
    assert result["names"] == [name] and result["loaded"] == name
    # The bad file is reported, by name and with the reason.
    assert "bomb.yaml" in done.stderr and "aliases" in done.stderr, done.stderr[-2000:]


# --- credentials in endpoint URLs ---------------------------------------------------------------


def test_an_hf_endpoint_password_never_appears_in_what_nimflow_host_prints(
    tmp_path: Path, prefect_api: str, standin_image: str, unique: str
) -> None:
    """``HF_ENDPOINT=http://user:PASSWORD@host:port`` that does not answer: the run fails with one
    ``nimflow:`` line naming the endpoint without its password, and no output holds the password.

    Checked before the fix: the line read ``nimflow: ServiceUnavailable: resolving org/creds-…@main on
    http://nimflow:<password>@127.0.0.1:<port>: ConnectError: [Errno 111] Connection refused``.
    """
    password = f"pw-{uuid.uuid4().hex}"
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spec = write_spec(tmp_path / "spec.yaml", {
        "name": f"creds-{unique}", "source": {"repo_id": f"org/creds-{unique}", "revision": "main"},
        "deploy": {"image": standin_image, "served_model_name": "creds", "cache_dir": str(tmp_path / "cache")},
    })
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "HF_ENDPOINT": f"http://nimflow:{password}@127.0.0.1:{port}",
           "NIMFLOW_RETRY_DELAY_SECONDS": "0.1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    for key in ("HF_TOKEN", "NGC_API_KEY"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-m", "nimflow.cli", "host", str(spec)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path)

    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("nimflow: "), done.stderr[-3000:]
    assert f"http://***@127.0.0.1:{port}" in last, last
    assert password not in done.stdout and password not in done.stderr
