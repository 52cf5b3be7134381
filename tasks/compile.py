"""Stage 3: compile a TensorRT-LLM engine, unless this host or the engine store already has it."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from nimflow.containers import docker_client
from nimflow.engine_cache import obtain_engine, plan_engine
from nimflow.records import Engine
from nimflow.retries import transient_retries
from nimflow.spec import BuildSpec, CacheSpec, DeploySpec


@task(name="compile-engine", **transient_retries())
def compile_engine(
    build: BuildSpec, cache: CacheSpec, model_path: str, weights_identity: str, cache_dir: str, deploy: DeploySpec,
    allow_patterns: list[str] | None = None,
) -> Engine:
    """Stage 3: a TensorRT-LLM engine in NIM's layout under ``<cache_dir>/engines/<engine_key>``.

    The build config is checked against the model and the GPUs first; then the engine comes from
    this host, the engine store, or exactly one build across the fleet. ``allow_patterns`` (the
    source's) is part of the engine key.
    """
    logger = get_run_logger()
    client = docker_client()
    plan = plan_engine(client, build, Path(model_path), weights_identity, deploy, allow_patterns=allow_patterns)
    logger.info(
        "Engine key %s: %s on %s, TensorRT-LLM %s", plan.key, build.backend, plan.target.gpu.describe(),
        plan.target.trtllm_version,
    )
    if plan.converter:
        logger.info("Converter in %s (probed): %s", build.image, plan.converter)
    for difference in plan.serving_differences:
        logger.warning("deploy.force is set: serving despite %s", difference)
    return obtain_engine(client, plan, build, cache, Path(model_path), Path(cache_dir), logger)
