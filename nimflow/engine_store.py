"""Engines on disk and in the shared engine store (S3), addressed by engine key.

Layout in the store::

    s3://bucket/prefix/<engine_key>/files/<relative path>   every file of the engine directory
    s3://bucket/prefix/<engine_key>/manifest.json           written LAST: names, sizes, sha256

An engine exists in the store only when its manifest does, so an interrupted upload is never
taken for a complete one. Locally, engines are built or restored into a temporary directory and
renamed into ``<cache_dir>/engines/<engine_key>`` once their manifest is written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from nimflow.checkpoint import model_files, sha256_file
from nimflow.errors import EngineStoreError
from nimflow.s3 import s3_client, transfer_config
from nimflow.spec import CacheSpec

MANIFEST_NAME = "nimflow-manifest.json"
MANIFEST_SCHEMA = "nimflow-engine-manifest/1"


# --- local engine directories -------------------------------------------------------------------


def engines_dir(cache_dir: Path) -> Path:
    """Where engines live on a host, inside the NIM cache mount."""
    return cache_dir / "engines"


def local_engine_path(cache_dir: Path, key: str) -> Path:
    """The published location of an engine on this host."""
    return engines_dir(cache_dir) / key


def staging_dir(cache_dir: Path, key: str) -> Path:
    """A fresh temporary directory next to the final one (same filesystem, so rename is atomic)."""
    root = engines_dir(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=root))


def write_manifest(engine_dir: Path, key: str, key_inputs: dict[str, Any]) -> dict[str, Any]:
    """Hash every file of ``engine_dir`` and write its manifest; return the manifest."""
    files = [
        {"path": p.relative_to(engine_dir).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in model_files(engine_dir)
    ]
    if not any(f["path"].startswith("trtllm_engine/") and f["path"].endswith(".engine") for f in files):
        raise EngineStoreError(f"{engine_dir}: no trtllm_engine/rank*.engine file; refusing to record an empty engine")
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "engine_key": key,
        "key_inputs": key_inputs,
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
    try:
        os.rename(staged, final)
    except OSError:
        if read_local_manifest(final) is None:
            raise
        shutil.rmtree(staged, ignore_errors=True)
    return final


def _for_each_file(entries: list[dict[str, Any]], action: Callable[[dict[str, Any]], None]) -> None:
    """Run ``action`` on manifest entries, a few files at a time (each file's parts run in parallel too)."""
    with ThreadPoolExecutor(max_workers=max(1, min(4, len(entries)))) as pool:
        list(pool.map(action, entries))


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


# --- the shared store ---------------------------------------------------------------------------


class EngineStore:
    """The engine store of one :class:`~nimflow.spec.CacheSpec` (an S3 prefix)."""

    def __init__(self, cache: CacheSpec) -> None:
        self.cache = cache
        self.bucket = cache.bucket
        self.prefix = cache.prefix
        self._client = s3_client(
            endpoint_url=cache.endpoint_url, region=cache.region, max_pool=max(16, cache.max_concurrency * 2)
        )
        self._transfer = transfer_config(chunk_mib=cache.multipart_chunk_mib, max_concurrency=cache.max_concurrency)

    def _key(self, engine_key: str, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, engine_key, *parts) if p)

    def uri(self, engine_key: str, *parts: str) -> str:
        """s3:// URI of an engine (or of one of its objects)."""
        return f"s3://{self.bucket}/{self._key(engine_key, *parts)}"

    def manifest(self, engine_key: str) -> dict[str, Any] | None:
        """The engine's manifest, or None when the store does not (fully) hold it."""
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=self._key(engine_key, "manifest.json"))["Body"]
            return json.loads(body.read())
        except self._client.exceptions.NoSuchKey:
            return None

    def upload(self, engine_dir: Path, manifest: dict[str, Any]) -> tuple[int, int]:
        """Upload an engine directory, then its manifest; return (files, bytes) actually sent.

        Files already in the store with the same sha256 (from an interrupted earlier upload) are
        not sent again.
        """
        key = manifest["engine_key"]
        todo = [f for f in manifest["files"] if not self._has_file(key, f)]
        _for_each_file(todo, lambda f: self._put_file(key, engine_dir, f))
        # The manifest goes last, and only if nobody published this key meanwhile.
        body = json.dumps(manifest, indent=2, sort_keys=True).encode()
        try:
            self._client.put_object(
                Bucket=self.bucket,
                Key=self._key(key, "manifest.json"),
                Body=body,
                ContentType="application/json",
                IfNoneMatch="*",
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "PreconditionFailed":
                raise
        return len(todo), sum(f["size"] for f in todo)

    def _has_file(self, key: str, entry: dict[str, Any]) -> bool:
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=self._key(key, "files", entry["path"]))
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise
        return head.get("Metadata", {}).get("sha256") == entry["sha256"] and head["ContentLength"] == entry["size"]

    def _put_file(self, key: str, engine_dir: Path, entry: dict[str, Any]) -> None:
        self._client.upload_file(
            str(engine_dir / entry["path"]),
            self.bucket,
            self._key(key, "files", entry["path"]),
            ExtraArgs={"Metadata": {"sha256": entry["sha256"]}},
            Config=self._transfer,
        )

    def restore(self, manifest: dict[str, Any], dest: Path) -> tuple[int, int]:
        """Download an engine into ``dest`` and verify every file's sha256 against the manifest.

        Raises:
            EngineStoreError: a file's content does not match the manifest (corrupt store object).
        """
        key = manifest["engine_key"]

        def fetch(entry: dict[str, Any]) -> None:
            target = dest / entry["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            self._client.download_file(self.bucket, self._key(key, "files", entry["path"]), str(target), Config=self._transfer)
            if sha256_file(target) != entry["sha256"]:
                raise EngineStoreError(
                    f"{self.uri(key, 'files', entry['path'])}: content does not match the manifest's sha256; "
                    "the stored engine is corrupt: delete the manifest to have it rebuilt"
                )

        files = manifest["files"]
        _for_each_file(files, fetch)
        _write_json_atomic(dest / MANIFEST_NAME, manifest)
        return len(files), sum(f["size"] for f in files)
