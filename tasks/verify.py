"""Stage 6: verify the candidate container level by level: live, ready, model, answer, golden, latency."""

from __future__ import annotations

from prefect import get_run_logger, task

from nimflow.containers import docker_client
from nimflow.records import Deployment, EndpointHealth
from nimflow.spec import VerifySpec
from nimflow.verification import verify_deployment


# Not retried: it polls until its own deadline, and a retry would only restart the clock. It
# never stops or removes the container: the rollout removes a candidate that fails.
@task(name="verify-endpoint")
def verify_endpoint(deployment: Deployment, verify: VerifySpec) -> EndpointHealth:
    """Stage 6: proof the candidate serves the intended model, before it takes traffic.

    Raises:
        EndpointUnhealthy: ``verification failed at <level>: ...`` with the container's last log lines.
        ServiceUnavailable: the Docker daemon stopped answering while the container was watched.
    """
    logger = get_run_logger()
    health = verify_deployment(docker_client(), deployment, verify, log=logger)
    logger.info(
        "%s passed %s: ready after %.1fs, lists %s, slowest request %ss, answered: %s",
        deployment.endpoint, ", ".join(health.checks), health.ready_after_seconds, health.models,
        health.latency_seconds, health.completion[:200],
    )
    return health
