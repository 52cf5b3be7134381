"""Stage 3: compile a TensorRT-LLM engine, unless this host or the engine store already has it."""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import get_run_logger, task

from nimflow.containers import LABEL_PREFIX, docker_client, image_id
from nimflow.engine_build import build_engine
from nimflow.engine_key import engine_key, engine_key_inputs
from nimflow.engine_store import (
    EngineStore,
    local_engine_path,
    publish_local,
    read_local_manifest,
    staging_dir,
    write_manifest,
)
from nimflow.errors import translated_errors
from nimflow.records import Engine
from nimflow.retries import transient_retries
from nimflow.spec import BuildSpec, CacheSpec


def _engine_record(key: str, path: Path, origin: str, manifest: dict) -> Engine:
    files = manifest["files"]
    return Engine(
        engine_key=key, path=str(path), origin=origin, files=len(files), bytes=sum(f["size"] for f in files)
    )


def compile_or_reuse(
    build: BuildSpec, cache: CacheSpec, model_dir: Path, weights_identity: str, cache_dir: Path
) -> Engine:
    """The engine for these inputs: from this host's cache, else the engine store, else a build.

    Raises:
        BuildFailed / TransientBuildError: the build failed (logs in the message).
        DeploymentError: the build image is not on this host.
        ServiceUnavailable: the Docker daemon or the engine store did not answer.
    """
    logger = get_run_logger()
    client = docker_client()
    with translated_errors(f"inspecting build image {build.image}"):
        inputs = engine_key_inputs(weights_identity=weights_identity, build=build, image_id=image_id(client, build.image))
    key = engine_key(inputs)
    final = local_engine_path(cache_dir, key)

    manifest = read_local_manifest(final)
    if manifest is not None:
        logger.info("Engine %s is already on this host at %s: nothing to build", key, final)
        return _engine_record(key, final, "local-cache", manifest)

    store = EngineStore(cache)
    with translated_errors(f"looking up engine {key} in {cache.uri}"):
        manifest = store.manifest(key)
    if manifest is not None:
        staged = staging_dir(cache_dir, key)
        try:
            with translated_errors(f"restoring engine {key} from {store.uri(key)}"):
                store.restore(manifest, staged)
            publish_local(staged, final)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        logger.info("Engine %s restored from %s: nothing to build", key, store.uri(key))
        return _engine_record(key, final, "engine-store", manifest)

    staged = staging_dir(cache_dir, key)
    try:
        labels = {f"{LABEL_PREFIX}engine-key": key}
        with translated_errors(f"building engine {key} with {build.backend}"):
            seconds = build_engine(client, build, model_dir, staged, labels, key)
        manifest = write_manifest(staged, key, inputs)
        publish_local(staged, final)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    logger.info("Built engine %s with %s in %.1fs", key, build.backend, seconds)
    return _engine_record(key, final, "built", manifest)


@task(name="compile-engine", **transient_retries())
def compile_engine(build: BuildSpec, cache: CacheSpec, model_path: str, weights_identity: str, cache_dir: str) -> Engine:
    """Stage 3: a TensorRT-LLM engine in NIM's layout under ``<cache_dir>/engines/<engine_key>``."""
    return compile_or_reuse(build, cache, Path(model_path), weights_identity, Path(cache_dir))
