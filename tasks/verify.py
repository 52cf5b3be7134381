"""Stage 6: verify the endpoint: ready, the model listed, a real completion."""

from __future__ import annotations

from prefect import get_run_logger, task

from nimflow.containers import docker_client, exit_watch, last_log_lines
from nimflow.errors import EndpointUnhealthy
from nimflow.nim_api import chat_completion, list_models, wait_until_ready
from nimflow.records import Deployment, EndpointHealth


def check_endpoint(deployment: Deployment, *, deadline_seconds: float, prompt: str) -> EndpointHealth:
    """Wait for ready (failing at once if the container exits), then check /v1/models and a completion.

    Raises:
        EndpointUnhealthy: with the container's last log lines when it exits or misses the deadline.
    """
    client = docker_client()
    exited = exit_watch(client, deployment.container_id, deployment.container_name)
    try:
        ready_after = wait_until_ready(deployment.endpoint, deadline_seconds=deadline_seconds, give_up=exited)
        models = list_models(deployment.endpoint)
        if deployment.served_model_name not in models:
            raise EndpointUnhealthy(
                f"{deployment.endpoint}/v1/models lists {models}, not {deployment.served_model_name!r}; "
                "check deploy.served_model_name (NIM_SERVED_MODEL_NAME)"
            )
        completion = chat_completion(deployment.endpoint, deployment.served_model_name, prompt)
    except EndpointUnhealthy as exc:
        # A NIM that cannot serve must not hold GPUs or the port; it stays for `docker logs`.
        container = client.containers.get(deployment.container_id)
        if container.status == "running":
            container.stop(timeout=10)
        logs = last_log_lines(client, deployment.container_id, 20)
        raise EndpointUnhealthy(
            f"{exc}\nContainer {deployment.container_name} ({deployment.container_id[:12]}) was stopped; "
            f"its last log lines:\n{logs}"
        ) from None
    return EndpointHealth(ready_after_seconds=round(ready_after, 3), models=models, completion=completion)


# Not retried: it polls until its own deadline, and a retry would only restart the clock.
@task(name="verify-endpoint")
def verify_endpoint(deployment: Deployment, deadline_seconds: float, prompt: str) -> EndpointHealth:
    """Stage 6: proof the endpoint serves the model."""
    health = check_endpoint(deployment, deadline_seconds=deadline_seconds, prompt=prompt)
    get_run_logger().info(
        "%s ready after %.1fs, lists %s, answered: %s",
        deployment.endpoint, health.ready_after_seconds, health.models, health.completion[:200],
    )
    return health
