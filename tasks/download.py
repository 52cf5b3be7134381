"""Stage 1: download the base checkpoint from the Hugging Face Hub, pinned to a commit sha."""

from __future__ import annotations

import json
import re
from pathlib import Path

from huggingface_hub import HfApi, snapshot_download
from prefect import get_run_logger, task

from nimflow.checkpoint import directory_digest, model_files
from nimflow.errors import InvalidWeights, translated_errors
from nimflow.records import Checkpoint
from nimflow.retries import transient_retries
from nimflow.settings import get_settings
from nimflow.spec import SourceSpec

_SHA = re.compile(r"^[0-9a-f]{40}$")
#: Written last into a snapshot directory: its presence means the download completed.
COMPLETE_MARKER = ".nimflow-download.json"


def snapshot_path(cache_dir: Path, repo_id: str, sha: str) -> Path:
    """Where a repo snapshot lives inside the NIM cache mount."""
    return cache_dir / "models" / repo_id.replace("/", "--") / sha


def resolve_revision(repo_id: str, revision: str) -> str:
    """The commit sha a branch, tag or sha names on the hub.

    Raises:
        CheckpointNotFound: the repo or revision does not exist, or the token cannot see it.
        ServiceUnavailable: the hub did not answer (retried by the task).
    """
    settings = get_settings()
    api = HfApi(endpoint=settings.hf_endpoint, token=settings.hf_token_value())
    with translated_errors(f"resolving {repo_id}@{revision} on {settings.hf_endpoint or 'huggingface.co'}"):
        return str(api.model_info(repo_id, revision=revision).sha)


def completed_snapshot(target: Path, allow_patterns: list[str] | None) -> bool:
    """True when ``target`` holds a complete download of these patterns (its marker was written last)."""
    try:
        marker = json.loads((target / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("allow_patterns") == allow_patterns


def fetch_snapshot(repo_id: str, revision: str, allow_patterns: list[str] | None, cache_dir: Path) -> Checkpoint:
    """Download ``repo_id`` at ``revision`` into the cache; a complete snapshot is not fetched again.

    A revision given as a full sha whose snapshot is complete needs no network at all.

    Raises:
        CheckpointNotFound: unknown repo, revision or file; gated or private without a token.
        ServiceUnavailable: the hub answered 5xx/429 or the connection failed.
    """
    sha = revision if _SHA.match(revision) else resolve_revision(repo_id, revision)
    target = snapshot_path(cache_dir, repo_id, sha)
    if completed_snapshot(target, allow_patterns):
        return Checkpoint(path=str(target), identity=f"hf:{repo_id}@{sha}", repo_id=repo_id, revision=revision, revision_sha=sha)

    before = {p: p.stat().st_mtime_ns for p in model_files(target)} if target.exists() else {}
    settings = get_settings()
    with translated_errors(f"downloading {repo_id}@{sha}"):
        snapshot_download(
            repo_id,
            revision=sha,
            local_dir=target,
            allow_patterns=allow_patterns,
            endpoint=settings.hf_endpoint,
            token=settings.hf_token_value(),
        )
    files = model_files(target)
    if not (target / "config.json").exists():
        raise InvalidWeights(f"{repo_id}@{sha}: no config.json was downloaded; check source.allow_patterns")
    changed = [p for p in files if before.get(p) != p.stat().st_mtime_ns]
    (target / COMPLETE_MARKER).write_text(
        json.dumps({"repo_id": repo_id, "sha": sha, "allow_patterns": allow_patterns, "files": len(files)})
    )
    return Checkpoint(
        path=str(target),
        identity=f"hf:{repo_id}@{sha}",
        repo_id=repo_id,
        revision=revision,
        revision_sha=sha,
        downloaded_files=len(changed),
        downloaded_bytes=sum(p.stat().st_size for p in changed),
    )


def local_checkpoint(directory: Path) -> Checkpoint:
    """A local checkpoint directory, identified by the digest of its contents.

    Raises:
        InvalidWeights: the directory does not exist or has no config.json.
    """
    if not (directory / "config.json").is_file():
        raise InvalidWeights(f"{directory}: source.local_dir must be a checkpoint directory with config.json")
    return Checkpoint(path=str(directory), identity=f"sha256:{directory_digest(directory)}")


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
