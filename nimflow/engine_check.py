"""A local engine directory is checked before it is served or published, and set aside when it is not whole.

A local engine is whole when its ``nimflow-manifest.json`` is readable and sound (the same
:func:`~nimflow.engine_store.check_manifest` a store manifest passes) and every file it lists is a
regular file with the listed size and sha256. Presence, type and size are checked on every use. The
sha256 is computed again only for a file not verified since its last write: each verification is
recorded per file as ``(size, mtime_ns, ctime_ns, inode, sha256)`` in
``<cache_dir>/engines/.verified/<engine_key>.json``, outside the directory served read-only into
NIM, written atomically. A file whose size, mtime, ctime and inode all match its record is trusted
without hashing, so a hit on an engine this host built or restored (both hash every byte and
record it) costs one ``stat`` per file.

What the record cannot see: bytes that change without the kernel updating the file's times. An
in-place edit that puts the old mtime back is caught, because ctime is always set by the kernel and
cannot be set back by a user (only by changing the system clock); bit rot on the disk and writes to
the raw device are not caught until the record is gone (delete ``engines/.verified/`` to force a full
check). The check also does not look for files the manifest does not list.

A damaged or half-written directory (files missing or changed, or no readable manifest: a crash
between the directory's rename and its manifest reaching the disk, from before builds were fsynced)
is renamed to ``engines/.damaged-<key12>-<utc>`` for a person to look at (and delete), never
removed, and the engine is restored or rebuilt in its place.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nimflow.checkpoint import sha256_file
from nimflow.engine_store import MANIFEST_NAME, check_manifest, fsync_dir, write_json_atomic
from nimflow.errors import EngineStoreError

#: Beside the engine directories: one verification record per engine.
VERIFIED_DIR = ".verified"
RECORD_SCHEMA = "nimflow-engine-verified/1"
#: Prefix of a damaged engine directory moved aside (``.damaged-<key12>-<utc>``).
DAMAGED_PREFIX = ".damaged-"
#: Files hashed at once (hashlib releases the GIL on large updates).
HASH_WORKERS = 8


@dataclass(frozen=True)
class LocalCheck:
    """What checking one local engine directory found.

    Attributes:
        manifest: the local manifest when the engine is whole, else None.
        problem: what is wrong when it is not whole (one sentence naming the file), else None.
        rehashed: the files whose sha256 this check computed (the others matched their record).
        inode: the directory's inode when checked (a set-aside moves only that directory).
    """

    manifest: dict[str, Any] | None
    problem: str | None
    rehashed: tuple[str, ...]
    inode: int


def record_path(engine_dir: Path) -> Path:
    """Where the verification record of an engine directory lives: beside it, never inside it."""
    return engine_dir.parent / VERIFIED_DIR / f"{engine_dir.name}.json"


def _facts(info: os.stat_result, sha256: str) -> dict[str, Any]:
    """What a record keeps of a verified file: the stat fields any write changes, and the hash they vouch for."""
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "ctime_ns": info.st_ctime_ns, "inode": info.st_ino,
            "sha256": sha256}


def record_verified(engine_dir: Path, manifest: dict[str, Any]) -> None:
    """Record every file of ``engine_dir`` as verified against ``manifest`` now.

    Called right after every byte was hashed (a build's :func:`~nimflow.engine_store.write_manifest`,
    a restore) and the directory renamed into place (a rename keeps inodes and times).

    Raises:
        OSError: a file could not be stat'ed (the record itself is best effort).
    """
    files = {entry["path"]: _facts(os.lstat(engine_dir / entry["path"]), entry["sha256"]) for entry in manifest["files"]}
    _write_record(engine_dir, files)


def _write_record(engine_dir: Path, files: dict[str, dict[str, Any]]) -> None:
    """Write the record; a record that cannot be written (a read-only cache) only costs a re-hash next time."""
    path = record_path(engine_dir)
    try:
        path.parent.mkdir(exist_ok=True)
        write_json_atomic(path, {"schema": RECORD_SCHEMA, "engine_dir": engine_dir.name, "files": files})
    except OSError:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)  # never leave an outdated record behind


def _read_record(engine_dir: Path) -> dict[str, Any]:
    """The recorded facts per file; empty when there is no record or it is unreadable (everything is hashed)."""
    try:
        data = json.loads(record_path(engine_dir).read_bytes())
    except (OSError, ValueError, RecursionError):
        return {}
    files = data.get("files") if isinstance(data, dict) and data.get("schema") == RECORD_SCHEMA else None
    return files if isinstance(files, dict) else {}


def check_local_engine(engine_dir: Path, engine_key: str | None = None) -> LocalCheck | None:
    """Check a local engine directory against its manifest; None when there is no directory.

    Unreadable files are reported as a problem, never raised; the record is updated best effort.

    Args:
        engine_key: the key the directory must hold (default: the directory's name).
    """
    try:
        directory = os.lstat(engine_dir)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(directory.st_mode):
        return LocalCheck(None, "it is not a directory", (), directory.st_ino)

    def damaged(problem: str, rehashed: tuple[str, ...] = ()) -> LocalCheck:
        return LocalCheck(None, problem, rehashed, directory.st_ino)

    manifest_path = engine_dir / MANIFEST_NAME
    try:
        manifest = check_manifest(json.loads(manifest_path.read_bytes()), engine_key or engine_dir.name,
                                  source=str(manifest_path), remedy="")
    except FileNotFoundError:
        return damaged(f"it has no {MANIFEST_NAME} (a run stopped before the directory was complete)")
    except (OSError, ValueError, RecursionError) as exc:
        return damaged(f"its {MANIFEST_NAME} is unreadable ({type(exc).__name__}: a run stopped before it was complete?)")
    except EngineStoreError as exc:
        return damaged(str(exc))

    record = _read_record(engine_dir)
    to_hash: list[tuple[dict[str, Any], os.stat_result]] = []
    for entry in manifest["files"]:
        name = entry["path"]
        try:
            info = os.lstat(engine_dir / name)
        except FileNotFoundError:
            return damaged(f"{name} is missing")
        except OSError as exc:
            return damaged(f"{name} cannot be read ({exc.strerror})")
        if not stat.S_ISREG(info.st_mode):
            return damaged(f"{name} is not a regular file")
        if info.st_size != entry["size"]:
            return damaged(f"{name} has {info.st_size} bytes, its manifest lists {entry['size']}")
        # Stat'ed before hashing: a write during or after the hash changes what the record keeps.
        if record.get(name) != _facts(info, entry["sha256"]):
            to_hash.append((entry, info))

    rehashed = tuple(entry["path"] for entry, _ in to_hash)
    digests = _hash_files([engine_dir / entry["path"] for entry, _ in to_hash])
    for (entry, info), digest in zip(to_hash, digests, strict=True):
        if isinstance(digest, OSError):
            return damaged(f"{entry['path']} cannot be read ({digest.strerror})", rehashed)
        if digest != entry["sha256"]:
            return damaged(f"{entry['path']}: its sha256 is not its manifest's (the bytes changed after it was written)",
                           rehashed)
        record[entry["path"]] = _facts(info, digest)
    if to_hash:
        listed = {entry["path"] for entry in manifest["files"]}
        _write_record(engine_dir, {name: facts for name, facts in record.items() if name in listed})
    return LocalCheck(manifest, None, rehashed, directory.st_ino)


def _hash_files(paths: list[Path]) -> list[str | OSError]:
    """sha256 of each file, in parallel; an unreadable file gives its OSError instead."""
    def digest(path: Path) -> str | OSError:
        try:
            return sha256_file(path)
        except OSError as exc:
            return exc

    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(HASH_WORKERS, len(paths), os.cpu_count() or 1))) as pool:
        return list(pool.map(digest, paths))


def set_aside(engine_dir: Path, checked: LocalCheck) -> Path | None:
    """Rename the damaged directory ``checked`` looked at to ``.damaged-<key12>-<utc>`` beside it; its new path.

    Returns None, moving nothing, when the directory is no longer the one checked (another run on
    this host moved it aside or published a fresh engine meanwhile): the caller checks again.

    Raises:
        OSError: the rename failed for another reason (permissions).
    """
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    aside = engine_dir.parent / f"{DAMAGED_PREFIX}{engine_dir.name[:12]}-{stamp}"
    try:
        if os.lstat(engine_dir).st_ino != checked.inode:
            return None
        os.rename(engine_dir, aside)
    except FileNotFoundError:
        return None
    record_path(engine_dir).unlink(missing_ok=True)
    fsync_dir(engine_dir.parent)
    return aside
