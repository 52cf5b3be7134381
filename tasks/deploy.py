"""Stage 5: run the NIM container that serves the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import docker
from prefect import get_run_logger, task

from nimflow.containers import (
    CONTAINER_PORT,
    LABEL_PREFIX,
    device_requests,
    docker_client,
    find_container,
    image_id,
    remove_container,
    spec_hash,
)
from nimflow.engine_store import read_local_manifest
from nimflow.errors import DeploymentError, EngineStoreError, translated_errors
from nimflow.gpu_identity import check_serving_target
from nimflow.records import Deployment, Engine
from nimflow.retries import transient_retries
from nimflow.settings import get_settings
from nimflow.spec import NIM_CACHE_MOUNT, DeploySpec

_EXTRA_MODEL_MOUNT = "/opt/nim/model"


def model_mount(deploy: DeploySpec, model_path: Path) -> tuple[str, dict[str, dict[str, str]]]:
    """The in-container path for ``model_path`` and any extra volume it needs.

    Models inside the cache dir are reached through the cache mount (the guide's layout);
    anything else is mounted read-only on its own.
    """
    cache_dir = Path(deploy.cache_dir).resolve()
    model_path = model_path.resolve()
    if model_path.is_relative_to(cache_dir):
        relative = model_path.relative_to(cache_dir).as_posix()
        return (NIM_CACHE_MOUNT if relative == "." else f"{NIM_CACHE_MOUNT}/{relative}"), {}
    return _EXTRA_MODEL_MOUNT, {str(model_path): {"bind": _EXTRA_MODEL_MOUNT, "mode": "ro"}}


def container_environment(deploy: DeploySpec, nim_model_name: str) -> dict[str, str]:
    """The NIM container's environment: the spec's env, the model, and secrets from this process."""
    return {
        **deploy.env,
        "NIM_MODEL_NAME": nim_model_name,
        "NIM_SERVED_MODEL_NAME": deploy.served_model_name,
        "NIM_CACHE_PATH": NIM_CACHE_MOUNT,
        **get_settings().container_secrets(),
    }


def deployment_labels(weights_identity: str, engine_key: str | None) -> dict[str, str]:
    """The provenance labels of a NIM container: what it serves."""
    labels = {f"{LABEL_PREFIX}weights": weights_identity[:200]}
    if engine_key is not None:
        labels[f"{LABEL_PREFIX}engine-key"] = engine_key
    return labels


def deployment_identity(client: docker.DockerClient, deploy: DeploySpec, nim_model_name: str, labels: dict[str, str]) -> str:
    """The hash of everything that makes a NIM container what it is (secrets excluded: they never leave this process)."""
    return spec_hash({
        "image_id": image_id(client, deploy.image),
        "model": nim_model_name,
        "deploy": deploy.model_dump(mode="json", exclude={"health_deadline_seconds", "completion_prompt"}),
        "labels": labels,
    })


def running_unchanged(client: docker.DockerClient, container_name: str, identity: str) -> Any | None:
    """The container under ``container_name`` if it runs with exactly this identity, else None."""
    existing = find_container(client, container_name)
    if existing is not None and existing.status == "running" and existing.labels.get(f"{LABEL_PREFIX}spec-hash") == identity:
        return existing
    return None


def guard_engine(client: docker.DockerClient, deploy: DeploySpec, engine: Engine) -> list[str]:
    """Refuse an engine built for another GPU or TensorRT-LLM version than this deployment's.

    The same probe as the build's, run with the deployment's image, GPUs and env, before any
    container is started or replaced.

    Returns:
        The differences ``deploy.force`` overrode (empty when the engine matches).

    Raises:
        EngineIncompatible: naming both GPUs / versions, unless ``deploy.force``.
        EngineStoreError: the engine directory has no manifest.
    """
    manifest = read_local_manifest(Path(engine.path))
    if manifest is None:
        raise EngineStoreError(f"{engine.path}: no engine manifest; cannot tell which GPU the engine was built for")
    return check_serving_target(client, deploy, manifest["key_inputs"], engine_key=engine.engine_key)


def start_nim(
    deploy: DeploySpec, name: str, container_name: str, model_path: Path, labels: dict[str, str], engine: Engine | None = None
) -> Deployment:
    """Start (or keep) the NIM container for this spec and model.

    An identical container that is already running is kept, so a repeated run changes nothing.
    Otherwise an engine is first checked against this deployment's GPU (:func:`guard_engine`);
    then a different container under the same name is replaced (blue-green rollouts are a later stage).

    Raises:
        EngineIncompatible: the engine was built for another GPU or TensorRT-LLM version.
        DeploymentError: the image is missing, the port is taken, or GPUs cannot be attached.
        ServiceUnavailable: the Docker daemon did not answer.
    """
    client = docker_client()
    nim_model_name, extra_volumes = model_mount(deploy, model_path)
    Path(deploy.cache_dir).mkdir(parents=True, exist_ok=True)
    endpoint = f"http://{deploy.host}:{deploy.host_port}"
    with translated_errors(f"starting NIM container {container_name}"):
        identity = deployment_identity(client, deploy, nim_model_name, labels)
        if (kept := running_unchanged(client, container_name, identity)) is not None:
            return Deployment(
                container_id=kept.id, container_name=container_name, endpoint=endpoint,
                served_model_name=deploy.served_model_name, reused=True,
            )
        existing = find_container(client, container_name)
    forced = guard_engine(client, deploy, engine) if engine is not None else []
    with translated_errors(f"starting NIM container {container_name}"):
        if existing is not None:
            remove_container(client, existing.id)
        try:
            container = client.containers.run(
                deploy.image,
                name=container_name,
                detach=True,
                environment=container_environment(deploy, nim_model_name),
                volumes={str(Path(deploy.cache_dir).resolve()): {"bind": NIM_CACHE_MOUNT, "mode": "rw"}, **extra_volumes},
                ports={CONTAINER_PORT: (deploy.host, deploy.host_port)},
                device_requests=device_requests(deploy.gpus),
                shm_size=deploy.shm_size,
                user=deploy.user,
                labels={
                    **labels,
                    f"{LABEL_PREFIX}deployment": name,
                    f"{LABEL_PREFIX}served-model-name": deploy.served_model_name,
                    f"{LABEL_PREFIX}spec-hash": identity,
                    f"{LABEL_PREFIX}role": "serve",
                },
            )
        except docker.errors.APIError as exc:
            # The daemon created the container but could not start it (port taken, no GPU runtime):
            # remove the husk so the next run starts clean.
            remove_container(client, container_name)
            if "port is already allocated" in str(exc) or "address already in use" in str(exc):
                raise DeploymentError(
                    f"port {deploy.host}:{deploy.host_port} is already in use; free it or change deploy.host_port"
                ) from exc
            raise
    return Deployment(
        container_id=container.id, container_name=container_name, endpoint=endpoint,
        served_model_name=deploy.served_model_name, forced_despite=forced,
    )


@task(name="deploy-nim", **transient_retries())
def deploy_nim(
    deploy: DeploySpec, name: str, container_name: str, model_path: str, labels: dict[str, str], engine: Engine | None = None
) -> Deployment:
    """Stage 5: the NIM container serving ``model_path`` (an HF directory or an engine directory)."""
    deployment = start_nim(deploy, name, container_name, Path(model_path), labels, engine)
    logger = get_run_logger()
    for difference in deployment.forced_despite:
        logger.warning("deploy.force is set: started despite %s", difference)
    if deployment.reused:
        logger.info("Container %s already serves this model unchanged: kept", container_name)
    else:
        logger.info("Started container %s (%s) for %s", container_name, deployment.container_id[:12], deployment.endpoint)
    return deployment
