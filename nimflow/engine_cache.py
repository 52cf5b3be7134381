"""The engine a spec needs, from the cheapest place that has it: this host, the store, or one build.

:func:`plan_engine` checks everything that can be checked before GPU time (the build config against
the model's ``config.json`` and the probed GPUs, the serving GPU against the build GPU) and computes
the engine key. :func:`obtain_engine` then looks on this host, then in the engine store, and
otherwise takes the key's build lease and builds. Only one host builds a key at a time; the others
wait for its manifest and restore (:mod:`nimflow.build_lease`).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker

from nimflow.build_config import check_against_model, check_against_target
from nimflow.build_lease import BuildLeases, Lease
from nimflow.checkpoint import read_config
from nimflow.containers import LABEL_PREFIX, image_id
from nimflow.engine_build import build_engine, remove_stale_build_containers
from nimflow.engine_key import engine_key, engine_key_inputs
from nimflow.engine_store import (
    EngineStore,
    local_engine_path,
    publish_local,
    read_local_manifest,
    scratch_dir,
    write_manifest,
)
from nimflow.errors import BuildLeaseLost, EngineStoreError, TransientBuildError, translated_errors
from nimflow.gpu_identity import TargetIdentity, check_serving_target, probe_target
from nimflow.progress import transfer_progress
from nimflow.records import Engine, TransferStats
from nimflow.rollout import refuse_nimflow_dirs
from nimflow.spec import BuildSpec, CacheSpec, DeploySpec
from nimflow.store_conformance import require_conditional_writes

Log = logging.Logger | logging.LoggerAdapter


@dataclass(frozen=True)
class EnginePlan:
    """The engine a spec needs: its key, what the key was computed from, and the build target."""

    key: str
    inputs: dict[str, Any]
    target: TargetIdentity
    model_config: dict[str, Any]
    serving_differences: list[str]


def plan_engine(
    client: docker.DockerClient, build: BuildSpec, model_dir: Path | None, weights_identity: str, deploy: DeploySpec | None
) -> EnginePlan:
    """Check the build before any GPU time and compute the engine key.

    Args:
        model_dir: the checkpoint; None when it is not downloaded yet (``nimflow plan``): the
            checks that need its config.json are then left to the run.

    Raises:
        ConfigError: the build config does not fit the model or the GPUs (each rule names its field).
        EngineIncompatible: the deployment's GPU or image differs from the build's (unless deploy.force).
        DeploymentError: an image is not on this host, or cannot run the GPU probe.
        ServiceUnavailable: the Docker daemon did not answer.
    """
    model_config = read_config(model_dir) if model_dir is not None else {}
    if model_dir is not None:
        check_against_model(build, model_config, where=f"{model_dir}/config.json")
    with translated_errors(f"probing the build GPU with {build.image}"):
        target = probe_target(client, build.image, build.gpus, build.env, field="build.gpus")
        build_image_id = image_id(client, build.image)
    check_against_target(build, target)
    inputs = engine_key_inputs(weights_identity=weights_identity, build=build, image_id=build_image_id, target=target)
    key = engine_key(inputs)
    differences: list[str] = []
    if deploy is not None and (deploy.image, deploy.gpus, deploy.env) != (build.image, build.gpus, build.env):
        # Serving elsewhere than the build ran: refuse now rather than after the build.
        differences = check_serving_target(client, deploy, inputs, engine_key=key)
    return EnginePlan(key=key, inputs=inputs, target=target, model_config=model_config, serving_differences=differences)


def engine_record(key: str, path: Path, origin: str, manifest: dict[str, Any], lease: Lease | None = None) -> Engine:
    """The small record the compile stage returns."""
    files = manifest["files"]
    gpu = manifest.get("key_inputs", {}).get("gpu") or {}
    return Engine(
        engine_key=key, path=str(path), origin=origin, files=len(files), bytes=sum(f["size"] for f in files),
        gpu=gpu.get("name"), trtllm_version=manifest.get("key_inputs", {}).get("trtllm_version"),
        build_lease=lease.token if lease else None,
    )


def _restore(store: EngineStore, manifest: dict[str, Any], cache_dir: Path, final: Path) -> TransferStats:
    """Restore and verify the engine into a scratch dir, then publish it locally; the transfer's stats.

    ``manifest`` is one :meth:`EngineStore.manifest` returned (checked against its key); the restore
    checks it again and writes only inside the scratch dir, which is renamed into place only after
    every file's hash matched, and removed otherwise.
    """
    key = manifest["engine_key"]
    staged = scratch_dir(cache_dir, f"restore-{key[:12]}")
    files = manifest["files"]
    try:
        with translated_errors(f"restoring engine {key} from {store.uri(key)}", domain=EngineStoreError), \
                transfer_progress("restore", f"engine {key[:12]}", sum(f["size"] for f in files), len(files)) as progress:
            store.restore(manifest, staged, engine_key=key, on_bytes=progress.add_bytes, on_file_done=progress.file_done)
        publish_local(staged, final)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return progress.finish()


def obtain_engine(
    client: docker.DockerClient,
    plan: EnginePlan,
    build: BuildSpec,
    cache: CacheSpec,
    model_dir: Path,
    cache_dir: Path,
    log: Log,
) -> Engine:
    """The engine of ``plan``: from this host's cache, else the engine store, else one build.

    A build holds the key's lease; the returned record carries its token so the upload stage can
    keep it until the manifest is published. Runs that find the lease taken wait for the
    manifest and restore.

    Raises:
        BuildFailed / TransientBuildError: the build failed (logs in the message).
        EngineStoreError / ServiceUnavailable: the store refused or did not answer, or does not enforce
            conditional writes (unless ``cache.single_writer``).
        BuildLeaseLost: the build lease was lost during the build; its result is not used (the retry
            restores the new holder's engine).
        DeploymentError: the checkpoint directory is, holds or lies in nimflow's own directories.
    """
    key = plan.key
    # The build container mounts the checkpoint: it must not carry the route files or NIM caches along.
    refuse_nimflow_dirs(cache_dir, model_dir, "the checkpoint to build from")
    final = local_engine_path(cache_dir, key)
    manifest = read_local_manifest(final)
    if manifest is not None:
        log.info("Engine %s is already on this host at %s: nothing to build", key, final)
        return engine_record(key, final, "local-cache", manifest)

    store = EngineStore(cache)
    require_conditional_writes(store)  # before the first lease or manifest write
    leases = BuildLeases(store, cache.build_lease_seconds)
    poll = min(5.0, max(0.5, cache.build_lease_seconds / 4))
    give_up_at = time.monotonic() + build.timeout_seconds + 2 * cache.build_lease_seconds
    last_note = 0.0
    while True:
        with translated_errors(f"looking up engine {key} in {cache.uri}", domain=EngineStoreError):
            manifest = store.manifest(key)
            got = None if manifest is not None else leases.try_acquire(key)
            if isinstance(got, Lease) and (manifest := store.manifest(key)) is not None:
                leases.release(got)  # published just before we took the lease
        if manifest is not None:
            transfer = _restore(store, manifest, cache_dir, final)
            log.info("Engine %s restored from %s (%.0f MiB/s, every byte verified): nothing to build",
                     key, store.uri(key), transfer.mib_per_s)
            return engine_record(key, final, "engine-store", manifest).model_copy(update={"transfer": transfer})
        assert got is not None  # no manifest: try_acquire gave a lease or the current holder
        if isinstance(got, Lease):
            return _build(client, plan, build, leases, got, model_dir, cache_dir, final, log)
        if time.monotonic() > give_up_at:
            raise TransientBuildError(
                f"engine {key} is still being built by {got.holder} after {build.timeout_seconds:g}s of waiting; "
                "it will be waited for again on retry"
            )
        if time.monotonic() - last_note > 30:
            log.info(
                "Engine %s is being built by %s (lease renewed %.0fs ago): waiting to restore it", key, got.holder, got.age_seconds
            )
            last_note = time.monotonic()
        time.sleep(poll)


def _build(
    client: docker.DockerClient, plan: EnginePlan, build: BuildSpec, leases: BuildLeases, lease: Lease,
    model_dir: Path, cache_dir: Path, final: Path, log: Log,
) -> Engine:
    key = plan.key
    current = lease
    try:
        with leases.kept_alive(lease) as held:
            if removed := remove_stale_build_containers(client, key):
                log.info("Removed %s build container(s) of %s left by an earlier attempt", removed, key)
            staged = scratch_dir(cache_dir, f"engine-{key[:12]}")
            work = scratch_dir(cache_dir, f"work-{key[:12]}")
            try:
                log.info("Building engine %s with %s on %s", key, build.backend, plan.target.gpu.describe())
                started = time.monotonic()
                labels = {f"{LABEL_PREFIX}engine-key": key}
                with translated_errors(f"building engine {key} with {build.backend}"):
                    built = build_engine(
                        client, build, model_dir, staged, work, key=key, labels=labels, model_config=plan.model_config,
                        trtllm_version=plan.target.trtllm_version,
                    )
                manifest = write_manifest(staged, key, plan.inputs, built)
                held.confirm()  # lost: another host may publish its build; this one is not used
                publish_local(staged, final)
            finally:
                current = held.lease
                shutil.rmtree(staged, ignore_errors=True)
                shutil.rmtree(work, ignore_errors=True)
    except BuildLeaseLost:
        raise  # no longer ours to release
    except BaseException:
        leases.release(current)  # let a waiting host try (it fails the same way if the cause is permanent)
        raise
    log.info("Built engine %s with %s in %.1fs", key, build.backend, time.monotonic() - started)
    return engine_record(key, final, "built", manifest, held.lease)
