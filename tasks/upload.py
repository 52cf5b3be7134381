"""Stage 4: publish the engine to the engine store so no host compiles it again."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from nimflow.build_lease import BuildLeases
from nimflow.engine_store import STORE_MANIFEST, EngineStore, UploadOutcome, read_local_manifest
from nimflow.errors import EngineStoreError, is_transient, translated_errors
from nimflow.progress import transfer_progress
from nimflow.records import Engine, PublishedEngine, TransferStats
from nimflow.retries import transient_retries
from nimflow.spec import CacheSpec
from nimflow.store_conformance import require_conditional_writes


def publish_engine(engine: Engine, cache: CacheSpec) -> PublishedEngine:
    """Upload the engine under its own upload prefix, then create its manifest; skip what the store holds.

    The build lease taken by the compile stage is kept alive during the upload and released once
    the manifest exists, so hosts waiting for this engine restore it instead of building it.

    Raises:
        EngineStoreError: no local manifest, or the store refused (missing bucket, access denied, it
            does not enforce conditional writes).
        ServiceUnavailable: the store answered 5xx/throttled after botocore's own retries.
        BuildLeaseLost: the build lease was lost before the manifest was written (nothing published).
    """
    manifest = read_local_manifest(Path(engine.path))
    if manifest is None:
        raise EngineStoreError(f"{engine.path}: no engine manifest; the engine directory is incomplete")
    store = EngineStore(cache)
    key = engine.engine_key
    published = PublishedEngine(engine_key=key, uri=store.uri(key), manifest_uri=store.uri(key, STORE_MANIFEST))
    leases = BuildLeases(store, cache.build_lease_seconds)
    lease = None
    try:
        with translated_errors(f"publishing engine {key} to {store.uri(key)}", domain=EngineStoreError):
            require_conditional_writes(store)
            lease = leases.adopt(key, engine.build_lease) if engine.build_lease else None
            if store.manifest(key) is not None:
                outcome = None
            elif lease is None:
                outcome, seconds = _upload_watched(store, Path(engine.path), manifest)
            else:
                with leases.kept_alive(lease) as held:
                    # The manifest is written only while the lease is shown to be ours.
                    outcome, seconds = _upload_watched(store, Path(engine.path), manifest, before_publish=held.confirm)
                lease = held.lease
    except Exception as exc:
        # A transient fault is retried by this task: keep the lease so nobody starts a second build.
        if lease is not None and not is_transient(exc):
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
