"""Stage 1: download the base checkpoint from the Hugging Face Hub, pinned to a commit sha."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from nimflow.checkpoint import local_checkpoint
from nimflow.hub_snapshot import (
    COMPLETE_MARKER,
    completed_snapshot,
    fetch_snapshot,
    resolve_revision,
    snapshot_path,
)
from nimflow.records import Checkpoint
from nimflow.retries import transient_retries
from nimflow.spec import SourceSpec

# The snapshot mechanism lives in nimflow.hub_snapshot; plan and tests still import it from here.
__all__ = ["COMPLETE_MARKER", "completed_snapshot", "download_checkpoint", "fetch_snapshot", "resolve_revision", "snapshot_path"]


@task(name="download-checkpoint", **transient_retries())
def download_checkpoint(source: SourceSpec, cache_dir: str) -> Checkpoint:
    """Stage 1: the base checkpoint on this host, pinned to a commit sha (or a content digest)."""
    logger = get_run_logger()
    if source.local_dir is not None:
        checkpoint = local_checkpoint(Path(source.local_dir))
        logger.info("Using local checkpoint %s (%s)", checkpoint.path, checkpoint.identity)
        return checkpoint
    assert source.repo_id is not None  # the spec guarantees one of the two
    checkpoint = fetch_snapshot(source.repo_id, source.revision, source.allow_patterns, Path(cache_dir))
    if checkpoint.downloaded_files:
        logger.info(
            "Downloaded %s files (%s bytes) of %s@%s",
            checkpoint.downloaded_files, checkpoint.downloaded_bytes, source.repo_id, checkpoint.revision_sha,
        )
    else:
        logger.info("%s@%s already complete in %s: nothing downloaded", source.repo_id, checkpoint.revision_sha, checkpoint.path)
    return checkpoint
