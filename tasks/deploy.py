"""Stage 5: roll the NIM container out: start a candidate, then switch the stable endpoint to it.

The flow calls :func:`deploy_nim` (start the candidate), verifies the candidate's own endpoint,
then :func:`promote_deployment` (switch the front proxy, drain and retire the old container), or
:func:`abort_rollout` when verification failed (remove the candidate; recreate: bring the old one
back). The mechanisms are in :mod:`nimflow.rollout` and :mod:`nimflow.front_proxy`.
"""

from __future__ import annotations

from typing import Literal

from prefect import get_run_logger, task

from nimflow.engine_use import record_in_use
from nimflow.records import Deployment, Engine, ServingImage, StagedAdapters
from nimflow.retries import transient_retries
from nimflow.rollout import abort, deployment_labels, promote, serves_custom_weights, start_candidate
from nimflow.spec import HostingSpec, RolloutSpec

__all__ = ["abort_rollout", "deploy_nim", "deployment_labels", "promote_deployment"]


@task(name="deploy-nim", **transient_retries())
def deploy_nim(
    spec: HostingSpec,
    serving: ServingImage,
    model_path: str | None,
    adapters: StagedAdapters | None,
    api: Literal["chat", "completions"],
    labels: dict[str, str],
    engine: Engine | None = None,
) -> Deployment:
    """Stage 5a: the candidate NIM container (an identical serving one is kept: ``reused``).

    blue-green starts it beside the serving container; recreate stops (not removes) the serving
    one first. Nothing takes traffic before :func:`promote_deployment`.

    Args:
        spec: the hosting spec (deploy, rollout and lora sections, names).
        serving: the image and NIM generation from ``prepare_serving_image``.
        model_path: host path of what to serve (None: a guide §1 manifest; NIM fetches the model).
        adapters: staged LoRA adapters (NIM_PEFT_SOURCE), if any.
        api: what verification will call (recorded on the deployment).
        labels: provenance labels (weights, engine key, adapters).
        engine: the engine to serve, checked against this host's GPU first.
    """
    logger = get_run_logger()
    strategy = spec.rollout_strategy
    if engine is not None and spec.cache is not None:
        # Recorded before the container starts: from then on the engine is in use, and gc on any
        # host keeps it in the store (reconcile refreshes the marker while the deployment serves).
        if (problem := record_in_use(spec.cache, engine.engine_key, spec.deploy.cache_dir, spec.name, spec.container_name)):
            logger.warning("%s", problem)
    deployment = start_candidate(
        spec.deploy, spec.rollout, strategy, spec.name, spec.container_name, serving, model_path,
        adapters.path if adapters else None, adapters.names if adapters else [], api, labels, engine,
        spec.lora.max_rank if spec.lora else 32, custom_weights=serves_custom_weights(spec),
    )
    for difference in deployment.forced_despite:
        logger.warning("deploy.force is set: started despite %s", difference)
    if deployment.reused:
        logger.info("%s already serves this model unchanged behind %s: kept", deployment.container_name,
                    deployment.stable_endpoint)
        return deployment
    previous = f", beside {deployment.previous_container_id[:12]}" if deployment.previous_container_id else ""
    if strategy == "recreate" and deployment.previous_container_id:
        previous = f", after stopping {deployment.previous_container_id[:12]}"
    logger.info("Started candidate %s (%s, %s%s) serving %s at %s", deployment.container_name,
                deployment.container_id[:12], strategy, previous, deployment.model_root, deployment.endpoint)
    return deployment


@task(name="promote-deployment", **transient_retries())
def promote_deployment(deployment: Deployment, rollout: RolloutSpec) -> Deployment:
    """Stage 5c: the verified candidate takes the stable endpoint; the old container is drained and removed."""
    logger = get_run_logger()
    promotion = promote(deployment, rollout)
    if promotion.front != "kept":
        logger.info("Front proxy for %s %s", deployment.stable_endpoint, promotion.front)
    if promotion.switched:
        logger.info("%s now routes to %s (route generation %d)", deployment.stable_endpoint,
                    deployment.container_name, promotion.generation)
    if promotion.still_in_flight:
        logger.warning("%d request(s) still ran on %s after rollout.drain_seconds=%g; it was stopped anyway",
                       promotion.still_in_flight, promotion.previous_upstream, rollout.drain_seconds)
    if promotion.removed:
        logger.info("Retired %s", ", ".join(promotion.removed))
    return deployment


@task(name="abort-rollout", **transient_retries())
def abort_rollout(deployment: Deployment, reason: str = "verification failed", deadline_seconds: float = 600.0) -> None:
    """Stage 5c (failure): remove the candidate that failed; recreate: start the old container again.

    Raises:
        DeploymentError: the old container could not be brought back (the endpoint is down).
    """
    logger = get_run_logger()
    if deployment.reused:
        logger.warning("%s serves unchanged but failed (%s); left as it is", deployment.container_name, reason)
        return
    outcome = abort(deployment, deadline_seconds=deadline_seconds)
    if outcome.removed:
        if deployment.previous_container_id is not None:
            logger.warning("Removed candidate %s (%s); %s still serves the previous version", outcome.removed, reason,
                           deployment.stable_endpoint)
        else:  # a first rollout: nothing served before, so nothing serves now
            logger.warning("Removed candidate %s (%s); no earlier version was deployed, so %s serves nothing yet",
                           outcome.removed, reason, deployment.stable_endpoint)
    if outcome.restored:
        logger.warning("Recreate rolled back: %s started again and answers", outcome.restored)
