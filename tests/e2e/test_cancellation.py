"""Issue 15, crash hygiene through a real worker: a run cancelled while it verifies its candidate rolls back.

An operator presses Cancel in the UI (the UI sets the run's state to Cancelling through the API; here
the API is called the same way) while a ``host_model`` deployment run verifies a new version on a
process worker. Real server, real worker, real flow process, the NIM stand-in held not ready.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker.errors
import httpx
import pytest

from nimflow.testbed.nim_image import standin_weights_digest
from nimflow.testbed.tiny_model import write_tiny_llama
from tests.conftest import write_spec
from tests.e2e.conftest import E2E, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.testbed]

#: The deployment that runs ``host_model`` for any spec name (host-model's own form only offers the
#: specs that existed at deploy time; this test's spec is written afterwards).
DEPLOYMENT = "host-on-checkpoint"


@pytest.fixture
def own_spec(e2e: E2E) -> Iterator[tuple[str, Path]]:
    """A spec of this test's own in the specs directory: its name and file; file and containers removed after."""
    name = f"e2e-cancel-{uuid.uuid4().hex[:6]}"
    path = e2e.specs_dir / f"{name}.yaml"
    yield name, path
    path.unlink(missing_ok=True)  # first: reconcile then has no spec to heal this deployment from
    for container in e2e.docker.containers.list(all=True, filters={"label": f"nimflow.deployment={name}"}):
        container.remove(force=True)


def _serving(e2e: E2E, spec: str) -> list[Any]:
    return [c for c in e2e.docker.containers.list(all=True, filters={"label": f"nimflow.deployment={spec}"})
            if c.labels.get("nimflow.role") == "serve"]


def _run(e2e: E2E, spec: str, cache_dir: Path) -> Any:
    """A run of the deployment for ``spec``, with ``NIMFLOW_CACHE_DIR`` set for it (a job variable).

    The test bed's two "hosts" share one Docker engine, but each keeps its deployments' routes in its
    own cache directory; a second run on the other worker would not know the first one's backend (and
    would reuse its name). One cache directory for both runs makes them one host, whichever worker
    takes each run.
    """
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.create_flow_run_from_deployment(
            e2e.deployment(DEPLOYMENT).id, parameters={"spec": spec},
            job_variables={"env": {"NIMFLOW_CACHE_DIR": str(cache_dir)}})


def _verifying(run_id: Any) -> bool:
    from tests.integration.test_host_model import task_runs

    verify = task_runs(run_id).get("verify-endpoint")
    return verify is not None and verify.state is not None and verify.state.is_running()


def _answer(endpoint: str, served_model_name: str) -> str | None:
    try:
        response = httpx.post(f"{endpoint}/v1/chat/completions", timeout=10, json={
            "model": served_model_name, "messages": [{"role": "user", "content": "still there?"}]})
    except httpx.HTTPError:
        return None
    return str(response.json()["choices"][0]["message"]["content"]) if response.status_code == 200 else None


def test_cancelled_during_verification_rolls_back(e2e: E2E, own_spec: tuple[str, Path]) -> None:
    """Cancelled from the API while the new version is being verified: the run ends Cancelled, the
    candidate container is removed, and the endpoint still serves the old version.

    Not a regression test: the rollback on cancellation was already on main (issue 15's crash-hygiene
    part, proven there by tests/integration/test_crash_hygiene.py with a SIGTERM sent by the test). This
    is the end-to-end proof that the way a real worker cancels a running flow run reaches that
    rollback. It passed on main as it was before this branch (this branch changes no rollback code).
    The flow's log says how the cancellation arrived (a first run of this test: "Run interrupted
    (TerminationSignal) during verification: removed candidate ...": the worker's runner terminates
    the flow process).
    """
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    from tests.integration.test_host_model import make_spec

    name, path = own_spec
    work = e2e.work_dir / name
    old, new = write_tiny_llama(work / "v1", seed=1), write_tiny_llama(work / "v2", seed=2)
    image = next(iter(e2e.specs.values()))["deploy"]["image"]
    spec = make_spec(work, name, "org/unused", image, build=None)
    spec["source"] = {"local_dir": str(old)}
    spec["rollout"] = {"strategy": "blue-green"}  # the old version serves while the new one is verified
    write_spec(path, spec)
    first = e2e.wait_final(_run(e2e, name, work / "host-cache").id)
    assert first.state.is_completed(), f"{first.state}\n{e2e.flow_logs(first.id)[-3000:]}\n{e2e.worker_logs()}"
    endpoint, served = e2e.record(first.id)["endpoint"], spec["deploy"]["served_model_name"]
    (old_container,) = _serving(e2e, name)

    # The next version never gets ready: its verification waits (up to its deadline) when Cancel comes.
    write_spec(path, {**spec, "source": {"local_dir": str(new)},
                      "deploy": {**spec["deploy"], "env": {"NIMSTANDIN_READY_DELAY": "3600"}},
                      "verify": {"deadline_seconds": 900}})
    run = _run(e2e, name, work / "host-cache")
    wait_for("the candidate is being verified", lambda: _verifying(run.id))
    (candidate,) = [c for c in _serving(e2e, name) if c.id != old_container.id]

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run.id, Cancelling())  # what the UI's Cancel sends (a Cancelling state, not forced)
    final = e2e.wait_final(run.id)

    assert final.state.is_cancelled(), f"{final.state}\n{e2e.flow_logs(run.id)[-3000:]}\n{e2e.worker_logs()}"
    with pytest.raises(docker.errors.NotFound):
        e2e.docker.containers.get(candidate.id)
    assert [(c.id, c.status) for c in _serving(e2e, name)] == [(old_container.id, "running")]
    answer = wait_for("the old version answers through the stable endpoint", lambda: _answer(endpoint, served), timeout=60)
    assert standin_weights_digest(old) in answer and standin_weights_digest(new) not in answer
    # The run says what it undid (logs reach the API in batches: polled).
    wait_for("the run's log to name the rollback", lambda: "during verification: removed candidate" in e2e.flow_logs(run.id),
             timeout=60)
