"""Stage 0: settle the serving image and its NIM generation before any download or build.

The generation decides the path (1.x: NIM_MODEL_NAME and engines; 2.x: NIM_MODEL_PATH, no
engines), so a spec the image cannot serve fails here, in seconds, not after a download and an
engine build. For guide §1 (``source.manifest``) the derived image is built here too.
"""

from __future__ import annotations

from prefect import get_run_logger, task

from nimflow.containers import docker_client
from nimflow.model_manifest import check_model_listed, manifest_image, read_manifest
from nimflow.nim_generation import nim_generation, refuse_unservable
from nimflow.records import ServingImage
from nimflow.retries import transient_retries
from nimflow.spec import BuildSpec, DeploySpec, SourceSpec


@task(name="prepare-serving-image", **transient_retries())
def prepare_serving_image(source: SourceSpec, deploy: DeploySpec, build: BuildSpec | None, name: str) -> ServingImage:
    """Detect the image's NIM generation, refuse what it cannot serve, derive the guide §1 image.

    Raises:
        ConfigError: ``build`` (or nim-jit, or a manifest) with a NIM 2.x image; a manifest that
            is not one or has no profile for ``source.model_name``.
        DeploymentError: deploy.image is not on this Docker host (nimflow does not pull), or the
            derived image failed to build.
        ServiceUnavailable: the Docker daemon did not answer (retried).
    """
    logger = get_run_logger()
    client = docker_client()
    generation, how = nim_generation(client, deploy.image, deploy.nim_api)
    logger.info("%s is NIM %s (%s)", deploy.image, generation, how)
    if how.startswith("assumed"):
        logger.warning("%s; set deploy.nim_api: 1.x or 2.x to say which it is", how)
    refuse_unservable(generation, how, deploy, build, source)
    if source.manifest is None or source.model_name is None:
        return ServingImage(image=deploy.image, nim_api=generation, detected_by=how)

    manifest, summary = read_manifest(source.manifest)
    check_model_listed(summary, source.model_name, where=str(source.manifest))
    tag, built = manifest_image(client, name, deploy.image, manifest, model_name=source.model_name,
                                served_model_name=deploy.served_model_name)
    logger.info(
        "%s %s FROM %s with the %s manifest (%d profiles) for %s", "built" if built else "reusing", tag, deploy.image,
        summary.schema, summary.profiles, source.model_name,
    )
    return ServingImage(image=tag, nim_api=generation, detected_by=how, model_name=source.model_name,
                        derived_from=deploy.image, built=built)
