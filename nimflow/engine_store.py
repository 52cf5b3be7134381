"""Engines on disk and in the shared engine store (S3), addressed by engine key.

Layout in the store::

    s3://bucket/prefix/<engine_key>/uploads/<upload_id>/<path>   the files of one upload, never shared
    s3://bucket/prefix/<engine_key>/manifest.json                written LAST, once: names the upload
    s3://bucket/prefix/<engine_key>/lease.json                   while one host builds or uploads the key (build_lease)
    s3://bucket/prefix/<engine_key>/in-use/<host>--<name>.json   a host serves it (engine_use; TTL'd)

Engine builds are not byte-reproducible, so two hosts that build the same key upload different
bytes. Each upload therefore has its own prefix (the upload id is a digest of its files, so a
retried upload resumes file by file), and the manifest, created with ``IfNoneMatch="*"``, names
the one upload that won. A restore reads only that upload's files and re-hashes every byte; the
loser of a race removes its own upload, and ``gc`` removes uploads a crash left behind. An engine
exists in the store only when its manifest does. ``gc`` works on a key only under its build lease,
deletes a manifest only with ``IfMatch`` on the version it planned with, and then only the objects
of the upload that manifest named (never the ``<key>/`` prefix wholesale), so a manifest never
names files that are gone.

Locally, engines are built or restored into a temporary directory and renamed into
``<cache_dir>/engines/<engine_key>`` once their manifest is written. Every file, directory and the
manifest are fsynced before that rename, and the parent after it, so a crash leaves either no
directory or a complete one. A local engine is checked before it is used
(:mod:`nimflow.engine_check`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path, PurePosixPath
from typing import Any

from botocore.exceptions import ClientError

from nimflow.checkpoint import model_files, sha256_file
from nimflow.containment import contained_path, safe_relative
from nimflow.errors import EngineStoreError, ManifestRefused, StoredEngineBroken, is_transient
from nimflow.s3 import is_missing, list_keys, s3_client, transfer_config
from nimflow.spec import CacheSpec

#: Read size of a streamed GET (and of hashing as it arrives).
STREAM_CHUNK = 1 << 20
#: Attempts at a streamed GET whose body is cut short (botocore's own retry budget is 3 too).
STREAM_ATTEMPTS = 3
MIB = 1 << 20

#: Called with each number of bytes moved (from worker threads), and with each finished file's path.
BytesCallback = Callable[[int], None]
FileCallback = Callable[[str], None]

MANIFEST_NAME = "nimflow-manifest.json"
MANIFEST_SCHEMA = "nimflow-engine-manifest/2"
STORE_MANIFEST = "manifest.json"
UPLOADS = "uploads"
#: Scratch directories (restores and builds in progress) start with this, under the engines dir.
SCRATCH_PREFIX = ".tmp-"
#: Where a manifest whose files are missing or corrupt is kept once it is unpublished (for a person to look at).
SET_ASIDE = "set-aside"

#: Most files one engine's manifest may list: an engine is a few files per rank plus the model's side
#: files (8 ranks: under 50); far more is not an engine, and each file costs requests and a thread slot.
MAX_ENGINE_FILES = 10_000
#: Most bytes one engine's manifest may declare: 2 TiB (a 405B-parameter engine in fp16 is about 0.8 TiB).
MAX_ENGINE_BYTES = 2 << 40
#: Longest manifest.json read from the store (10,000 entries take about 2 MiB).
MAX_MANIFEST_BYTES = 16 * MIB
#: Attempts at the manifest write while the store answers 409 ConditionalRequestConflict, and the first
#: pause between them (doubling, jittered): a conflicting write settles in well under a second.
MANIFEST_ATTEMPTS = 4
MANIFEST_RETRY_SECONDS = 0.2
_SHA256 = re.compile(r"[0-9a-f]{64}")
_UPLOAD_ID = re.compile(r"[0-9a-f]{1,64}")
_ENGINE_KEY = re.compile(r"[0-9a-f]{64}")
#: Open lock files of this process's scratch directories (see :func:`scratch_dir`).
_scratch_locks: dict[Path, int] = {}
_scratch_guard = threading.Lock()


# --- local engine directories -------------------------------------------------------------------


def engines_dir(cache_dir: Path) -> Path:
    """Where engines live on a host, inside the NIM cache mount."""
    return cache_dir / "engines"


def local_engine_path(cache_dir: Path, key: str) -> Path:
    """The published location of an engine on this host."""
    return engines_dir(cache_dir) / key


def scratch_dir(cache_dir: Path, purpose: str) -> Path:
    """A fresh private (0700) temporary directory under the engines dir (same filesystem, so rename is atomic).

    The directory itself is ``flock``-ed by this process for as long as it exists under its name
    (nothing is added inside it: it becomes the engine directory): the kernel drops the lock when
    the process dies, so ``nimflow cache gc`` (:func:`remove_stale_scratch`) can tell a killed
    run's leftovers from work in progress. A filesystem without ``flock`` leaves it unlocked: gc's
    age bound alone protects it then.
    """
    root = engines_dir(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{purpose}-", dir=root))
    lock = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
    except OSError:
        os.close(lock)
        return path
    with _scratch_guard:
        # Callers remove (or rename into place) their scratch dirs when done; those locks are closed here.
        for held, descriptor in list(_scratch_locks.items()):
            if not held.exists():
                os.close(descriptor)
                del _scratch_locks[held]
        _scratch_locks[path] = lock
    return path


@dataclass(frozen=True)
class StaleScratch:
    """A scratch directory ``remove_stale_scratch`` looked at, and what it did (or, not removing, would do)."""

    path: Path
    removed: bool
    reason: str


def remove_stale_scratch(cache_dir: Path, older_than: float, *, remove: bool = True) -> list[StaleScratch]:
    """Remove the scratch directories of killed runs under ``cache_dir``'s engines dir.

    A directory goes only when nobody holds its ``flock`` (its process is gone, see
    :func:`scratch_dir`) and it was last changed more than ``older_than`` seconds ago (this host's
    clock: these are local files). gc holds the lock while it removes it, so no run can be using it.

    Args:
        remove: False only decides (a dry run): ``removed`` then says what would go.
    """
    root = engines_dir(cache_dir)
    results = []
    for path in sorted(root.glob(f"{SCRATCH_PREFIX}*")) if root.is_dir() else []:
        try:
            lock = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # not a directory (or gone since the listing)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                results.append(StaleScratch(path, False, "in use by a running process"))
                continue
            age = time.time() - os.fstat(lock).st_mtime
            if age <= older_than:
                results.append(StaleScratch(path, False, f"last changed {age:.0f}s ago, within the bound"))
                continue
            if remove:
                shutil.rmtree(path, ignore_errors=True)
            results.append(StaleScratch(path, True, f"left by a run that ended, untouched for {age:.0f}s"))
        finally:
            os.close(lock)
    return results


def upload_id_of(files: list[dict[str, Any]]) -> str:
    """The upload id of an engine: a digest of its files' names and contents.

    The same local engine always gets the same id (a retried upload resumes file by file); two
    builds of one key get different ids because their bytes differ.
    """
    digest = hashlib.sha256()
    for entry in sorted(files, key=lambda f: f["path"]):
        digest.update(f"{entry['path']}\0{entry['sha256']}\n".encode())
    return digest.hexdigest()[:24]


def write_manifest(engine_dir: Path, key: str, key_inputs: dict[str, Any], engine: dict[str, Any]) -> dict[str, Any]:
    """Hash every file of ``engine_dir``, make it durable (fsync) and write its manifest; return the manifest.

    The files and directories are fsynced before the manifest is written (itself durably), so a
    manifest on disk never names bytes that a crash could still lose.

    Args:
        key_inputs: what the key was computed from (weights, build config, image, GPU, TensorRT-LLM).
        engine: what was actually built, read from the engine's own config.

    Raises:
        EngineStoreError: the directory holds no ``trtllm_engine/*.engine`` file.
    """
    paths = model_files(engine_dir)
    # Files are hashed in parallel: hashlib releases the GIL on large updates, so ranks hash on all cores.
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(paths), os.cpu_count() or 1))) as pool:
        digests = list(pool.map(sha256_file, paths))
    files: list[dict[str, Any]] = [
        {"path": p.relative_to(engine_dir).as_posix(), "size": p.stat().st_size, "sha256": digest}
        for p, digest in zip(paths, digests, strict=True)
    ]
    if not any(f["path"].startswith("trtllm_engine/") and f["path"].endswith(".engine") for f in files):
        raise EngineStoreError(f"{engine_dir}: no trtllm_engine/rank*.engine file; refusing to record an empty engine")
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "engine_key": key,
        "key_inputs": key_inputs,
        "engine": engine,
        "upload_id": upload_id_of(files),
        "built_by": socket.gethostname(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
    }
    fsync_tree(engine_dir)
    write_json_atomic(engine_dir / MANIFEST_NAME, manifest)
    return manifest


def read_local_manifest(engine_dir: Path) -> dict[str, Any] | None:
    """The manifest of a published local engine, or None when it is absent or unreadable."""
    try:
        return json.loads((engine_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def publish_local(staged: Path, final: Path) -> bool:
    """Move a complete staged engine into place (durably); False when another run got there first and theirs is kept.

    ``staged`` must be durable already (:func:`write_manifest`, :meth:`EngineStore.restore`). A
    directory at ``final`` without a readable manifest is not this function's to remove: the
    caller sets it aside first (:func:`nimflow.engine_check.set_aside`).

    Raises:
        OSError: the rename failed and ``final`` holds no readable manifest.
    """
    staged.chmod(0o755)  # scratch directories are private; the NIM container may run as another user
    try:
        os.rename(staged, final)
    except OSError:
        if read_local_manifest(final) is None:
            raise
        shutil.rmtree(staged, ignore_errors=True)
        return False
    fsync_dir(final.parent)  # the rename itself survives a crash
    return True


def fsync_file(path: Path) -> None:
    """Flush a file's bytes to the disk (a crash after this cannot lose them)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (names created, renamed or removed in it) to the disk."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(root: Path, *, files: bool = True) -> None:
    """fsync every regular file (unless ``files`` is False) and every directory under ``root``, deepest first.

    Links are not followed: an engine directory holds regular files and directories only.
    """
    for directory, _, names in os.walk(root, topdown=False):
        if files:
            for name in names:
                path = Path(directory, name)
                if path.is_file() and not path.is_symlink():
                    fsync_file(path)
        fsync_dir(Path(directory))


def check_manifest(manifest: object, engine_key: str, *, source: str, remedy: str | None = None) -> dict[str, Any]:
    """An engine-store manifest, once every field a restore or a record reads is shown to be sound.

    The store is written by other hosts: a manifest is checked before any of it is used. Its
    schema and ``engine_key`` must be the ones asked for, its ``upload_id`` hex, every file entry a
    safe relative path (:func:`nimflow.containment.safe_relative`), a non-negative int size and a
    sha256, no name twice, no more than :data:`MAX_ENGINE_FILES` files and :data:`MAX_ENGINE_BYTES`
    bytes, and at least one ``trtllm_engine/*.engine``.

    Args:
        source: the manifest's URI, named in every refusal.
        remedy: what the reader of a refusal can do; by default, for a store manifest, to delete it
            (it is never deleted automatically: it may be a newer nimflow's). ``""`` for none.

    Returns:
        The manifest itself.

    Raises:
        EngineStoreError (permanent): the first problem, naming ``source`` and the offending entry.
    """
    if remedy is None:
        remedy = (f"the store holds a corrupt or foreign manifest for this key: "
                  f"delete {source.removesuffix('/' + STORE_MANIFEST)}/ from the store to have the engine rebuilt")

    def refuse(problem: str) -> EngineStoreError:
        return ManifestRefused(f"{source}: refused the manifest: {problem}{f'; {remedy}' if remedy else ''}")

    if not isinstance(manifest, dict):
        raise refuse(f"expected a JSON object, found {type(manifest).__name__}")
    if manifest.get("schema") != MANIFEST_SCHEMA:
        raise refuse(f"schema is {_shown(manifest.get('schema'))}, expected {MANIFEST_SCHEMA!r}")
    if manifest.get("engine_key") != engine_key:
        raise refuse(f"engine_key is {_shown(manifest.get('engine_key'))}, not the key asked for ({engine_key})")
    upload_id = manifest.get("upload_id")
    if not isinstance(upload_id, str) or not _UPLOAD_ID.fullmatch(upload_id):
        raise refuse(f"upload_id is {_shown(upload_id)}, expected up to 64 hex digits")
    _check_fields(manifest, refuse)
    files = manifest.get("files")
    if not isinstance(files, list):
        raise refuse(f"files is {type(files).__name__}, expected a list")
    if len(files) > MAX_ENGINE_FILES:
        raise refuse(f"it lists {len(files)} files, more than {MAX_ENGINE_FILES} files (the bound for one engine)")
    names: set[str] = set()
    total = 0
    for index, entry in enumerate(files):
        name = _checked_entry(entry, index, source, refuse)
        if name in names:
            raise refuse(f"files[{index}] names {name!r} twice")
        names.add(name)
        total += entry["size"]
    if total > MAX_ENGINE_BYTES:
        raise refuse(f"its files declare {total} bytes, more than {MAX_ENGINE_BYTES} bytes (the bound for one engine)")
    clash = next((n for n in names for parent in PurePosixPath(n).parents if str(parent) in names), None)
    if clash is not None:
        raise refuse(f"{clash!r} lies under another entry that is a file")
    if not any(n.startswith("trtllm_engine/") and n.endswith(".engine") for n in names):
        raise refuse("no trtllm_engine/*.engine file")
    return manifest


def _shown(value: object) -> str:
    """A value from a manifest as a refusal shows it: its repr, cut short (a hostile value may be huge)."""
    text = repr(value)
    return text if len(text) <= 100 else f"{text[:100]}..."


def _check_fields(manifest: dict[str, Any], refuse: Callable[[str], EngineStoreError]) -> None:
    """The manifest's descriptive fields have the types their readers (records, `cache ls`, the serving check) expect."""
    for field in ("key_inputs", "engine"):
        if not isinstance(manifest.get(field), dict):
            raise refuse(f"{field} is {type(manifest.get(field)).__name__}, expected an object")
    inputs = manifest["key_inputs"]
    for field, kinds in (("gpu", (dict, type(None))), ("build", (dict, type(None))), ("trtllm_version", (str, type(None)))):
        if not isinstance(inputs.get(field), kinds):
            raise refuse(f"key_inputs.{field} is {_shown(inputs.get(field))}, expected {' or '.join(k.__name__ for k in kinds)}")
    for field in ("built_by", "created_at"):
        if not isinstance(manifest.get(field, ""), str):
            raise refuse(f"{field} is {_shown(manifest.get(field))}, expected a string")


def _checked_entry(entry: object, index: int, source: str, refuse: Callable[[str], EngineStoreError]) -> str:
    """``files[index]`` checked (path by the containment rule, size, sha256); its normalised name."""
    if not isinstance(entry, dict):
        raise refuse(f"files[{index}] is {_shown(entry)}, expected an object with path, size and sha256")
    name = safe_relative(entry.get("path"), source=f"{source}: files[{index}]", error=ManifestRefused)
    if name == MANIFEST_NAME:
        raise refuse(f"files[{index}] is named {name!r}, the local manifest's own name")
    size, digest = entry.get("size"), entry.get("sha256")
    if type(size) is not int or size < 0:
        raise refuse(f"files[{index}] ({name}) has size {_shown(size)}, expected a non-negative integer")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise refuse(f"files[{index}] ({name}) has sha256 {_shown(digest)}, expected 64 hex digits")
    return name


def _condition_not_met(exc: ClientError) -> bool:
    """Whether S3 did not apply a conditional request: its condition failed (412), or a concurrent
    conditional request on the key won (409 ConditionalRequestConflict); either way, read again."""
    error, meta = exc.response.get("Error", {}), exc.response.get("ResponseMetadata", {})
    return error.get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409") or meta.get(
        "HTTPStatusCode") in (409, 412)


def _for_each_file(entries: list[dict[str, Any]], action: Callable[[dict[str, Any]], None], workers: int) -> None:
    """Run ``action`` on manifest entries, up to ``workers`` files at a time (a multipart file's parts run in parallel too)."""
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(entries)))) as pool:
        list(pool.map(action, entries))


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` so that readers (and a crash) see the old file or the new one, whole.

    A temporary file of its own (two writers never share one) is written, fsynced and renamed over
    ``path``, and the directory is fsynced. The file is readable by all (0644): NIM may run as
    another user.
    """
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(json.dumps(data, indent=2, sort_keys=True))
            handle.flush()
            os.fchmod(handle.fileno(), 0o644)
            os.fsync(handle.fileno())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


# --- the shared store ---------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadOutcome:
    """What an upload did: files and bytes sent, and whether its manifest became the published one."""

    files: int
    bytes: int
    published: bool
    upload_id: str


@dataclass(frozen=True)
class StoredManifest:
    """A published manifest as the store holds it: checked content, its ETag and the store's LastModified."""

    manifest: dict[str, Any]
    etag: str
    last_modified: datetime


@dataclass(frozen=True)
class AbandonedUpload:
    """An upload no manifest names (a lost race or a crash), with its size, last write and the objects listed."""

    engine_key: str
    upload_id: str
    objects: int
    bytes: int
    last_modified: datetime
    object_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class RefusedManifest:
    """A key whose manifest could not be used (corrupt, hostile, too long): listed, never deleted automatically."""

    engine_key: str
    reason: str


@dataclass(frozen=True)
class StoreListing:
    """The published engines of a store (newest LastModified first), the keys whose manifest was refused, and when.

    ``now`` is the store's clock when it was listed: ages are LastModified against it, so no host's
    clock (the builder's ``created_at``, the one running gc) decides how old an engine is.
    """

    engines: list[StoredManifest]
    refused: list[RefusedManifest]
    now: datetime


@dataclass(frozen=True)
class IncompleteUpload:
    """A multipart upload that was started and never completed or aborted (a killed transfer, or one in progress)."""

    object_key: str
    upload_id: str
    engine_key: str | None
    initiated: datetime
    age_seconds: float


class EngineStore:
    """The engine store of one :class:`~nimflow.spec.CacheSpec` (an S3 prefix)."""

    def __init__(self, cache: CacheSpec) -> None:
        self.cache = cache
        self.bucket = cache.bucket
        self.prefix = cache.prefix
        # Files in parallel, each possibly in parallel parts: enough pooled connections for both.
        self.client = s3_client(
            endpoint_url=cache.endpoint_url, region=cache.region, max_pool=max(32, cache.max_concurrency * 4)
        )
        self._transfer = transfer_config(chunk_mib=cache.multipart_chunk_mib, max_concurrency=cache.max_concurrency)
        # Files up to this size move in ONE request each (a PUT; a GET hashed as it arrives), files in
        # parallel: the fastest setting measured (docs/performance.md), well ahead of 64 MiB parts.
        # Larger files go multipart: a failed single request would resend too much, and S3 caps a
        # single PUT at 5 GiB; botocore retries each part on its own.
        self._single_request_max = cache.single_request_max_mib * MIB

    def object_key(self, engine_key: str, *parts: str) -> str:
        """The S3 object key of an engine's object (or of its prefix)."""
        return "/".join(p for p in (self.prefix, engine_key, *parts) if p)

    def uri(self, engine_key: str, *parts: str) -> str:
        """s3:// URI of an engine (or of one of its objects)."""
        return f"s3://{self.bucket}/{self.object_key(engine_key, *parts)}"

    def manifest(self, engine_key: str) -> dict[str, Any] | None:
        """The engine's manifest, checked (:func:`check_manifest`), or None when the store does not hold it.

        Raises:
            EngineStoreError: the manifest is longer than :data:`MAX_MANIFEST_BYTES`, not JSON, or
                fails :func:`check_manifest` (permanent: a corrupt or hostile manifest).
        """
        stored = self.stored_manifest(engine_key)
        return None if stored is None else stored.manifest

    def stored_manifest(self, engine_key: str) -> StoredManifest | None:
        """The engine's manifest with the version the store holds (ETag, LastModified), or None.

        The ETag lets a writer act on exactly the version it read (``IfMatch``): gc deletes, and a
        broken manifest is set aside, only if nobody replaced it in between. LastModified is the
        store's own clock, not the builder's.

        Raises:
            EngineStoreError: as :meth:`manifest`.
        """
        key = self.object_key(engine_key, STORE_MANIFEST)
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if is_missing(self.client, self.bucket, key, exc):  # a 403 (no s3:ListBucket) raises, naming it
                return None
            raise
        body = answer["Body"]
        source = self.uri(engine_key, STORE_MANIFEST)
        try:
            data = body.read(MAX_MANIFEST_BYTES + 1)
        finally:
            body.close()
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestRefused(
                f"{source}: refused the manifest: longer than {MAX_MANIFEST_BYTES} bytes; "
                f"delete {self.uri(engine_key)}/ from the store to have the engine rebuilt"
            )
        try:
            manifest = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise ManifestRefused(f"{source}: refused the manifest: not valid JSON ({type(exc).__name__}); "
                                   f"delete {self.uri(engine_key)}/ from the store to have the engine rebuilt") from None
        return StoredManifest(
            manifest=check_manifest(manifest, engine_key, source=source),
            etag=str(answer["ETag"]),
            last_modified=answer["LastModified"].astimezone(timezone.utc),
        )

    def upload(self, engine_dir: Path, manifest: dict[str, Any], *, on_bytes: BytesCallback | None = None,
               on_file_done: FileCallback | None = None,
               before_publish: Callable[[], None] | None = None) -> UploadOutcome:
        """Upload an engine under its own upload prefix, then try to publish its manifest.

        Files already uploaded under this upload id with the same sha256 (an interrupted earlier
        attempt) are not sent again. If another host published the key first, this upload is
        removed again and the store keeps the winner's engine, whole.

        Args:
            on_bytes: called (from worker threads) with each number of bytes sent, for progress.
            on_file_done: called with the path of each file once it is stored.
            before_publish: called immediately before each attempt at the manifest write; raises to
                stop the upload unpublished (the build lease's ``LeaseHandle.confirm``).

        Raises:
            BuildLeaseLost: from ``before_publish``; no manifest was written.
            ClientError / BotoCoreError: the store refused or did not answer, the manifest write's
                409 ConditionalRequestConflict included once :data:`MANIFEST_ATTEMPTS` are spent
                (transient: a retried upload skips the stored files and writes the manifest).
        """
        key, upload_id = manifest["engine_key"], manifest["upload_id"]
        sent_files: list[dict[str, Any]] = []

        def put(entry: dict[str, Any]) -> None:
            # Checked in the worker, so the lookups of many files overlap too.
            if self._has_file(key, upload_id, entry):
                if on_bytes is not None:
                    on_bytes(entry["size"])  # already there: counts as moved for progress
            else:
                self._put_file(key, upload_id, engine_dir, entry, on_bytes)
                sent_files.append(entry)  # list.append is atomic under the GIL
            if on_file_done is not None:
                on_file_done(entry["path"])

        _for_each_file(manifest["files"], put, self.cache.max_concurrency)
        sent = (len(sent_files), sum(f["size"] for f in sent_files))
        if not self._create_manifest(key, json.dumps(manifest, indent=2, sort_keys=True).encode(), before_publish):
            winner = self.manifest(key) or {}
            if winner.get("upload_id") != upload_id:
                self.delete_upload(key, upload_id)
            # The same upload id: our own write, whose answer was lost and which botocore sent again.
            return UploadOutcome(*sent, published=winner.get("upload_id") == upload_id, upload_id=upload_id)
        return UploadOutcome(*sent, published=True, upload_id=upload_id)

    def _create_manifest(self, key: str, body: bytes, before_publish: Callable[[], None] | None) -> bool:
        """Create the key's manifest unless one exists; True when this call created it.

        A 409 ConditionalRequestConflict (AWS: another conditional write of the key is in progress;
        retry) is retried after a short jittered pause, up to :data:`MANIFEST_ATTEMPTS` attempts.
        """
        for attempt in range(1, MANIFEST_ATTEMPTS + 1):
            if before_publish is not None:
                before_publish()
            try:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=self.object_key(key, STORE_MANIFEST),
                    Body=body,
                    ContentType="application/json",
                    IfNoneMatch="*",  # the first publisher wins; nobody overwrites a published engine
                )
                return True
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code == "PreconditionFailed":
                    return False
                if code != "ConditionalRequestConflict" or attempt == MANIFEST_ATTEMPTS:
                    raise
            time.sleep(MANIFEST_RETRY_SECONDS * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
        raise AssertionError("unreachable")

    def _file_key(self, key: str, upload_id: str, path: str) -> str:
        return self.object_key(key, UPLOADS, upload_id, path)

    def _has_file(self, key: str, upload_id: str, entry: dict[str, Any]) -> bool:
        file_key = self._file_key(key, upload_id, entry["path"])
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=file_key)
        except ClientError as exc:
            if is_missing(self.client, self.bucket, file_key, exc):
                return False
            raise
        return head.get("Metadata", {}).get("sha256") == entry["sha256"] and head["ContentLength"] == entry["size"]

    def _put_file(self, key: str, upload_id: str, engine_dir: Path, entry: dict[str, Any],
                  on_bytes: BytesCallback | None) -> None:
        source, target = engine_dir / entry["path"], self._file_key(key, upload_id, entry["path"])
        # The sha256 travels as metadata: a retried upload skips files already stored with it.
        metadata = {"sha256": entry["sha256"]}
        if entry["size"] > self._single_request_max:
            self.client.upload_file(str(source), self.bucket, target, ExtraArgs={"Metadata": metadata},
                                    Config=self._transfer, Callback=on_bytes)
            return
        with source.open("rb") as body:  # streamed from disk by botocore, never read whole
            self.client.put_object(Bucket=self.bucket, Key=target, Body=body, Metadata=metadata)
        if on_bytes is not None:
            on_bytes(entry["size"])

    def restore(self, manifest: dict[str, Any], dest: Path, *, engine_key: str, on_bytes: BytesCallback | None = None,
                on_file_done: FileCallback | None = None) -> tuple[int, int]:
        """Download the manifest's upload into ``dest`` and verify every file's sha256.

        Nothing in the manifest is trusted: it is checked (:func:`check_manifest`, against
        ``engine_key``) and every file's path is placed inside ``dest`` before a byte is fetched;
        an object is read no further than its declared size. ``dest`` is a staging directory:
        callers publish it only once this returns (``engine_cache`` renames it into place), and
        remove it when this raises. The local manifest is written last.

        Files up to ``cache.single_request_max_mib`` are hashed as they arrive (one pass, no
        re-read); larger ones are downloaded in parallel ranges and hashed after.

        Args:
            engine_key: the key asked for; the manifest must be that key's.
            on_bytes: called (from worker threads) with each number of bytes received, for progress.
            on_file_done: called with the path of each file once it is verified.

        Raises:
            StoredEngineBroken: an object the manifest names is missing, or its content does not
                match the manifest (permanent for this manifest: callers set it aside and rebuild).
            EngineStoreError: the manifest is refused, naming the entry (permanent), or the store
                refused or did not answer (a 403 names the permission; EngineStoreUnavailable is transient).
        """
        source = self.uri(engine_key, STORE_MANIFEST)
        manifest = check_manifest(manifest, engine_key, source=source)
        upload_id = manifest["upload_id"]
        targets = {
            entry["path"]: contained_path(dest, entry["path"], source=f"{source}: {entry['path']!r}", error=EngineStoreError)
            for entry in manifest["files"]
        }

        def fetch(entry: dict[str, Any]) -> None:
            target = targets[entry["path"]]
            target.parent.mkdir(parents=True, exist_ok=True)
            object_key = self._file_key(engine_key, upload_id, entry["path"])
            try:
                if entry["size"] > self._single_request_max:
                    stored = self.client.head_object(Bucket=self.bucket, Key=object_key)["ContentLength"]
                    if stored != entry["size"]:  # checked before a multipart download sizes itself by it
                        raise self._corrupt(engine_key, object_key, f"{stored} bytes, the manifest declares {entry['size']}")
                    self.client.download_file(self.bucket, object_key, str(target), Config=self._transfer, Callback=on_bytes)
                    digest = sha256_file(target)
                else:
                    digest = self._get_hashed(object_key, target, on_bytes, entry["size"], engine_key)
            except ClientError as exc:
                if is_missing(self.client, self.bucket, object_key, exc):  # a 403 raises, naming the permission
                    raise self._broken(engine_key, object_key, "missing (the manifest names an object the store "
                                       "no longer holds)") from exc
                raise
            if digest != entry["sha256"]:
                raise self._corrupt(engine_key, object_key, "its sha256 is not the manifest's")
            fsync_file(target)
            if on_file_done is not None:
                on_file_done(entry["path"])

        files = manifest["files"]
        _for_each_file(files, fetch, self.cache.max_concurrency)
        fsync_tree(dest, files=False)  # each file was fsynced as it was verified
        write_json_atomic(dest / MANIFEST_NAME, manifest)
        return len(files), sum(f["size"] for f in files)

    def _broken(self, engine_key: str, object_key: str, problem: str) -> StoredEngineBroken:
        """The error for a file the manifest names that the store no longer holds as it was."""
        object_uri = f"s3://{self.bucket}/{object_key}"
        return StoredEngineBroken.at(object_uri, problem, (
            f"{object_uri}: {problem}; the stored engine {self.uri(engine_key)} is broken: a run that needs it sets its "
            f"manifest aside and rebuilds it (or delete {self.uri(engine_key, STORE_MANIFEST)} to have it rebuilt)"
        ))

    def _corrupt(self, engine_key: str, object_key: str, problem: str) -> StoredEngineBroken:
        """The error for a stored file whose bytes are not what the manifest says."""
        return self._broken(engine_key, object_key, f"content does not match the manifest ({problem})")

    def set_aside_manifest(self, engine_key: str, stored: StoredManifest) -> str | None:
        """Unpublish a broken manifest, keeping a copy; the copy's URI, or None when the manifest changed meanwhile.

        The manifest is copied to ``<key>/set-aside/<utc>-<etag>.json``, then deleted with
        ``IfMatch`` on the ETag ``stored`` was read with: a manifest another host replaced (a new
        build) or already set aside is never removed. In that case (412 or 404) the copy is deleted
        again and None returned: the caller looks again (also after a 409 ConditionalRequestConflict,
        whose outcome a read tells). The copy's own ``CopySourceIfMatch`` is a
        courtesy (some stores ignore it); the delete's condition is what decides.

        Raises:
            ClientError: the store refused or did not answer (callers translate it).
        """
        manifest_key = self.object_key(engine_key, STORE_MANIFEST)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        etag = re.sub(r"[^0-9A-Za-z-]", "", stored.etag)
        aside_key = self.object_key(engine_key, SET_ASIDE, f"{stamp}-{etag}.json")
        try:
            self.client.copy_object(Bucket=self.bucket, Key=aside_key, CopySourceIfMatch=stored.etag,
                                    CopySource={"Bucket": self.bucket, "Key": manifest_key})
        except ClientError as exc:
            if _condition_not_met(exc) or is_missing(self.client, self.bucket, manifest_key, exc):
                return None
            raise
        try:
            self.client.delete_object(Bucket=self.bucket, Key=manifest_key, IfMatch=stored.etag)
        except ClientError as exc:
            self.client.delete_object(Bucket=self.bucket, Key=aside_key)  # not ours to set aside after all
            if _condition_not_met(exc) or is_missing(self.client, self.bucket, manifest_key, exc):
                return None
            raise
        return f"s3://{self.bucket}/{aside_key}"

    def _get_hashed(self, source: str, target: Path, on_bytes: BytesCallback | None, size: int, engine_key: str) -> str:
        """Stream one object to ``target``, hashing each chunk as it arrives; return the sha256.

        Reading stops once the object is longer than the ``size`` its manifest declares. botocore
        retries a failed request but not a body cut short mid-stream; such a transient fault
        (reset, read timeout) fetches the file again, up to :data:`STREAM_ATTEMPTS` times.

        Raises:
            EngineStoreError: the object is larger than ``size``.
        """
        for attempt in range(1, STREAM_ATTEMPTS + 1):
            digest, received = hashlib.sha256(), 0
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=source)["Body"]
                try:
                    with target.open("wb") as handle:
                        for chunk in body.iter_chunks(STREAM_CHUNK):
                            received += len(chunk)
                            if received > size:
                                raise self._corrupt(engine_key, source, f"larger than the {size} bytes it declares")
                            digest.update(chunk)
                            handle.write(chunk)
                            if on_bytes is not None:
                                on_bytes(len(chunk))
                finally:
                    body.close()
                return digest.hexdigest()
            except Exception as exc:
                if attempt == STREAM_ATTEMPTS or not is_transient(exc):
                    raise
                if on_bytes is not None and received:
                    on_bytes(-received)  # progress counts the new attempt from zero
        raise AssertionError("unreachable")

    # --- listing and removal (nimflow cache ls / explain / gc) ----------------------------------

    def engine_keys(self) -> list[str]:
        """Every engine key with anything under it (published or not)."""
        return self._engine_keys_at()[0]

    def _engine_keys_at(self) -> tuple[list[str], datetime]:
        """Every engine key, and the time on the store's clock (the listing's ``Date``; this host's without one)."""
        base = f"{self.prefix}/" if self.prefix else ""
        keys: list[str] = []
        now = None
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base, Delimiter="/"):
            keys.extend(item["Prefix"][len(base) :].rstrip("/") for item in page.get("CommonPrefixes", []))
            date = page.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
            now = now or (parsedate_to_datetime(date) if date else None)
        return [key for key in keys if _ENGINE_KEY.fullmatch(key)], now or datetime.now(timezone.utc)

    def listing(self) -> StoreListing:
        """Every published engine with its ETag and LastModified, newest first; refused manifests apart.

        One corrupt or hostile manifest does not stop the listing: its key is reported in
        ``refused`` (with the reason) and the others are listed. Only a store that does not answer
        (or refuses access) raises.

        Raises:
            EngineStoreError / ClientError / BotoCoreError: the store refused the listing or did not answer.
        """
        engines: list[StoredManifest] = []
        refused: list[RefusedManifest] = []
        keys, now = self._engine_keys_at()
        for key in keys:
            try:
                stored = self.stored_manifest(key)
            except ManifestRefused as exc:  # a 403 or an outage is not this manifest's fault: it raises on
                refused.append(RefusedManifest(key, str(exc)))
                continue
            if stored is not None:
                engines.append(stored)
        engines.sort(key=lambda s: s.last_modified, reverse=True)
        return StoreListing(engines, refused, now)

    def manifests(self) -> list[dict[str, Any]]:
        """The manifests of every published engine, newest (the store's LastModified) first; refused ones left out."""
        return [stored.manifest for stored in self.listing().engines]

    def resolve_key(self, prefix: str) -> str:
        """The full engine key a unique prefix (as `cache ls` shows) names.

        Raises:
            EngineStoreError: no key, or more than one, starts with ``prefix``.
        """
        matches = [key for key in self.engine_keys() if key.startswith(prefix.lower())]
        if len(matches) != 1:
            found = "no engine" if not matches else f"{len(matches)} engines"
            raise EngineStoreError(f"{found} in {self.cache.uri} with a key starting {prefix!r}; give more of the key")
        return matches[0]

    def delete_upload(self, engine_key: str, upload_id: str) -> int:
        """Delete every object of one upload; return how many.

        Only for an uploader removing its own upload (a lost race); gc deletes the objects it listed.
        """
        return self.delete_objects(self.upload_object_keys(engine_key, upload_id))

    def _upload_prefix(self, engine_key: str, upload_id: str) -> str:
        return self.object_key(engine_key, UPLOADS, upload_id) + "/"

    def delete_manifest(self, stored: StoredManifest) -> bool:
        """Unpublish an engine: delete its manifest only if it is still the version read (``IfMatch`` its ETag).

        The files of the upload it named are left to the caller (:meth:`upload_object_keys`,
        :meth:`delete_objects`), who holds the key's build lease: never the whole ``<key>/``
        prefix, where another upload, the lease and in-use markers live.

        Returns:
            False when the manifest was replaced or removed since it was read (nothing deleted).

        Raises:
            ClientError / BotoCoreError: the store refused or did not answer.
        """
        key = self.object_key(stored.manifest["engine_key"], STORE_MANIFEST)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key, IfMatch=stored.etag)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("PreconditionFailed", "NoSuchKey", "404"):
                return False
            raise
        return True

    def upload_object_keys(self, engine_key: str, upload_id: str) -> list[str]:
        """The object keys stored under one upload now."""
        return [key for key, _ in list_keys(self.client, self.bucket, self._upload_prefix(engine_key, upload_id))]

    def delete_objects(self, keys: list[str] | tuple[str, ...]) -> int:
        """Delete exactly these objects (1,000 per request); return how many.

        Raises:
            EngineStoreError: the store refused some of them (names the first).
        """
        for start in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            answer = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if errors := answer.get("Errors"):
                first = errors[0]
                raise EngineStoreError(f"s3://{self.bucket}/{first.get('Key')}: delete refused ({first.get('Code')}: "
                                       f"{first.get('Message')}); {len(errors)} object(s) not deleted")
        return len(keys)

    def abandoned_uploads(self, manifests: list[dict[str, Any]] | None = None,
                          skip_keys: frozenset[str] | set[str] = frozenset()) -> list[AbandonedUpload]:
        """Uploads that no manifest names: race losers that could not clean up, and crashed uploads.

        An upload still in progress is also listed here; callers keep recent ones (see ``gc``).

        Args:
            manifests: every published manifest, when the caller has just read them (saves a read per key).
            skip_keys: keys not to look at (a refused manifest: which upload it names is unknown).
        """
        if manifests is None:
            listing = self.listing()
            manifests = [stored.manifest for stored in listing.engines]
            skip_keys = {*skip_keys, *(r.engine_key for r in listing.refused)}
        published_uploads = {m["engine_key"]: m.get("upload_id") for m in manifests}
        found = []
        for key in self.engine_keys():
            if key in skip_keys:
                continue
            published = published_uploads.get(key)
            base = self.object_key(key, UPLOADS) + "/"
            uploads: dict[str, list[dict[str, Any]]] = {}
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                for item in page.get("Contents", []):
                    upload_id = item["Key"][len(base) :].split("/", 1)[0]
                    uploads.setdefault(upload_id, []).append(item)
            for upload_id, items in uploads.items():
                if upload_id != published:
                    found.append(AbandonedUpload(
                        engine_key=key, upload_id=upload_id, objects=len(items), bytes=sum(i["Size"] for i in items),
                        last_modified=max(i["LastModified"] for i in items).astimezone(timezone.utc),
                        object_keys=tuple(i["Key"] for i in items),
                    ))
        return found

    def incomplete_uploads(self) -> list[IncompleteUpload]:
        """Multipart uploads under the store's prefix that were never completed or aborted.

        Their parts are stored (and billed) but no object lists them. Age is on the store's clock
        (``Initiated`` against the response's ``Date``; 0 without one).

        Raises:
            ClientError / BotoCoreError: the store refused (s3:ListBucketMultipartUploads) or did not answer.
        """
        base = f"{self.prefix}/" if self.prefix else ""
        found = []
        for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=base):
            date = page.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
            for item in page.get("Uploads", []):
                initiated = item["Initiated"].astimezone(timezone.utc)
                age = max(0.0, (parsedate_to_datetime(date) - initiated).total_seconds()) if date else 0.0
                engine_key = item["Key"][len(base) :].split("/", 1)[0]
                found.append(IncompleteUpload(item["Key"], item["UploadId"],
                                              engine_key if _ENGINE_KEY.fullmatch(engine_key) else None, initiated, age))
        return found

    def abort_incomplete(self, upload: IncompleteUpload) -> None:
        """Abort a multipart upload: its parts are deleted (one gone already counts as done).

        Raises:
            ClientError / BotoCoreError: the store refused (s3:AbortMultipartUpload) or did not answer.
        """
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload.object_key, UploadId=upload.upload_id)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) not in ("NoSuchUpload", "404"):
                raise
