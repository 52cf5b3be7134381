"""Engines on disk and in the shared engine store (S3), addressed by engine key.

Layout in the store::

    s3://bucket/prefix/<engine_key>/uploads/<upload_id>/<path>   the files of one upload, never shared
    s3://bucket/prefix/<engine_key>/manifest.json                written LAST, once: names the upload
    s3://bucket/prefix/<engine_key>/lease.json                   while one host builds the key (build_lease)

Engine builds are not byte-reproducible, so two hosts that build the same key upload different
bytes. Each upload therefore has its own prefix (the upload id is a digest of its files, so a
retried upload resumes file by file), and the manifest, created with ``IfNoneMatch="*"``, names
the one upload that won. A restore reads only that upload's files and re-hashes every byte; the
loser of a race removes its own upload, and ``gc`` removes uploads a crash left behind. An engine
exists in the store only when its manifest does.

Locally, engines are built or restored into a temporary directory and renamed into
``<cache_dir>/engines/<engine_key>`` once their manifest is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from botocore.exceptions import ClientError

from nimflow.checkpoint import model_files, sha256_file
from nimflow.containment import contained_path, safe_relative
from nimflow.errors import EngineStoreError, is_transient
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


# --- local engine directories -------------------------------------------------------------------


def engines_dir(cache_dir: Path) -> Path:
    """Where engines live on a host, inside the NIM cache mount."""
    return cache_dir / "engines"


def local_engine_path(cache_dir: Path, key: str) -> Path:
    """The published location of an engine on this host."""
    return engines_dir(cache_dir) / key


def scratch_dir(cache_dir: Path, purpose: str) -> Path:
    """A fresh private (0700) temporary directory under the engines dir (same filesystem, so rename is atomic)."""
    root = engines_dir(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{purpose}-", dir=root))


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
    """Hash every file of ``engine_dir`` and write its manifest; return the manifest.

    Args:
        key_inputs: what the key was computed from (weights, build config, image, GPU, TensorRT-LLM).
        engine: what was actually built, read from the engine's own config.
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
    _write_json_atomic(engine_dir / MANIFEST_NAME, manifest)
    return manifest


