"""The engine a spec needs, from the cheapest place that has it: this host, the store, or one build.

:func:`plan_engine` checks everything that can be checked before GPU time (the build config against
the model's ``config.json`` and the probed GPUs, the serving GPU against the build GPU) and computes
the engine key. :func:`obtain_engine` then looks on this host, then in the engine store, and
otherwise takes the key's build lease and builds. Only one host builds a key at a time; the others
wait for its manifest and restore (:mod:`nimflow.build_lease`).

Nothing damaged is used: a local copy is checked first (:mod:`nimflow.engine_check`) and moved aside
when it is not whole; a store engine whose files are missing or corrupt has its manifest set aside
(:meth:`EngineStore.set_aside_manifest`) and the key is rebuilt, once per run.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker

from nimflow.build_config import check_against_model, check_against_target, converter_family
from nimflow.build_lease import BuildLeases, Lease
from nimflow.checkpoint import read_config
from nimflow.containers import LABEL_PREFIX, image_id
from nimflow.engine_build import build_engine, remove_stale_build_containers
from nimflow.engine_check import check_local_engine, record_verified, set_aside
from nimflow.engine_key import engine_key, engine_key_inputs
from nimflow.engine_store import (
    EngineStore,
    StoredManifest,
    local_engine_path,
    publish_local,
    scratch_dir,
    write_manifest,
)
from nimflow.errors import BuildLeaseLost, EngineStoreError, StoredEngineBroken, TransientBuildError, translated_errors
from nimflow.gpu_identity import TargetIdentity, check_serving_target, probe_target
from nimflow.image_probe import converter_path, probe_and_check_build
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
    #: trtllm-build: where the build image keeps the checkpoint family's convert_checkpoint.py (probed)
    converter: str | None = None


def plan_engine(
    client: docker.DockerClient, build: BuildSpec, model_dir: Path | None, weights_identity: str, deploy: DeploySpec | None,
    *, allow_patterns: list[str] | None = None, model_config: dict[str, Any] | None = None,
) -> EnginePlan:
    """Check the build before any GPU time and compute the engine key.

    The build image is probed first (:mod:`nimflow.image_probe`, no GPU, cached by image id): a build
    it cannot run is refused before the GPU probe or any build container starts.

    Args:
        model_dir: the checkpoint; None when it is not downloaded yet (``nimflow plan``): the
            checks that need its config.json are then left to the run.
        allow_patterns: the source's ``allow_patterns``, which decide the side files in the engine directory.
        model_config: the checkpoint's config.json when ``model_dir`` is None but it is known (the
            hub's copy, ``nimflow plan``): the image is then checked for its family's converter.

    Raises:
        ConfigError: the build config does not fit the model, the build image or the GPUs (each rule
            names its field).
        EngineIncompatible: the deployment's GPU or image differs from the build's (unless deploy.force).
        DeploymentError: an image is not on this host, or cannot run the GPU probe.
        ServiceUnavailable: the Docker daemon did not answer.
    """
    model_config = read_config(model_dir) if model_dir is not None else (model_config or {})
    if model_dir is not None:
        check_against_model(build, model_config, where=f"{model_dir}/config.json")
    facts = probe_and_check_build(client, build, model_config)
    family = converter_family(build, model_config) if build.backend == "trtllm-build" else None
    converter = converter_path(facts, family, image=build.image) if family is not None and not build.convert_script else None
    with translated_errors(f"probing the build GPU with {build.image}"):
        target = probe_target(client, build.image, build.gpus, build.env, field="build.gpus")
        build_image_id = image_id(client, build.image)
    check_against_target(build, target)
    inputs = engine_key_inputs(
        weights_identity=weights_identity, build=build, image_id=build_image_id, target=target, allow_patterns=allow_patterns
    )
    key = engine_key(inputs)
    differences: list[str] = []
    if deploy is not None and (deploy.image, deploy.gpus, deploy.env) != (build.image, build.gpus, build.env):
        # Serving elsewhere than the build ran: refuse now rather than after the build.
        differences = check_serving_target(client, deploy, inputs, engine_key=key)
    return EnginePlan(key=key, inputs=inputs, target=target, model_config=model_config, serving_differences=differences,
                      converter=converter)


def engine_record(key: str, path: Path, origin: str, manifest: dict[str, Any], lease: Lease | None = None) -> Engine:
    """The small record the compile stage returns."""
    files = manifest["files"]
    gpu = manifest.get("key_inputs", {}).get("gpu") or {}
    return Engine(
        engine_key=key, path=str(path), origin=origin, files=len(files), bytes=sum(f["size"] for f in files),
        gpu=gpu.get("name"), trtllm_version=manifest.get("key_inputs", {}).get("trtllm_version"),
        build_lease=lease.token if lease else None,
    )


def _local_engine(final: Path, log: Log) -> dict[str, Any] | None:
    """The manifest of this host's copy of the engine when it is whole, else None.

    A damaged or half-written copy is moved aside (one warning naming what is wrong and where it
    went) so that a restore or build can take its place.

    Raises:
        PermanentError: the copy could not be moved aside (permissions on the engines directory).
    """
    while (checked := check_local_engine(final)) is not None:
        if checked.manifest is not None:
            return checked.manifest
        with translated_errors(f"moving the damaged local engine {final} aside ({checked.problem}); move it by hand"):
            aside = set_aside(final, checked)
        if aside is not None:
            log.warning("Local engine %s at %s is damaged: %s; moved it aside to %s (look at it, then delete it); "
                        "restoring it from the store or rebuilding it", final.name, final, checked.problem, aside)
        # else another run on this host moved it or published a fresh copy meanwhile: check again
    return None


def _restore(store: EngineStore, manifest: dict[str, Any], cache_dir: Path, final: Path) -> TransferStats:
    """Restore and verify the engine into a scratch dir, then publish it locally; the transfer's stats.

    ``manifest`` is one :meth:`EngineStore.manifest` returned (checked against its key); the restore
    checks it again and writes only inside the scratch dir, which is renamed into place only after
    every file's hash matched and everything was fsynced, and removed otherwise.

    Raises:
        StoredEngineBroken: a file the manifest names is missing or corrupt in the store.
        EngineStoreError: the store refused or did not answer (EngineStoreUnavailable).
    """
    key = manifest["engine_key"]
    staged = scratch_dir(cache_dir, f"restore-{key[:12]}")
    files = manifest["files"]
    try:
        with translated_errors(f"restoring engine {key} from {store.uri(key)}", domain=EngineStoreError), \
                transfer_progress("restore", f"engine {key[:12]}", sum(f["size"] for f in files), len(files)) as progress:
            store.restore(manifest, staged, engine_key=key, on_bytes=progress.add_bytes, on_file_done=progress.file_done)
        if publish_local(staged, final):
            record_verified(final, manifest)  # every byte was just hashed: the first local hit hashes nothing
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return progress.finish()


@dataclass(frozen=True)
class _BrokenManifest:
    """The store manifest a run found broken (and set aside, or tried to), with why."""

    etag: str
    error: StoredEngineBroken

    def describe(self) -> str:
        """What is missing or corrupt: the object's URI (it names the upload) and the problem."""
        return f"{self.error.object_uri}: {self.error.problem}"


