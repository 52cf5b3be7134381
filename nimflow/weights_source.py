"""Fetch a weights location (local directory, ``s3://bucket/prefix``, ``hf://org/repo@revision``) once.

Each location has a cheap *fingerprint*, taken before anything is fetched: file names, sizes and
mtimes of a local directory, keys, sizes and ETags of an S3 listing, the commit sha a hub revision
resolves to. A small JSON record per location (under the stage's cache root) keeps the fingerprint
that was staged and where; when a later run sees the same fingerprint and the staged directory is
intact, it is reused without fetching or hashing a byte. The record is written last, so a run that
dies half way leaves no record that claims more than is on disk.

Every name a location carries becomes a path only through :mod:`nimflow.containment`: an S3 key
that climbs out of the download directory (``ckpt/../../x``, ``ckpt//srv/x``) and a local file
that links out of its directory are refused, naming the location and the entry, before a byte is
written. An S3 listing is bounded by :data:`MAX_SOURCE_OBJECTS` and :data:`MAX_SOURCE_BYTES`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from nimflow.checkpoint import model_files, source_files
from nimflow.containment import contained_path, safe_relative
from nimflow.errors import InvalidWeights, translated_errors
from nimflow.hub_snapshot import fetch_snapshot, pinned_sha
from nimflow.s3 import s3_client, split_s3_uri, transfer_config

SourceKind = Literal["local", "s3", "hf"]
#: Bump when the checks or the staged layout change: older records then no longer match.
RECORD_VERSION = 1
_HF = re.compile(r"^hf://(?P<repo>[^/@]+/[^/@]+)(@(?P<rev>.+))?$")
#: Most objects an S3 weights location may list. A sharded checkpoint has tens to a few hundred
#: files (a 405B model: under 200); a listing far beyond that is not a checkpoint, and each object
#: costs a request and a file.
MAX_SOURCE_OBJECTS = 10_000
#: Most bytes an S3 weights location may list: 2 TiB (a 405B-parameter checkpoint in bf16 is about
#: 0.8 TiB). It stops a listing from filling the cache disk before the checks could refuse it.
MAX_SOURCE_BYTES = 2 << 40
#: Mode of every staged file: NIM (maybe another user) reads it, nobody else writes it.
STAGED_FILE_MODE = 0o644


@dataclass(frozen=True)
class WeightsLocation:
    """A parsed weights location."""

    uri: str
    kind: SourceKind
    path: Path | None = None  # local
    bucket: str | None = None  # s3
    prefix: str = ""  # s3, no trailing slash
    repo_id: str | None = None  # hf
    revision: str = "main"  # hf

    def display(self, name: str = "") -> str:
        """How a file of this location is named in messages: the user's URI or path, never a temp dir."""
        if not name:
            return self.uri
        return str(self.path / name) if self.path is not None else f"{self.uri.rstrip('/')}/{name}"


@dataclass(frozen=True)
class FetchedSource:
    """A location's files on this host."""

    directory: Path
    files: int  # transferred by this call
    bytes: int
    private: bool  # True: a copy only this run uses (its files may be moved, not copied)
    immutable: bool  # True: content-addressed (a hub snapshot), safe to hard-link from


def parse_location(uri: str) -> WeightsLocation:
    """Split a location the spec accepted into its parts.

    Raises:
        InvalidWeights: the location does not parse (the spec validates it first, so only by API misuse).
    """
    if uri.startswith("s3://"):
        bucket, prefix = split_s3_uri(uri)
        return WeightsLocation(uri, "s3", bucket=bucket, prefix=prefix)
    if uri.startswith("hf://"):
        match = _HF.match(uri)
        if not match:
            raise InvalidWeights(f"{uri}: expected hf://org/repo or hf://org/repo@revision")
        return WeightsLocation(uri, "hf", repo_id=match["repo"], revision=match["rev"] or "main")
    return WeightsLocation(uri, "local", path=Path(uri))


def _s3_objects(client: Any, bucket: str, prefix: str) -> Iterator[dict]:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""):
        yield from page.get("Contents", [])


def _key_source(location: WeightsLocation, key: str) -> str:
    """How an object of an S3 location is named in a refusal: the location and the whole key."""
    return f"{location.uri}: object {key!r}"


def _s3_listing(client: Any, location: WeightsLocation) -> dict[str, list]:
    """Relative name -> [size, ETag] of the objects under an S3 location, each name checked.

    Raises:
        InvalidWeights: a key whose name would leave the download directory, two keys naming one
            file, or more than :data:`MAX_SOURCE_OBJECTS` objects or :data:`MAX_SOURCE_BYTES` bytes.
    """
    assert location.bucket is not None  # parse_location sets it for every s3:// location
    base = f"{location.prefix}/" if location.prefix else ""
    objects: dict[str, list] = {}
    keys_by_name: dict[str, str] = {}
    total = 0
    for item in _s3_objects(client, location.bucket, location.prefix):  # a generator: stops at the first refusal
        key = item["Key"]
        if key.endswith("/"):
            continue  # a "folder" placeholder, no file
        if len(objects) == MAX_SOURCE_OBJECTS:
            raise InvalidWeights(
                f"{location.uri}: more than {MAX_SOURCE_OBJECTS} objects under this prefix; a checkpoint has far fewer: "
                "point the path at the checkpoint's own prefix"
            )
        name = safe_relative(key[len(base):], source=_key_source(location, key))
        if name in keys_by_name:
            raise InvalidWeights(f"{_key_source(location, key)}: names the same file {name!r} as {keys_by_name[name]!r}; remove one")
        keys_by_name[name] = key
        total += item["Size"]
        if total > MAX_SOURCE_BYTES:
            raise InvalidWeights(
                f"{location.uri}: the objects under this prefix hold more than {MAX_SOURCE_BYTES} bytes "
                "(the bound for one checkpoint); point the path at the checkpoint's own prefix"
            )
        objects[key[len(base):]] = [item["Size"], item.get("ETag", "")]
    return objects


