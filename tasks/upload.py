"""Stage 4: publish the engine to the engine store so no host compiles it again."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from nimflow.engine_store import EngineStore, read_local_manifest
from nimflow.errors import EngineStoreError, translated_errors
from nimflow.records import Engine, PublishedEngine
from nimflow.retries import transient_retries
from nimflow.spec import CacheSpec


def publish_engine(engine: Engine, cache: CacheSpec) -> PublishedEngine:
    """Upload the engine's files, then its manifest; skip what the store already holds.

    Raises:
        EngineStoreError: no local manifest, or the store refused (missing bucket, access denied).
        ServiceUnavailable: the store answered 5xx/throttled after botocore's own retries.
    """
    manifest = read_local_manifest(Path(engine.path))
    if manifest is None:
        raise EngineStoreError(f"{engine.path}: no engine manifest; the engine directory is incomplete")
    store = EngineStore(cache)
    key = engine.engine_key
    published = PublishedEngine(engine_key=key, uri=store.uri(key), manifest_uri=store.uri(key, "manifest.json"))
    with translated_errors(f"publishing engine {key} to {store.uri(key)}"):
        if store.manifest(key) is not None:
            return published
        files, size = store.upload(Path(engine.path), manifest)
    return published.model_copy(update={"uploaded_files": files, "uploaded_bytes": size})


@task(name="upload-engine", **transient_retries())
def upload_engine(engine: Engine, cache: CacheSpec) -> PublishedEngine:
    """Stage 4: the engine in the shared store, manifest written last."""
    published = publish_engine(engine, cache)
    logger = get_run_logger()
    if published.uploaded_files:
        logger.info("Uploaded %s files (%s bytes) to %s", published.uploaded_files, published.uploaded_bytes, published.uri)
    else:
        logger.info("Engine store already holds %s: nothing uploaded", published.manifest_uri)
    return published