def _set_aside_broken(store: EngineStore, stored: StoredManifest, broken: _BrokenManifest, log: Log) -> bool:
    """Unpublish a manifest whose files are missing or corrupt (keeping a copy), so the key is rebuilt.

    Returns:
        True when this run set it aside; False when the store's manifest changed first (another host
        set it aside or published a new one): the caller looks again.

    Raises:
        EngineStoreError: the store refused or did not answer.
    """
    key = stored.manifest["engine_key"]
    with translated_errors(f"setting aside the manifest of engine {key} in {store.uri(key)}", domain=EngineStoreError):
        aside = store.set_aside_manifest(key, stored)
    if aside is None:
        log.info("Engine %s in %s: %s; another host set its manifest aside or replaced it first: looking again",
                 key, store.uri(key), broken.describe())
        return False
    log.warning("Engine %s in %s: %s; set its manifest aside to %s; rebuilding it", key, store.uri(key),
                broken.describe(), aside)
    return True


def _broken_twice(store: EngineStore, key: str, first: _BrokenManifest, second: _BrokenManifest) -> StoredEngineBroken:
    """The error for a second broken manifest in one run: healing is tried once, a person looks at the rest."""
    return StoredEngineBroken.at(second.error.object_uri, second.error.problem, (
        f"engine {key} in {store.uri(key)} is broken again: {second.describe()}; this run already set aside a broken "
        f"manifest of the key ({first.describe()}) and sets aside at most one. Something keeps publishing engines "
        f"whose files are missing or corrupt (a gc racing uploads, a store losing objects): look at "
        f"{store.uri(key)}/ (set-aside/ keeps the first), then delete {store.uri(key, 'manifest.json')} to have it rebuilt"
    ))


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

    This host's copy is used only when it is whole (:func:`nimflow.engine_check.check_local_engine`);
    a damaged one is moved aside and replaced. A store engine whose files are missing or corrupt has
    its manifest set aside and the key is rebuilt; a second broken manifest in the same run fails.

    Raises:
        BuildFailed / TransientBuildError: the build failed (logs in the message).
        StoredEngineBroken: a second store manifest of the key, in this run, names missing or corrupt files.
        EngineStoreError / ServiceUnavailable: the store refused (a manifest it cannot read) or did not answer, or does not enforce
            conditional writes (unless ``cache.single_writer``).
        BuildLeaseLost: the build lease was lost during the build; its result is not used (the retry
            restores the new holder's engine).
        DeploymentError: the checkpoint directory is, holds or lies in nimflow's own directories.
    """
    key = plan.key
    # The build container mounts the checkpoint: it must not carry the route files or NIM caches along.
    refuse_nimflow_dirs(cache_dir, model_dir, "the checkpoint to build from")
    final = local_engine_path(cache_dir, key)
    manifest = _local_engine(final, log)
    if manifest is not None:
        log.info("Engine %s is already on this host at %s (checked): nothing to build", key, final)
        return engine_record(key, final, "local-cache", manifest)

    store = EngineStore(cache)
    require_conditional_writes(store)  # before the first lease or manifest write
    leases = BuildLeases(store, cache.build_lease_seconds)
    poll = min(5.0, max(0.5, cache.build_lease_seconds / 4))
    give_up_at = time.monotonic() + build.timeout_seconds + 2 * cache.build_lease_seconds
    last_note = 0.0
    broken: _BrokenManifest | None = None  # the manifest this run found broken: healed once per run
    while True:
        with translated_errors(f"looking up engine {key} in {cache.uri}", domain=EngineStoreError):
            stored = store.stored_manifest(key)
            got = None if stored is not None else leases.try_acquire(key)
            if isinstance(got, Lease) and (stored := store.stored_manifest(key)) is not None:
                leases.release(got)  # published just before we took the lease
        if stored is not None:
            if broken is None or stored.etag != broken.etag:
                try:
                    transfer = _restore(store, stored.manifest, cache_dir, final)
                except StoredEngineBroken as exc:
                    found = _BrokenManifest(stored.etag, exc)
                    if broken is not None:
                        raise _broken_twice(store, key, broken, found) from exc
                    broken = found
                else:
                    log.info("Engine %s restored from %s (%.0f MiB/s, every byte verified): nothing to build",
                             key, store.uri(key), transfer.mib_per_s)
                    return engine_record(key, final, "engine-store", stored.manifest).model_copy(update={"transfer": transfer})
            # The manifest names missing or corrupt files: unpublish it (again, if a conflict stopped the last try).
            assert broken is not None
            if not _set_aside_broken(store, stored, broken, log):
                if time.monotonic() > give_up_at:
                    raise TransientBuildError(f"engine {key} in {store.uri(key)}: could not set its broken manifest "
                                              f"aside ({broken.describe()}); it is tried again on retry")
                time.sleep(min(poll, 1.0))  # paces repeated conflicts (409) on the same manifest
            continue
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
                        trtllm_version=plan.target.trtllm_version, converter=plan.converter,
                    )
                manifest = write_manifest(staged, key, plan.inputs, built)
                held.confirm()  # lost: another host may publish its build; this one is not used
                if publish_local(staged, final):
                    record_verified(final, manifest)  # write_manifest just hashed every byte
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
