"""Stage 0: undo what dead flow runs left on this Docker host, before this run builds or deploys."""

from __future__ import annotations

from prefect import get_run_logger, task

from nimflow.containers import docker_client
from nimflow.retries import transient_retries
from nimflow.run_leftovers import undo_dead_runs


@task(name="undo-dead-runs", **transient_retries())
def undo_dead_runs_on_host() -> None:
    """Remove build containers and unpromoted rollout candidates of runs that are over; recreate: restart what they stopped.

    Any spec's, not only this run's: a killed run's build container holds GPUs this run may need, and a
    recreate it left half-done keeps another deployment down (see :mod:`nimflow.run_leftovers`).

    Raises:
        ServiceUnavailable: the Docker daemon did not answer (transient: retried).
    """
    if done := undo_dead_runs(docker_client()):
        get_run_logger().warning("Left on this host by runs that are over: %s", done.describe())
