"""Stage 4: publish the engine to the engine store so no host compiles it again."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from nimflow.build_lease import BuildLeases, Lease
from nimflow.engine_check import check_local_engine
from nimflow.engine_store import STORE_MANIFEST, EngineStore, UploadOutcome
from nimflow.errors import EngineStoreError, is_transient, translated_errors
from nimflow.progress import transfer_progress
from nimflow.records import Engine, PublishedEngine, TransferStats
from nimflow.retries import transient_retries
from nimflow.spec import CacheSpec
from nimflow.store_conformance import require_conditional_writes

logger = logging.getLogger(__name__)


def publish_engine(engine: Engine, cache: CacheSpec) -> PublishedEngine:
    """Upload the engine under its own upload prefix, then create its manifest; skip what the store holds.

    The build lease taken by the compile stage is kept alive during the upload and released once
    the manifest exists, so hosts waiting for this engine restore it instead of building it.

    The local engine is checked first (:func:`nimflow.engine_check.check_local_engine`): a damaged
    one is never uploaded.

    Raises:
        EngineStoreError: the local engine is missing or damaged, or the store refused (missing bucket,
            access denied, it does not enforce conditional writes).
        ServiceUnavailable: the store answered 5xx/throttled after botocore's own retries.
        BuildLeaseLost: the build lease was lost before the manifest was written (nothing published).
    """
    store = EngineStore(cache)
    key = engine.engine_key
    published = PublishedEngine(engine_key=key, uri=store.uri(key), manifest_uri=store.uri(key, STORE_MANIFEST))
    leases = BuildLeases(store, cache.build_lease_seconds)
    lease = None
    taken_here = False
    try:
        with translated_errors(f"publishing engine {key} to {store.uri(key)}", domain=EngineStoreError):
            require_conditional_writes(store)
            lease = leases.adopt(key, engine.build_lease) if engine.build_lease else None
            manifest = _whole_local_engine(engine)  # under the lease: a refusal releases it
            if lease is None and store.manifest(key) is None:
                # A local-cache hit (no build), or a build whose lease lapsed: every upload runs under
                # the key's lease, this one too, so gc never deletes its files under it.
                lease, taken_here = _lease_to_republish(store, leases, key), True
            if lease is None or store.manifest(key) is not None:
                outcome = None
            else:
                with leases.kept_alive(lease) as held:
                    # The manifest is written only while the lease is shown to be ours.
                    outcome, seconds = _upload_watched(store, Path(engine.path), manifest, before_publish=held.confirm)
                lease = held.lease
    except Exception as exc:
        # A transient fault is retried by this task: keep a build's lease so nobody starts a second build
        # (a lease taken here goes: the retry takes it again).
        if lease is not None and (taken_here or not is_transient(exc)):
            leases.release(lease)
        raise
    if lease is not None:
        leases.release(lease)
    if outcome is None:
        return published
    return published.model_copy(update={
        "uploaded_files": outcome.files, "uploaded_bytes": outcome.bytes, "published_by_this_run": outcome.published,
        "transfer": TransferStats(stage="upload", bytes=outcome.bytes, files=outcome.files, seconds=seconds),
    })


def _lease_to_republish(store: EngineStore, leases: BuildLeases, key: str) -> Lease | None:
    """The key's lease for re-publishing an engine this host already had (no build, so no lease yet).

    Uploads and ``nimflow cache gc`` exclude each other through this lease: gc never deletes an
    upload's files while it is held. Another holder (a build, an upload, gc) is waited for, up to
    two lease TTLs, until either the lease is free or the manifest appears.

    Returns:
        The lease, or None when the re-publish is given up: the manifest appeared meanwhile, or
        another holder kept the lease the whole time (it publishes the key; this host serves its
        own copy either way).
    """
    give_up_at = time.monotonic() + 2 * leases.ttl
    poll = min(5.0, max(0.5, leases.ttl / 4))
    while True:
        got = leases.try_acquire(key)
        if isinstance(got, Lease):
            return got
        if store.manifest(key) is not None:
            logger.info("engine %s was published by another host while this one waited to re-publish it: nothing to upload", key)
            return None
        if time.monotonic() > give_up_at:
            logger.warning("engine %s: not re-published from this host: %s held its build lease for the %gs this run "
                           "waited (it publishes the key itself)", key, got.holder, 2 * leases.ttl)
            return None
        time.sleep(poll)


def _whole_local_engine(engine: Engine) -> dict[str, Any]:
    """The local engine's manifest, once every file it lists is shown to be there with its size and sha256.

    Raises:
        EngineStoreError (permanent): the directory is missing or damaged; nothing is uploaded.
    """
    checked = check_local_engine(Path(engine.path), engine.engine_key)
    if checked is None:
        raise EngineStoreError(f"{engine.path}: no engine directory; not published")
    if checked.manifest is None:
        raise EngineStoreError(
            f"{engine.path}: the local engine is damaged: {checked.problem}; not published. The next run of this "
            "spec on this host moves it aside and restores or rebuilds it"
        )
    return checked.manifest


def _upload_watched(store: EngineStore, engine_dir: Path, manifest: dict[str, Any],
                    before_publish: Callable[[], None] | None = None) -> tuple[UploadOutcome, float]:
    """``store.upload`` with its progress shown; the outcome and the transfer's seconds."""
    files = manifest["files"]
    subject = f"engine {manifest['engine_key'][:12]}"
    with transfer_progress("upload", subject, sum(f["size"] for f in files), len(files)) as progress:
        outcome = store.upload(engine_dir, manifest, on_bytes=progress.add_bytes, on_file_done=progress.file_done,
                               before_publish=before_publish)
    return outcome, progress.finish().seconds


@task(name="upload-engine", **transient_retries())
def upload_engine(engine: Engine, cache: CacheSpec) -> PublishedEngine:
    """Stage 4: the engine in the shared store, manifest written last."""
    published = publish_engine(engine, cache)
    logger = get_run_logger()
    if published.published_by_this_run:
        logger.info("Uploaded %s files (%s bytes) to %s", published.uploaded_files, published.uploaded_bytes, published.uri)
    elif published.uploaded_files:
        logger.warning(
            "Another host published %s first: its engine is kept and this run's upload was removed", published.manifest_uri
        )
    else:
        logger.info("Engine store already holds %s: nothing uploaded", published.manifest_uri)
    return published