def read_local_manifest(engine_dir: Path) -> dict[str, Any] | None:
    """The manifest of a published local engine, or None when it is absent or unreadable."""
    try:
        return json.loads((engine_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def publish_local(staged: Path, final: Path) -> Path:
    """Move a complete staged engine into place; if another run got there first, keep theirs."""
    staged.chmod(0o755)  # scratch directories are private; the NIM container may run as another user
    try:
        os.rename(staged, final)
    except OSError:
        if read_local_manifest(final) is None:
            raise
        shutil.rmtree(staged, ignore_errors=True)
    return final


def check_manifest(manifest: object, engine_key: str, *, source: str) -> dict[str, Any]:
    """An engine-store manifest, once every field a restore or a record reads is shown to be sound.

    The store is written by other hosts: a manifest is checked before any of it is used. Its
    schema and ``engine_key`` must be the ones asked for, its ``upload_id`` hex, every file entry a
    safe relative path (:func:`nimflow.containment.safe_relative`), a non-negative int size and a
    sha256, no name twice, no more than :data:`MAX_ENGINE_FILES` files and :data:`MAX_ENGINE_BYTES`
    bytes, and at least one ``trtllm_engine/*.engine``.

    Args:
        source: the manifest's URI, named in every refusal.

    Returns:
        The manifest itself.

    Raises:
        EngineStoreError (permanent): the first problem, naming ``source`` and the offending entry.
    """
    def refuse(problem: str) -> EngineStoreError:
        return EngineStoreError(
            f"{source}: refused the manifest: {problem}; the store holds a corrupt or foreign manifest for this key: "
            f"delete {source.removesuffix('/' + STORE_MANIFEST)}/ from the store to have the engine rebuilt"
        )

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
    name = safe_relative(entry.get("path"), source=f"{source}: files[{index}]", error=EngineStoreError)
    if name == MANIFEST_NAME:
        raise refuse(f"files[{index}] is named {name!r}, the local manifest's own name")
    size, digest = entry.get("size"), entry.get("sha256")
    if type(size) is not int or size < 0:
        raise refuse(f"files[{index}] ({name}) has size {_shown(size)}, expected a non-negative integer")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise refuse(f"files[{index}] ({name}) has sha256 {_shown(digest)}, expected 64 hex digits")
    return name


def _for_each_file(entries: list[dict[str, Any]], action: Callable[[dict[str, Any]], None], workers: int) -> None:
    """Run ``action`` on manifest entries, up to ``workers`` files at a time (a multipart file's parts run in parallel too)."""
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(entries)))) as pool:
        list(pool.map(action, entries))


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


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
    """An upload no manifest names (a lost race or a crash), with its size and last write."""

    engine_key: str
    upload_id: str
    objects: int
    bytes: int
    last_modified: datetime


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
            raise EngineStoreError(
                f"{source}: refused the manifest: longer than {MAX_MANIFEST_BYTES} bytes; "
                f"delete {self.uri(engine_key)}/ from the store to have the engine rebuilt"
            )
        try:
            manifest = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise EngineStoreError(f"{source}: refused the manifest: not valid JSON ({type(exc).__name__}); "
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
            EngineStoreError: the manifest is refused (naming the entry), or a file's content does
                not match it (corrupt store object); both permanent.
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
            if entry["size"] > self._single_request_max:
                stored = self.client.head_object(Bucket=self.bucket, Key=object_key)["ContentLength"]
                if stored != entry["size"]:  # checked before a multipart download sizes itself by it
                    raise self._corrupt(engine_key, object_key, f"{stored} bytes, the manifest declares {entry['size']}")
                self.client.download_file(self.bucket, object_key, str(target), Config=self._transfer, Callback=on_bytes)
                digest = sha256_file(target)
            else:
                digest = self._get_hashed(object_key, target, on_bytes, entry["size"], engine_key)
            if digest != entry["sha256"]:
                raise self._corrupt(engine_key, object_key, "its sha256 is not the manifest's")
            if on_file_done is not None:
                on_file_done(entry["path"])

        files = manifest["files"]
        _for_each_file(files, fetch, self.cache.max_concurrency)
        _write_json_atomic(dest / MANIFEST_NAME, manifest)
        return len(files), sum(f["size"] for f in files)

    def _corrupt(self, engine_key: str, object_key: str, problem: str) -> EngineStoreError:
        """The error for a stored file whose bytes are not what the manifest says."""
        return EngineStoreError(
            f"s3://{self.bucket}/{object_key}: content does not match the manifest ({problem}); the stored engine is "
            f"corrupt: `nimflow cache gc` cannot fix it, delete {self.uri(engine_key)} to have it rebuilt"
        )

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
        base = f"{self.prefix}/" if self.prefix else ""
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base, Delimiter="/"):
            keys.extend(item["Prefix"][len(base) :].rstrip("/") for item in page.get("CommonPrefixes", []))
        return [key for key in keys if len(key) == 64 and all(c in "0123456789abcdef" for c in key)]

    def manifests(self) -> list[dict[str, Any]]:
        """The manifests of every published engine, newest first."""
        found = [m for m in (self.manifest(key) for key in self.engine_keys()) if m is not None]
        return sorted(found, key=lambda m: m.get("created_at", ""), reverse=True)

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
        """Delete every object of one upload; return how many."""
        return self._delete_prefix(self.object_key(engine_key, UPLOADS, upload_id) + "/")

    def delete_engine(self, engine_key: str) -> int:
        """Unpublish an engine (manifest first, so it vanishes at once), then delete its files."""
        self.client.delete_object(Bucket=self.bucket, Key=self.object_key(engine_key, STORE_MANIFEST))
        return 1 + self._delete_prefix(self.object_key(engine_key) + "/")

    def _delete_prefix(self, prefix: str) -> int:
        keys = [key for key, _ in list_keys(self.client, self.bucket, prefix)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)

    def abandoned_uploads(self, manifests: list[dict[str, Any]] | None = None) -> list[AbandonedUpload]:
        """Uploads that no manifest names: race losers that could not clean up, and crashed uploads.

        An upload still in progress is also listed here; callers keep recent ones (see ``gc``).

        Args:
            manifests: every published manifest, when the caller has just read them (saves a read per key).
        """
        if manifests is None:
            manifests = self.manifests()
        published_uploads = {m["engine_key"]: m.get("upload_id") for m in manifests}
        found = []
        for key in self.engine_keys():
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
                    ))
        return found
