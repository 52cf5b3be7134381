"""Hugging Face Hub snapshots in the NIM cache mount, pinned to a commit sha.

A snapshot lives at ``<cache>/models/<org>--<name>/<sha>``; its marker file is written last, so a
directory with the marker holds a complete download and is never fetched again. The base checkpoint
(stage 1) and ``hf://`` fine-tunes and adapters share this one mechanism.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import filter_repo_objects

from nimflow.checkpoint import model_files, open_to_readers, read_config
from nimflow.containment import safe_relative
from nimflow.errors import InvalidWeights, translated_errors
from nimflow.progress import transfer_progress
from nimflow.records import Checkpoint, TransferStats
from nimflow.redaction import redact_url
from nimflow.settings import get_settings

SHA = re.compile(r"^[0-9a-f]{40}$")
#: Written last into a snapshot directory: its presence means the download completed.
COMPLETE_MARKER = ".nimflow-download.json"


def snapshot_path(cache_dir: Path, repo_id: str, sha: str, allow_patterns: list[str] | None = None) -> Path:
    """Where a repo snapshot lives inside the NIM cache mount.

    A snapshot limited by ``allow_patterns`` has its own directory (named by a digest of the
    patterns): one directory never holds files another spec's patterns excluded, which would end
    up next to an engine whose key says they are not there.
    """
    base = cache_dir / "models" / repo_id.replace("/", "--") / sha
    if allow_patterns is None:
        return base
    digest = hashlib.sha256(json.dumps(sorted(set(allow_patterns))).encode()).hexdigest()[:12]
    return base.with_name(f"{sha}-files-{digest}")


def resolve_revision(repo_id: str, revision: str) -> str:
    """The commit sha a branch, tag or sha names on the hub.

    Raises:
        CheckpointNotFound: the repo or revision does not exist, or the token cannot see it.
        ServiceUnavailable: the hub did not answer (retried by the task).
    """
    settings = get_settings()
    api = HfApi(endpoint=settings.hf_endpoint, token=settings.hf_token_value())
    with translated_errors(f"resolving {repo_id}@{revision} on {redact_url(settings.hf_endpoint, 'huggingface.co')}"):
        return str(api.model_info(repo_id, revision=revision).sha)


def pinned_sha(repo_id: str, revision: str) -> str:
    """``revision`` itself when it is a full commit sha (no network), else what the hub resolves it to.

    Raises:
        CheckpointNotFound: the repo or revision does not exist, or the token cannot see it.
        ServiceUnavailable: the hub did not answer.
    """
    return revision if SHA.match(revision) else resolve_revision(repo_id, revision)


def completed_snapshot(target: Path, allow_patterns: list[str] | None) -> bool:
    """True when ``target`` holds a complete download of these patterns (its marker was written last)."""
    try:
        marker = json.loads((target / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("allow_patterns") == allow_patterns


def fetch_snapshot(
    repo_id: str,
    revision: str,
    allow_patterns: list[str] | None,
    cache_dir: Path,
    *,
    required_file: str | None = "config.json",
) -> Checkpoint:
    """Download ``repo_id`` at ``revision`` into the cache; a complete snapshot is not fetched again.

    A revision given as a full sha whose snapshot is complete needs no network at all.

    Args:
        required_file: a file the snapshot must contain (None: no requirement); a base checkpoint
            needs config.json, an adapter adapter_config.json.

    Raises:
        CheckpointNotFound: unknown repo, revision or file; gated or private without a token.
        ServiceUnavailable: the hub answered 5xx/429 or the connection failed.
        InvalidWeights: ``required_file`` was not downloaded.
    """
    sha = pinned_sha(repo_id, revision)
    target = snapshot_path(cache_dir, repo_id, sha, allow_patterns)
    if completed_snapshot(target, allow_patterns):
        open_to_readers(target)  # a snapshot of an older nimflow may hold huggingface_hub's 0600 metadata
        return Checkpoint(path=str(target), identity=f"hf:{repo_id}@{sha}", repo_id=repo_id, revision=revision, revision_sha=sha)

    before = {p: p.stat().st_mtime_ns for p in model_files(target)} if target.exists() else {}
    settings = get_settings()
    with translated_errors(f"downloading {repo_id}@{sha}"):
        planned = planned_files(repo_id, sha, allow_patterns)
        with transfer_progress("download", f"{repo_id}@{sha[:12]}", sum(planned.values()), len(planned),
                               sampler=lambda: bytes_on_disk(target, planned)) as progress:
            snapshot_download(
                repo_id,
                revision=sha,
                local_dir=target,
                allow_patterns=allow_patterns,
                endpoint=settings.hf_endpoint,
                token=settings.hf_token_value(),
            )
    open_to_readers(target)
    files = model_files(target)
    if required_file is not None and not (target / required_file).exists():
        hint = "check source.allow_patterns" if allow_patterns else f"the repo has no {required_file} at its top level"
        raise InvalidWeights(f"{repo_id}@{sha}: no {required_file} was downloaded; {hint}")
    changed = [p for p in files if before.get(p) != p.stat().st_mtime_ns]
    moved = sum(p.stat().st_size for p in changed)
    # The marker is written last, through a temporary name: it is what "complete" means.
    marker = target / f"{COMPLETE_MARKER}.tmp"
    marker.write_text(json.dumps({"repo_id": repo_id, "sha": sha, "allow_patterns": allow_patterns, "files": len(files)}))
    marker.replace(target / COMPLETE_MARKER)
    return Checkpoint(
        path=str(target),
        identity=f"hf:{repo_id}@{sha}",
        repo_id=repo_id,
        revision=revision,
        revision_sha=sha,
        downloaded_files=len(changed),
        downloaded_bytes=moved,
        transfer=TransferStats(stage="download", bytes=moved, files=len(changed), seconds=progress.finish().seconds),
    )


def hub_model_config(repo_id: str, sha: str) -> dict:
    """The ``config.json`` of ``repo_id`` at ``sha``, read from the hub without downloading the weights.

    ``nimflow plan`` uses it to check the build against the model before anything is downloaded.

    Raises:
        CheckpointNotFound: the repo, revision or config.json does not exist, or the token cannot see it.
        InvalidWeights: config.json is not a JSON object.
        ServiceUnavailable: the hub did not answer.
    """
    settings = get_settings()
    with tempfile.TemporaryDirectory(prefix="nimflow-config-") as scratch:
        with translated_errors(f"reading config.json of {repo_id}@{sha} on {redact_url(settings.hf_endpoint, 'huggingface.co')}"):
            hf_hub_download(repo_id, "config.json", revision=sha, endpoint=settings.hf_endpoint,
                            token=settings.hf_token_value(), local_dir=scratch)
        return read_config(Path(scratch))


def planned_files(repo_id: str, sha: str, allow_patterns: list[str] | None) -> dict[str, int]:
    """Path and size of each file a snapshot download of these patterns fetches (for its progress total).

    The names come from the hub's tree listing and become paths under the snapshot (the progress
    sampler looks at them), so each passes the containment rule first. huggingface_hub refuses
    such names itself before it writes (``_validate_relative_filename``); this refuses them before
    the download starts, naming the repo.

    Raises:
        InvalidWeights: a file name that is absolute, has ``..`` or is otherwise unsafe.
    """
    settings = get_settings()
    api = HfApi(endpoint=settings.hf_endpoint, token=settings.hf_token_value())
    entries = [e for e in api.list_repo_tree(repo_id, revision=sha, recursive=True) if isinstance(e, RepoFile)]
    for entry in entries:
        safe_relative(entry.path, source=f"{repo_id}@{sha} (the hub's file list)")
    kept = set(filter_repo_objects([e.path for e in entries], allow_patterns=allow_patterns))
    return {e.path: e.size for e in entries if e.path in kept}


def bytes_on_disk(target: Path, planned: dict[str, int]) -> tuple[int, int]:
    """(bytes, files) of a snapshot download so far: finished files plus huggingface_hub's partial ones.

    huggingface_hub writes each file to ``.cache/huggingface/download/…incomplete`` under the local
    dir and renames it when complete, so a scan of a few files measures progress without hooking
    into the library.
    """
    done = [path for path, size in planned.items() if (target / path).is_file() and (target / path).stat().st_size == size]
    partial = sum(p.stat().st_size for p in (target / ".cache" / "huggingface").rglob("*.incomplete") if p.is_file())
    return sum(planned[path] for path in done) + partial, len(done)
