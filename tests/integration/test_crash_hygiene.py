"""Issue 15, crash hygiene: a run that is cancelled, terminated or killed leaves nothing behind.

A flow process is interrupted the way a Prefect process worker cancels it (SIGTERM to the flow
process: Prefect raises ``TerminationSignal``, a ``BaseException``) or the way a crash kills it
(SIGKILL). Real Prefect API, real Docker engine, the NIM stand-in held not ready or building slowly
through its env knobs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import httpx
import pytest
from nimflow.flows.host_model import host_model
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
from prefect.states import Crashed, Running

from nimflow.run_owner import FLOW_RUN_LABEL, PREFECT_API_LABEL
from nimflow.testbed.nim_image import standin_weights_digest
from nimflow.testbed.tiny_model import write_tiny_llama
from tests.conftest import write_spec
from tests.integration.test_host_model import make_spec, publish_tiny, task_runs

pytestmark = pytest.mark.testbed
#: A bound on how long a state the test waits for may take to appear (not a measure).
WAIT_S = 180
T = TypeVar("T")


@dataclass
class FlowProcess:
    """``host_model`` running in a process of its own, its output in a file (a pipe nobody reads would block it)."""

    process: subprocess.Popen[str]
    log: Path

    def output(self) -> str:
        """The last lines the flow process printed."""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])


def poll(what: str, probe: Callable[[], T | None], flow_process: FlowProcess | None = None) -> T:
    """``probe()``'s first truthy answer, polled until WAIT_S; fails naming ``what`` (and the flow's output)."""
    deadline = time.monotonic() + WAIT_S
    while not (found := probe()):
        if flow_process is not None and flow_process.process.poll() is not None:
            pytest.fail(f"the flow process ended (exit {flow_process.process.returncode}) before {what}:\n{flow_process.output()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {WAIT_S}s")
        time.sleep(0.5)
    return found


@pytest.fixture
def flow_processes() -> Iterator[list[FlowProcess]]:
    """Flow processes a test starts; killed afterwards if still alive."""
    started: list[FlowProcess] = []
    yield started
    for flow_process in started:
        if flow_process.process.poll() is None:
            flow_process.process.kill()
            flow_process.process.wait(timeout=30)


def start_flow_process(spec_path: Path, run_name: str, prefect_api: str, processes: list[FlowProcess]) -> FlowProcess:
    """``host_model`` in a process of its own, as a process worker runs it, under a known run name."""
    script = ("import sys\nfrom nimflow.flows.host_model import host_model\n"
              "host_model.with_options(flow_run_name=sys.argv[2])(spec=sys.argv[1])\n")
    log = spec_path.with_suffix(".log")
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-c", script, str(spec_path), run_name], text=True,
                                   stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PREFECT_API_URL": prefect_api})
    processes.append(FlowProcess(process, log))
    return processes[-1]


def flow_run_id_named(name: str) -> UUID | None:
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
    return runs[0].id if runs else None


def task_running(flow_run_id: UUID, task_name: str) -> bool:
    run = task_runs(flow_run_id).get(task_name)
    return run is not None and run.state is not None and run.state.is_running()


def serving_containers(docker_client: Any, name: str) -> list[Any]:
    return [c for c in docker_client.containers.list(all=True, filters={"label": f"nimflow.deployment={name}"})
            if c.labels.get("nimflow.role") == "serve"]


def test_terminated_during_verification_rolls_back_recreate(
    tmp_path: Path, testbed_env: dict, prefect_api: str, standin_image: str, unique: str, cleanup_containers: list,
    docker_client: Any, flow_processes: list,
) -> None:
    """SIGTERM to the flow process (what a process worker sends to cancel a run) while a recreate
    candidate is being verified: the candidate is removed and the old backend serves again.

    On old main (the clean-up under ``except Exception``; checked by running this test with
    flows/host_model.py, nimflow/rollout.py and nimflow/containers.py of main) the TerminationSignal
    passed the clean-up: the not-ready candidate (``-green``) was left running and the old backend
    (``-blue``) stayed ``exited``, so the endpoint was down (the first assertion after the signal failed).
    """
    name = f"cancel-{unique}"
    base = write_tiny_llama(tmp_path / "base")
    spec = make_spec(tmp_path, name, "org/unused", standin_image, build=None)
    spec["source"] = {"local_dir": str(base)}
    spec["rollout"] = {"strategy": "recreate"}
    cleanup_containers.append(f"nimflow-{name}")
    first = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)))

    # The next version never gets ready: verification waits (up to its deadline) when the signal comes.
    stuck = {**spec, "deploy": {**spec["deploy"], "env": {"NIMSTANDIN_READY_DELAY": "3600"}}, "verify": {"deadline_seconds": 900}}
    run_name = f"cancel-{unique}"
    process = start_flow_process(write_spec(tmp_path / "stuck.yaml", stuck), run_name, prefect_api, flow_processes)
    run_id = poll("the flow run is created", lambda: flow_run_id_named(run_name), process)
    poll("the candidate is being verified", lambda: task_running(run_id, "verify-endpoint"), process)
    assert docker_client.containers.get(first["container_id"]).status == "exited"  # recreate stopped the old one

    process.process.send_signal(signal.SIGTERM)
    process.process.wait(timeout=WAIT_S)

    serving = serving_containers(docker_client, name)
    assert [(c.id, c.status) for c in serving] == [(first["container_id"], "running")], process.output()
    answer = poll("the restored backend answers through the stable endpoint", lambda: _answer(first["endpoint"], spec))
    assert standin_weights_digest(base) in answer
    assert "Run interrupted (TerminationSignal) during verification: removed candidate" in process.output()


def _answer(endpoint: str, spec: dict[str, Any]) -> str | None:
    try:
        response = httpx.post(f"{endpoint}/v1/chat/completions", timeout=10, json={
            "model": spec["deploy"]["served_model_name"], "messages": [{"role": "user", "content": "still there?"}]})
    except httpx.HTTPError:
        return None
    return str(response.json()["choices"][0]["message"]["content"]) if response.status_code == 200 else None


@flow(name="crash-hygiene-placeholder")
def _placeholder() -> None:
    """A flow to create runs of (a run another host would be running)."""


def _flow_run(state: Any) -> str:
    with get_client(sync_client=True) as client:
        return str(client.create_flow_run(_placeholder, state=state).id)


def test_build_container_of_a_killed_run_is_removed_by_the_next_compile(
    tmp_path: Path, testbed_env: dict, prefect_api: str, hub: Any, standin_image: str, unique: str,
    cleanup_containers: list, docker_client: Any, flow_processes: list,
) -> None:
    """A flow process SIGKILLed mid-build leaves its build container running (nothing in the process
    can remove it). Once the run is marked Crashed (the zombie-run automation's job), the next compile
    on this host removes it; a build container of a live run (another key) is kept.

    On old main (checked with the labels and the sweep taken out) build containers carried no flow run
    id (``KeyError: 'nimflow.flow-run-id'`` below); with the labels but without the sweep in
    compile_engine, the next compile left the killed run's container running (``orphan.id not in left``
    failed).
    """
    repo = f"org/crash-{unique}"
    publish_tiny(hub, repo, tmp_path)
    slow = make_spec(tmp_path, f"killed-{unique}", repo, standin_image)
    slow["build"]["env"] = {"NIMSTANDIN_BUILD_SECONDS": "3600"}
    run_name = f"killed-{unique}"
    process = start_flow_process(write_spec(tmp_path / "slow.yaml", slow), run_name, prefect_api, flow_processes)
    run_id = poll("the flow run is created", lambda: flow_run_id_named(run_name), process)
    orphan = poll("the build container runs", lambda: _build_container_of(docker_client, tmp_path), process)
    cleanup_containers.append(orphan.name)
    assert orphan.labels[FLOW_RUN_LABEL] == str(run_id)

    process.process.kill()  # SIGKILL: no clean-up runs
    process.process.wait(timeout=WAIT_S)
    assert docker_client.containers.get(orphan.id).status == "running"  # left behind, on its GPUs
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Crashed(message="no heartbeat"), force=True)

    # A build container of a run still running elsewhere on this host, and one of a run the API never knew.
    cleanup_containers.extend([f"nimflow-build-live-{unique}", f"nimflow-build-unknown-{unique}"])
    live = _sleeper(docker_client, standin_image, f"nimflow-build-live-{unique}", _flow_run(Running()), prefect_api)
    unknown = _sleeper(docker_client, standin_image, f"nimflow-build-unknown-{unique}", str(uuid.uuid4()), prefect_api)

    # The next run on this host compiles another engine (its own key: the killed run's lease still stands).
    spec = make_spec(tmp_path, f"next-{unique}", repo, standin_image)
    cleanup_containers.append(f"nimflow-next-{unique}")
    state = host_model(spec=str(write_spec(tmp_path / "next.yaml", spec)), return_state=True)

    assert state.is_completed(), state.message
    left = {c.id for c in docker_client.containers.list(all=True, filters={"label": "nimflow.role=build"})}
    assert orphan.id not in left and unknown not in left
    assert live in left


def _build_container_of(docker_client: Any, tmp_path: Path) -> Any | None:
    """The running build container that mounts a directory of this test (other sessions build too)."""
    for container in docker_client.containers.list(filters={"label": "nimflow.role=build"}):
        if any(str(mount.get("Source", "")).startswith(f"{tmp_path}/") for mount in container.attrs.get("Mounts", [])):
            return container
    return None


def _sleeper(docker_client: Any, image: str, name: str, flow_run_id: str, prefect_api: str) -> str:
    """A build container as a run would have left it (labels of nimflow.engine_build), running; its id."""
    container = docker_client.containers.run(
        image, ["/usr/bin/python3", "-c", "import time; time.sleep(3600)"], name=name, detach=True,
        labels={"nimflow.engine-key": uuid.uuid4().hex * 2, "nimflow.role": "build", FLOW_RUN_LABEL: flow_run_id,
                PREFECT_API_LABEL: prefect_api},
    )
    return str(container.id)


# --- a rollout left half-done by a dead run -------------------------------------------------------
# Labels as strings, not nimflow's constants: these tests also run against old main, which has none.
FLOW_RUN = "nimflow.flow-run-id"
STOPPED_BACKEND = "nimflow.stopped-backend"


def _recreate_spec(tmp_path: Path, name: str, image: str, base: Path) -> dict[str, Any]:
    spec = make_spec(tmp_path, name, "org/unused", image, build=None)
    spec["source"] = {"local_dir": str(base)}
    spec["rollout"] = {"strategy": "recreate"}
    return spec


def _candidate_of(docker_client: Any, name: str, serving_id: str) -> Any | None:
    """The deployment's backend that is not the serving one (a rollout's candidate), once it exists."""
    others = [c for c in serving_containers(docker_client, name) if c.id != serving_id]
    return others[0] if others else None


def _crashed(run_id: UUID) -> None:
    """What the zombie-run automation does to a run that stopped sending heartbeats."""
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Crashed(message="no heartbeat"), force=True)


def test_recreate_killed_during_verification_is_undone_by_the_next_run_on_the_host(
    tmp_path: Path, testbed_env: dict, prefect_api: str, standin_image: str, unique: str, cleanup_containers: list,
    docker_client: Any, flow_processes: list,
) -> None:
    """A flow process SIGKILLed while its recreate candidate is verified leaves the old backend stopped
    and the candidate running (nothing in the process runs). Once the run is Crashed, the next nimflow
    run on the host, for another spec, removes the candidate and starts the old backend: the endpoint
    serves the old version again, and that run serves its own.

    On old main (this test run in a clone at ee35de2) the next run left both as they were:
    ``serving == [(first, "running")]`` failed with the candidate ``-green`` running and ``-blue``
    ``exited`` (the endpoint down until reconcile rolled the spec out again).
    """
    name = f"killrc-{unique}"
    base = write_tiny_llama(tmp_path / "base")
    spec = _recreate_spec(tmp_path, name, standin_image, base)
    cleanup_containers.append(f"nimflow-{name}")
    first = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)))

    stuck = {**spec, "deploy": {**spec["deploy"], "env": {"NIMSTANDIN_READY_DELAY": "3600"}}, "verify": {"deadline_seconds": 900}}
    run_name = f"killrc-{unique}"
    process = start_flow_process(write_spec(tmp_path / "stuck.yaml", stuck), run_name, prefect_api, flow_processes)
    run_id = poll("the flow run is created", lambda: flow_run_id_named(run_name), process)
    poll("the candidate is being verified", lambda: task_running(run_id, "verify-endpoint"), process)
    candidate = _candidate_of(docker_client, name, first["container_id"])
    assert candidate is not None
    process.process.kill()  # SIGKILL: no except, no finally, no hook in the process
    process.process.wait(timeout=WAIT_S)
    assert docker_client.containers.get(first["container_id"]).status == "exited"
    _crashed(run_id)

    other = make_spec(tmp_path, f"next-{unique}", "org/unused", standin_image, build=None)
    other["source"] = {"local_dir": str(base)}
    cleanup_containers.append(f"nimflow-next-{unique}")
    state = host_model(spec=str(write_spec(tmp_path / "next.yaml", other)), return_state=True)

    assert state.is_completed(), state.message
    serving = serving_containers(docker_client, name)
    assert [(c.id, c.status) for c in serving] == [(first["container_id"], "running")]
    answer = poll("the old backend answers through the stable endpoint again", lambda: _answer(first["endpoint"], spec))
    assert standin_weights_digest(base) in answer
    assert _answer(state.result()["endpoint"], other)
    # What let the next run tell: the run that started the candidate, and the backend it stopped.
    assert candidate.labels[FLOW_RUN] == str(run_id)
    assert candidate.labels[STOPPED_BACKEND] == first["container_id"]


def test_recreate_killed_while_stopping_the_old_backend_is_undone_by_reconcile(
    tmp_path: Path, testbed_env: dict, prefect_api: str, standin_image: str, unique: str, cleanup_containers: list,
    docker_client: Any, flow_processes: list,
) -> None:
    """The switch of a recreate: the flow process SIGKILLed the moment Docker signals the old backend
    to stop (its ``kill`` event), before the candidate can have started. The candidate is created,
    labelled, before the old backend is stopped, so the reconcile pass after the run is Crashed finds
    it, removes it and starts the old backend: the deployment is healthy again without a rollout.

    On old main (a clone at ee35de2) the old backend was stopped before any candidate existed, and
    reconcile (a dry run) left the deployment down: ``serving == [(first, "running")]`` failed with
    ``-blue`` ``exited``. With the sweep but the old order (stop, then create) the kill left no
    labelled candidate to find, and the same assertion failed.
    """
    from nimflow.flows.reconcile import reconcile

    name = f"killsw-{unique}"
    base = write_tiny_llama(tmp_path / "base")
    spec = _recreate_spec(tmp_path, name, standin_image, base)
    cleanup_containers.append(f"nimflow-{name}")
    first = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)))

    changed = {**spec, "deploy": {**spec["deploy"], "env": {"NIMSTANDIN_READY_DELAY": "0.7"}}}
    run_name = f"killsw-{unique}"
    until = time.time() + WAIT_S
    events = docker_client.events(decode=True, until=int(until), filters={"container": first["container_id"], "event": "kill"})
    process = start_flow_process(write_spec(tmp_path / "changed.yaml", changed), run_name, prefect_api, flow_processes)
    for _event in events:  # Docker sends the old backend SIGTERM: the flow is inside its stop call
        process.process.kill()
        break
    else:
        pytest.fail(f"the old backend was not stopped within {WAIT_S}s:\n{process.output()}")
    process.process.wait(timeout=WAIT_S)
    run_id = poll("the flow run is known", lambda: flow_run_id_named(run_name))
    poll("the old backend stops", lambda: docker_client.containers.get(first["container_id"]).status == "exited")
    _crashed(run_id)

    state = reconcile(heal=False, return_state=True)

    assert state.is_completed(), state.message
    serving = serving_containers(docker_client, name)
    assert [(c.id, c.status) for c in serving] == [(first["container_id"], "running")]
    answer = poll("the old backend answers through the stable endpoint again", lambda: _answer(first["endpoint"], spec))
    assert standin_weights_digest(base) in answer


def test_crashed_hook_removes_the_build_container_of_a_killed_run(
    tmp_path: Path, testbed_env: dict, prefect_api: str, hub: Any, standin_image: str, unique: str,
    cleanup_containers: list, docker_client: Any, flow_processes: list,
) -> None:
    """A process worker whose flow process dies (SIGKILL, the OOM killer) marks the run Crashed and runs
    the flow's ``on_crashed`` hooks itself (Prefect's ``HookRunner``, as here): the hook removes the
    run's build container at once, while the API still says Running (no sweep would touch it yet).

    On old main (a clone at ee35de2) host_model had no hooks: the build container was still running
    after the hooks ran (``orphan.id not in left`` failed).
    """
    import asyncio

    from prefect.runner._hook_runner import HookRunner

    repo = f"org/hook-{unique}"
    publish_tiny(hub, repo, tmp_path)
    slow = make_spec(tmp_path, f"hook-{unique}", repo, standin_image)
    slow["build"]["env"] = {"NIMSTANDIN_BUILD_SECONDS": "3600"}
    run_name = f"hook-{unique}"
    process = start_flow_process(write_spec(tmp_path / "slow.yaml", slow), run_name, prefect_api, flow_processes)
    run_id = poll("the flow run is created", lambda: flow_run_id_named(run_name), process)
    orphan = poll("the build container runs", lambda: _build_container_of(docker_client, tmp_path), process)
    cleanup_containers.append(orphan.name)
    process.process.kill()
    process.process.wait(timeout=WAIT_S)

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(run_id)
    assert flow_run.state is not None and flow_run.state.is_running()  # the sweep would keep the container

    async def resolve(_: Any) -> Any:
        return host_model

    asyncio.run(HookRunner(resolve_flow=resolve).run_crashed_hooks(flow_run, Crashed(message="process died")))

    left = {c.id for c in docker_client.containers.list(all=True, filters={"label": "nimflow.role=build"})}
    assert orphan.id not in left


def test_the_sweep_keeps_live_runs_candidates_and_retired_backends(
    tmp_path: Path, testbed_env: dict, prefect_api: str, standin_image: str, unique: str, cleanup_containers: list,
    docker_client: Any,
) -> None:
    """Backends of one deployment as runs would have left them (nimflow.rollout's labels), none routed: only
    the never-promoted candidate of a run that is over goes. A live run's candidate is being verified; a
    backend promoted once (restart policy ``unless-stopped``) that a later rollout retired may still drain
    requests; one of another Prefect API belongs to runs this API knows nothing of.

    On old main (ee35de2) there was no sweep of candidates at all (``nimflow.run_leftovers`` did not exist).
    """
    from nimflow.run_leftovers import undo_dead_runs

    deployment = f"sweep-{unique}"
    cleanup_containers.extend(f"nimflow-{deployment}-{kind}" for kind in ("dead", "live", "retired", "foreign"))

    def backend(kind: str, run_id: str, restart: str, api: str = prefect_api) -> str:
        container = docker_client.containers.run(
            standin_image, ["/usr/bin/python3", "-c", "import time; time.sleep(3600)"], name=f"nimflow-{deployment}-{kind}",
            detach=True, restart_policy={"Name": restart},
            labels={"nimflow.deployment": deployment, "nimflow.role": "serve", "nimflow.container-name": f"nimflow-{deployment}",
                    "nimflow.route-dir": str(tmp_path / "route"), FLOW_RUN: run_id, PREFECT_API_LABEL: api},
        )
        return str(container.id)

    dead = backend("dead", _flow_run(Crashed()), "no")
    live = backend("live", _flow_run(Running()), "no")
    retired = backend("retired", _flow_run(Crashed()), "unless-stopped")
    foreign = backend("foreign", str(uuid.uuid4()), "no", api="http://127.0.0.1:1/api")

    done = undo_dead_runs(docker_client)

    left = {c.id for c in docker_client.containers.list(all=True, filters={"label": f"nimflow.deployment={deployment}"})}
    assert dead not in left and left == {live, retired, foreign}, done.describe()
    assert [c for c in done.candidates if deployment in c] == [f"nimflow-{deployment}-dead"]  # other tests' may go too
