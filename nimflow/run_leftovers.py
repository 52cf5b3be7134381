"""What a flow run that ended without cleaning up left on this Docker host, found and undone.

A run killed outright (SIGKILL: the OOM killer, a worker's kill after its grace period; a host
crash) runs no clean-up. It can leave:

* a build container, still on its GPUs;
* a rollout's candidate that was never promoted: beside the serving backend (blue-green), or, with
  ``recreate``, instead of it: the old backend stopped, the endpoint down.

Both carry the run's id and Prefect API (:mod:`nimflow.run_owner`), and a recreate candidate the id
of the backend it stopped. Two ways undo them, with the same code (:func:`_undo`):

* :func:`undo_dead_runs`, the sweep: at the start of every ``host_model`` run and every reconcile
  pass on the host, whatever the spec; it undoes what runs that the API reports over left (a killed run
  counts once the zombie-run automation has marked it Crashed). A container whose run the API cannot
  answer about, or that belongs to another Prefect API, stays.
* :func:`undo_run_hook`, the flow's ``on_crashed`` / ``on_cancellation`` hook: where Prefect runs it
  (in the flow process when the engine marks the run Crashed or Cancelled; in the worker, once the flow
  process is gone, when a process worker cancels a run or sees its process die), it undoes the run's
  own leftovers at once, without waiting for the zombie-run automation.

A candidate that was promoted is never touched here (see :func:`nimflow.rollout.unpromoted_candidate`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import docker

from nimflow.containers import ROLE_LABEL, daemon_errors, docker_client, remove_container_quietly
from nimflow.rollout import undo_candidate, unpromoted_candidate
from nimflow.run_owner import FLOW_RUN_LABEL, PREFECT_API_LABEL, flow_run_is_over, prefect_api

logger = logging.getLogger(__name__)


@dataclass
class Leftovers:
    """What was undone: container names removed, backends started again, and what could not be undone."""

    builds: list[str] = field(default_factory=list)
    candidates: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.builds or self.candidates or self.restored or self.failed)

    def describe(self) -> str:
        """One line for a log: ``removed build container(s) ...; ...``."""
        parts = [f"removed build container(s) {', '.join(self.builds)}" if self.builds else "",
                 f"removed unpromoted rollout candidate(s) {', '.join(self.candidates)}" if self.candidates else "",
                 f"started {', '.join(self.restored)} again (stopped for a recreate that never finished)"
                 if self.restored else "",
                 f"could not undo {'; '.join(self.failed)}" if self.failed else ""]
        return "; ".join(p for p in parts if p) or "nothing left behind"


def _undoable(container: Any) -> bool:
    """A build container, or a rollout candidate that was never promoted."""
    return (container.labels or {}).get(ROLE_LABEL) == "build" or unpromoted_candidate(container)


def _undo(client: docker.DockerClient, containers: list[Any]) -> Leftovers:
    """Remove the build containers; undo the candidates (recreate: start the backend each stopped)."""
    done = Leftovers()
    for container in containers:
        if container.labels.get(ROLE_LABEL) == "build":
            remove_container_quietly(client, container.id)
            done.builds.append(container.name)
            continue
        try:
            outcome = undo_candidate(client, container)
        except Exception as exc:  # noqa: BLE001 - one deployment's fault must not stop the others' or the run
            done.failed.append(f"{container.name} ({type(exc).__name__}: {exc})")
            continue
        done.candidates.append(container.name)
        if outcome.restored:
            done.restored.append(outcome.restored)
    return done


def undo_dead_runs(client: docker.DockerClient) -> Leftovers:
    """Undo what flow runs that are over left on this Docker host: build containers, unpromoted candidates.

    Only containers labelled with this process's Prefect API are considered: another server (a second
    workspace on the host) knows nothing of their runs, which must not read as "over". One API call
    per run, however many containers it left.

    Raises:
        ServiceUnavailable: the Docker daemon did not answer the listing.
    """
    api = prefect_api()
    if api is None:
        return Leftovers()
    with daemon_errors("listing the containers flow runs started"):
        labelled = client.containers.list(all=True, filters={"label": [FLOW_RUN_LABEL, f"{PREFECT_API_LABEL}={api}"]})
    verdicts: dict[str, bool | None] = {}
    over = []
    for container in filter(_undoable, labelled):  # promoted backends keep their run's label: no API call for them
        run_id = container.labels.get(FLOW_RUN_LABEL, "")
        if run_id not in verdicts:
            verdicts[run_id] = flow_run_is_over(run_id)
        if verdicts[run_id]:
            over.append(container)
    return _undo(client, over)


def undo_run(client: docker.DockerClient, flow_run_id: str) -> Leftovers:
    """Undo what flow run ``flow_run_id`` left on this Docker host, whatever its state says (its hooks).

    Raises:
        ServiceUnavailable: the Docker daemon did not answer the listing.
    """
    with daemon_errors(f"listing the containers of flow run {flow_run_id}"):
        labelled = client.containers.list(all=True, filters={"label": [f"{FLOW_RUN_LABEL}={flow_run_id}"]})
    return _undo(client, [c for c in labelled if _undoable(c)])


def undo_run_hook(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_crashed`` / ``on_cancellation`` hook: undo this run's build container and unfinished rollout.

    Prefect runs it in the flow process (the engine marked the run Crashed, or Cancelled when it owns
    the cancellation) or in a process worker after the flow process ended (a cancellation, or a flow
    process that died: then on the worker's host, which is the run's Docker host). Never where nothing
    survives the run: a host crash, a killed worker; :func:`undo_dead_runs` covers those. An error is
    logged, never raised (Prefect would only log it too).
    """
    from prefect.logging.loggers import flow_run_logger

    log = flow_run_logger(flow_run, flow)
    try:
        done = undo_run(docker_client(), str(flow_run.id))
    except Exception as exc:  # noqa: BLE001 - the next run on the host (undo_dead_runs) tries again
        log.error("Run %s: could not undo what it left on this Docker host (%s: %s); the next nimflow run "
                  "or reconcile pass on this host does", state.name, type(exc).__name__, exc)
        return
    if done:
        log.warning("Run %s: %s", state.name, done.describe())