def source_fingerprint(location: WeightsLocation, *, endpoint_url: str | None = None) -> dict:
    """What identifies the location's content now, without transferring it.

    Raises:
        InvalidWeights: a local path that is not a directory or holds a link out of it, a FIFO,
            device or socket; an empty S3 prefix, or one whose keys would leave the download
            directory or exceed the bounds (see :func:`_s3_listing`).
        CheckpointNotFound: an unknown hub repo or revision.
        EngineStoreError / ServiceUnavailable: S3 refused or did not answer.
    """
    if location.kind == "local":
        assert location.path is not None
        if not location.path.is_dir():
            raise InvalidWeights(f"{location.uri}: not a directory; expected a checkpoint directory with *.safetensors weights")
        files = {}
        for name, path in source_files(location.path, source=location.uri).items():
            stat = path.stat()  # a link's target: the bytes that would be staged
            files[name] = [stat.st_size, stat.st_mtime_ns]
        return {"kind": "local", "files": files}
    if location.kind == "s3":
        client = s3_client(endpoint_url=endpoint_url)
        with translated_errors(f"listing {location.uri}"):
            objects = _s3_listing(client, location)
        if not objects:
            raise InvalidWeights(f"{location.uri}: no objects under this prefix; expected safetensors weights and config.json")
        return {"kind": "s3", "objects": objects}
    assert location.repo_id is not None
    return {"kind": "hf", "repo_id": location.repo_id, "sha": pinned_sha(location.repo_id, location.revision)}


def fetch_source(
    location: WeightsLocation,
    fingerprint: dict,
    cache_dir: Path,
    work_dir: Path,
    *,
    endpoint_url: str | None = None,
) -> FetchedSource:
    """Bring the files the fingerprint describes onto this host.

    Local directories are used where they are (their files were checked by the fingerprint, and
    are read through :func:`~nimflow.checkpoint.source_files` again when staged); S3 objects are
    downloaded (streamed to disk) into ``work_dir/source``, each to a path inside it
    (:func:`~nimflow.containment.contained_path`); hub repos go through the snapshot cache shared
    with stage 1.

    Raises:
        InvalidWeights: an object name that would leave the download directory.
        CheckpointNotFound / EngineStoreError: the source refused the download.
        ServiceUnavailable: the source did not answer (the task retries).
    """
    if location.kind == "local":
        assert location.path is not None
        return FetchedSource(location.path, 0, 0, private=False, immutable=False)
    if location.kind == "s3":
        dest = work_dir / "source"
        client = s3_client(endpoint_url=endpoint_url)
        config = transfer_config()
        base = f"{location.prefix}/" if location.prefix else ""
        total = 0
        with translated_errors(f"downloading {location.uri}"):
            for rel, (size, _etag) in sorted(fingerprint["objects"].items()):
                target = contained_path(dest, rel, source=_key_source(location, base + rel))
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(location.bucket, base + rel, str(target), Config=config)
                total += size
        return FetchedSource(dest, len(fingerprint["objects"]), total, private=True, immutable=False)
    assert location.repo_id is not None
    snapshot = fetch_snapshot(location.repo_id, fingerprint["sha"], None, cache_dir, required_file=None)
    return FetchedSource(Path(snapshot.path), snapshot.downloaded_files, snapshot.downloaded_bytes, private=False, immutable=True)


def place_file(src: Path, dest: Path, *, move: bool = False, link: bool = False) -> None:
    """Put one file into a staged directory as a regular :data:`STAGED_FILE_MODE` file.

    Args:
        src: the bytes to stage (for a local source, the target :func:`~nimflow.checkpoint.source_files`
            gave, never a link).
        move: ``src`` is a private copy of this run: rename it instead of copying.
        link: ``src`` is content-addressed (a hub snapshot never changes in place): share its inode
            where the filesystem allows, and leave its mode as the snapshot has it.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if move:
        os.replace(src, dest)
    else:
        if link:
            with contextlib.suppress(OSError):
                os.link(src, dest)
                return
        shutil.copyfile(src, dest)  # streams in chunks; the bytes only, never a link or the source's mode
    dest.chmod(STAGED_FILE_MODE)


# --- records ---------------------------------------------------------------------------------------


def record_path(root: Path, key: str) -> Path:
    """Where the record for ``key`` (a location, or a set of them) lives under a stage's cache root."""
    return root / "sources" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def file_sizes(directory: Path) -> dict[str, int]:
    """Relative name -> size of a staged directory's files (what "intact" is checked against)."""
    return {p.relative_to(directory).as_posix(): p.stat().st_size for p in model_files(directory)}


def reusable(path: Path, wanted: dict) -> dict | None:
    """The ``staged`` entry of the record at ``path`` when it was made from exactly ``wanted``
    and its directory still holds every file it staged, at its size; else None."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
        return None
    if any(record.get(k) != v for k, v in wanted.items()):
        return None
    staged = record.get("staged")
    if not isinstance(staged, dict) or not isinstance(staged.get("files"), dict):
        return None
    directory = Path(str(staged.get("path")))
    if not directory.is_dir() or file_sizes(directory) != staged["files"]:
        return None
    return staged


def save_record(path: Path, wanted: dict, staged: dict) -> None:
    """Write a location's record (through a temporary name: readers see all of it or the old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": RECORD_VERSION, **wanted, "staged": staged}, indent=1, sort_keys=True))
    os.replace(tmp, path)
