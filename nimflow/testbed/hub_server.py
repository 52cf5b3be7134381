"""A small Hugging Face Hub endpoint for model repos, on the standard library only.

It implements what ``huggingface_hub`` 2.4.0 needs for ``model_info``, ``list_repo_refs``,
``list_repo_tree``, ``hf_hub_download`` and ``snapshot_download`` (testbed.md §4): revision
resolution, the recursive tree, ``HEAD``/``GET`` on ``/{repo}/resolve/{rev}/{path}`` with the Hub's
headers and Range support, and errors through ``X-Error-Code``.

Storage layout under ``root``::

    <org>/<name>/refs.json              {"branches": {"main": sha}, "tags": {"v1": sha}}
    <org>/<name>/commits/<sha>/<files>  one directory per commit
    <org>/<name>/manifests/<sha>.json   optional: {path: {"size", "oid", "sha256"}} (written by publish)
    <org>/<name>/gated                  marker: resolve answers 403 GatedRepo (unless the token is sent)
    <org>/<name>/token                  marker: the repo is private; requests need "Bearer <token>"

A flat ``refs.json`` (``{"main": sha, "v1": sha}``, as ``git archive`` setups write it) is read as
branches. Files of 1 MiB or more are presented as LFS (sha256 ETag, ``X-Linked-Etag``/``X-Linked-Size``).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from nimflow.testbed import TestbedError
from nimflow.testbed.background_server import BackgroundServer

__all__ = ["LFS_THRESHOLD", "HubServer", "git_blob_sha1", "main", "publish", "resolve_revision"]

log = logging.getLogger(__name__)

#: Files at least this large are presented as LFS files, like the Hub does for weights.
LFS_THRESHOLD = 1024 * 1024
_CHUNK = 1024 * 1024
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SKIP_DIRS = {".git", ".cache"}  # never published (a local_dir download keeps its metadata in .cache/)
_publish_lock = threading.Lock()


# --------------------------------------------------------------------------------------------------
# Content addressing


def _hash_file(path: Path) -> tuple[int, str, str]:
    """Return ``(size, git blob sha1, sha256)`` of a file, streaming it."""
    size = path.stat().st_size
    blob = hashlib.sha1(b"blob %d\0" % size)
    sha256 = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            blob.update(chunk)
            sha256.update(chunk)
    return size, blob.hexdigest(), sha256.hexdigest()


def git_blob_sha1(data: bytes) -> str:
    """The git blob id of ``data`` (what the Hub uses as a regular file's ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _repo_dir(root: Path, repo_id: str) -> Path:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(_NAME_RE.match(p) and ".." not in p for p in parts):
        raise ValueError(f"repo_id must look like 'org/name', not {repo_id!r}")
    return Path(root) / parts[0] / parts[1]


def _read_refs(repo: Path) -> dict[str, dict[str, str]]:
    try:
        raw = json.loads((repo / "refs.json").read_text())
    except FileNotFoundError:
        return {"branches": {}, "tags": {}}
    if "branches" in raw or "tags" in raw:
        return {"branches": dict(raw.get("branches", {})), "tags": dict(raw.get("tags", {}))}
    return {"branches": dict(raw), "tags": {}}  # flat {"main": sha} form


def _atomic_write(path: Path, data: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(data)
    os.replace(tmp, path)


def _list_files(directory: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        rel = Path(dirpath).relative_to(directory)
        out += [(rel / f).as_posix() for f in filenames]
    return sorted(out)


def publish(
    root: Path,
    repo_id: str,
    source_dir: Path,
    *,
    branch: str = "main",
    tags: Sequence[str] = (),
    gated: bool = False,
    token: str | None = None,
) -> str:
    """Copy ``source_dir`` into a new commit of ``repo_id``, move ``branch`` (and ``tags``) to it.

    The commit sha is the sha1 of the parent sha and the sorted ``(path, blob sha)`` list, so the same
    content on the same parent always gives the same sha. Publishing exactly the content the branch
    already points at is a no-op that returns the current head (like git refusing an empty commit).
    Older commits stay downloadable by sha. ``gated`` and ``token`` set the repo's access state
    declaratively: ``gated=False`` / ``token=None`` make it ungated / public again. Returns the sha.
    """
    root, source_dir = Path(root), Path(source_dir)
    repo = _repo_dir(root, repo_id)
    if not source_dir.is_dir():
        raise TestbedError(f"publish: {source_dir} is not a directory")
    files = _list_files(source_dir)
    if not files:
        raise TestbedError(f"publish: {source_dir} has no files")
    manifest = {}
    for rel in files:
        size, oid, sha256 = _hash_file(source_dir / rel)
        manifest[rel] = {"size": size, "oid": oid, "sha256": sha256}

    with _publish_lock:
        refs = _read_refs(repo)
        parent = refs["branches"].get(branch, "")
        old_manifest = _load_manifest(repo, parent) if parent else None
        if old_manifest is not None and {k: v["oid"] for k, v in old_manifest.items()} == {
            k: v["oid"] for k, v in manifest.items()
        }:
            sha = parent
        else:
            h = hashlib.sha1(f"parent {parent}\n".encode())
            for rel in files:
                h.update(f"{rel}\0{manifest[rel]['oid']}\n".encode())
            sha = h.hexdigest()
        commit = repo / "commits" / sha
        if not commit.is_dir():
            (repo / "commits").mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{sha}.", dir=repo / "commits"))
            for rel in files:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source_dir / rel, tmp / rel)
            os.replace(tmp, commit)  # a commit directory appears complete or not at all
        (repo / "manifests").mkdir(exist_ok=True)
        _atomic_write(repo / "manifests" / f"{sha}.json", json.dumps(manifest, indent=1, sort_keys=True))
        refs["branches"][branch] = sha
        for tag in tags:
            refs["tags"][tag] = sha
        _atomic_write(repo / "refs.json", json.dumps(refs, indent=2, sort_keys=True))
        if gated:
            (repo / "gated").touch()
        else:
            (repo / "gated").unlink(missing_ok=True)
        if token:
            _atomic_write(repo / "token", token)
        else:
            (repo / "token").unlink(missing_ok=True)
    return sha


def _load_manifest(repo: Path, sha: str) -> dict[str, dict[str, Any]] | None:
    try:
        return json.loads((repo / "manifests" / f"{sha}.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def resolve_revision(root: Path, repo_id: str, revision: str) -> str | None:
    """Resolve a branch, tag, ``refs/heads/…``/``refs/tags/…`` name or full sha to a commit sha."""
    repo = _repo_dir(root, repo_id)
    refs = _read_refs(repo)
    if _SHA_RE.match(revision) and (repo / "commits" / revision).is_dir():
        return revision
    for prefix, kind in (("refs/heads/", "branches"), ("refs/tags/", "tags")):
        if revision.startswith(prefix):
            return refs[kind].get(revision[len(prefix):])
    return refs["branches"].get(revision) or refs["tags"].get(revision)


# --------------------------------------------------------------------------------------------------
# HTTP


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: huggingface_hub reuses its httpx connections
    server: Any  # QuietHTTPServer carrying .hub

    # --- plumbing -------------------------------------------------------------------------------
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        try:
            status = int(code)
        except (TypeError, ValueError):
            status = 0
        self.server.hub._record(self.command or "-", getattr(self, "path", "") or "-", status)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("hub %s - %s", self.address_string(), format % args)  # request line only, no headers

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def _dispatch(self, *, head: bool) -> None:
        try:
            self._route(head)
        except _HubError as e:
            self._send_error(e, head)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # client went away mid-body
        except Exception as e:  # an unexpected bug: answer 500 rather than drop the connection
            log.exception("hub server error on %s %s", self.command, self.path)
            self._send_error(_HubError(500, None, f"internal error: {e}"), head)

    def _send_json(self, obj: object, head: bool, status: int = 200, extra: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _send_error(self, e: _HubError, head: bool) -> None:
        extra = {"X-Error-Message": e.message}
        if e.code:
            extra["X-Error-Code"] = e.code
        if e.commit:
            extra["X-Repo-Commit"] = e.commit
        try:
            self._send_json({"error": e.message}, head, e.status, extra)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # --- routing --------------------------------------------------------------------------------
    def _route(self, head: bool) -> None:
        split = urlsplit(self.path)
        query = parse_qs(split.query)
        parts = split.path.split("/")[1:]  # keep %2F inside segments: revisions are quoted with safe=""
        if len(parts) >= 4 and parts[0] == "api" and parts[1] == "models":
            repo_id = f"{unquote(parts[2])}/{unquote(parts[3])}"
            repo = self._open_repo(repo_id)
            rest = parts[4:]
            if not rest or rest == [""]:
                return self._info(repo_id, repo, "main", head)
            if rest[0] == "revision" and len(rest) == 2:
                return self._info(repo_id, repo, unquote(rest[1]), head)
            if rest[0] == "tree" and len(rest) >= 2:
                sub = "/".join(unquote(p) for p in rest[2:]).strip("/")
                recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                return self._tree(repo_id, repo, unquote(rest[1]), sub, recursive, head)
            if rest == ["refs"]:
                return self._refs(repo, head)
            raise _HubError(404, None, f"unknown API route {split.path}")
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id = f"{unquote(parts[0])}/{unquote(parts[1])}"
            repo = self._open_repo(repo_id)
            return self._resolve(repo_id, repo, unquote(parts[3]), unquote("/".join(parts[4:])), head)
        raise _HubError(404, None, f"not found: {split.path}")

    def _open_repo(self, repo_id: str) -> Path:
        """The repo directory, after the existence and private-repo checks (both answer 401 like the Hub)."""
        not_found = _HubError(401, "RepoNotFound", f"Repository Not Found for url: {self.path}. "
                              "Please make sure you specified the correct `repo_id` and `repo_type`. "
                              "If you are trying to access a private or gated repo, make sure you are authenticated.")
        try:
            repo = _repo_dir(self.server.hub.root, repo_id)
        except ValueError:
            raise not_found from None
        if not (repo / "refs.json").is_file():
            raise not_found
        if not self._authorized(repo):
            raise not_found
        return repo

    def _authorized(self, repo: Path) -> bool:
        try:
            token = (repo / "token").read_text().strip()
        except FileNotFoundError:
            return True
        sent = self.headers.get("Authorization", "")
        return sent.startswith("Bearer ") and hmac.compare_digest(sent[7:].strip(), token)

    def _commit(self, repo_id: str, repo: Path, revision: str) -> str:
        sha = resolve_revision(self.server.hub.root, repo_id, revision)
        if sha is None or not (repo / "commits" / sha).is_dir():
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha

    # --- endpoints ------------------------------------------------------------------------------
    def _info(self, repo_id: str, repo: Path, revision: str, head: bool) -> None:
        sha = self._commit(repo_id, repo, revision)
        entries = self.server.hub._entries(repo, sha)
        mtime = datetime.fromtimestamp((repo / "commits" / sha).stat().st_mtime, timezone.utc)
        stamp = mtime.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        self._send_json({
            "_id": sha[:24], "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0], "sha": sha,
            "private": (repo / "token").exists(), "gated": "manual" if (repo / "gated").exists() else False,
            "disabled": False, "downloads": 0, "likes": 0, "tags": [], "library_name": "transformers",
            "lastModified": stamp, "createdAt": stamp,
            "siblings": [{"rfilename": p} for p in entries],
        }, head)

    def _tree(self, repo_id: str, repo: Path, revision: str, sub: str, recursive: bool, head: bool) -> None:
        sha = self._commit(repo_id, repo, revision)
        entries = self.server.hub._entries(repo, sha)
        prefix = f"{sub}/" if sub else ""
        if sub and sub not in entries and not any(p.startswith(prefix) for p in entries):
            raise _HubError(404, "EntryNotFound", f"{sub} does not exist on {revision}", commit=sha)
        out: list[dict[str, Any]] = []
        dirs: set[str] = set()
        for path, meta in entries.items():
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):].split("/")
            if not recursive and len(rest) > 1:
                dirs.add(prefix + rest[0])
                continue
            for i in range(1, len(rest)):  # recursive listings include the directories too
                dirs.add(prefix + "/".join(rest[:i]))
            item: dict[str, Any] = {"type": "file", "path": path, "size": meta["size"], "oid": meta["oid"]}
            if meta.get("lfs"):
                item["oid"] = git_blob_sha1(_lfs_pointer(meta["sha256"], meta["size"]))  # git stores the pointer
                item["lfs"] = {"oid": meta["sha256"], "size": meta["size"], "pointerSize": meta["pointer_size"]}
            out.append(item)
        out += [{"type": "directory", "path": d, "size": 0, "oid": hashlib.sha1(d.encode()).hexdigest()}
                for d in dirs]
        out.sort(key=lambda e: e["path"])
        self._send_json(out, head)

    def _refs(self, repo: Path, head: bool) -> None:
        refs = _read_refs(repo)
        self._send_json({
            "branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in sorted(refs["branches"].items())],
            "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in sorted(refs["tags"].items())],
            "converts": [],
        }, head)

    def _resolve(self, repo_id: str, repo: Path, revision: str, path: str, head: bool) -> None:
        if (repo / "gated").exists() and not ((repo / "token").exists() and self._authorized(repo)):
            raise _HubError(403, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access "
                            "to it and be authenticated to access it.")
        sha = self._commit(repo_id, repo, revision)
        meta = self.server.hub._entries(repo, sha).get(path)
        if meta is None:
            raise _HubError(404, "EntryNotFound", f"{path} does not exist on {revision}", commit=sha)
        size = meta["size"]
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng and not head:
            parsed = _parse_range(rng, size)
            if parsed is None:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if isinstance(parsed, tuple):
                (start, end), status = parsed, 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(max(0, end - start + 1)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("X-Repo-Commit", sha)
        self.send_header("Content-Disposition", f'inline; filename="{Path(path).name}"')
        if meta.get("lfs"):
            self.send_header("ETag", f'"{meta["sha256"]}"')
            self.send_header("X-Linked-Etag", f'"{meta["sha256"]}"')
            self.send_header("X-Linked-Size", str(size))
        else:
            self.send_header("ETag", f'"{meta["oid"]}"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if head or size == 0:
            return
        with open(repo / "commits" / sha / path, "rb") as f:
            # sendfile streams from the page cache without copying through Python (falls back to read/send).
            self.connection.sendfile(f, offset=start, count=end - start + 1)


def _parse_range(value: str, size: int) -> tuple[int, int] | str | None:
    """Parse one ``bytes=`` range into inclusive ``(start, end)``.

    Returns None if unsatisfiable (416) and ``"ignore"`` for multi-range or malformed values, which
    RFC 9110 lets a server answer with the whole file (200).
    """
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", value)
    if not m or (not m.group(1) and not m.group(2)):
        return "ignore"
    if not m.group(1):  # suffix range: the last N bytes
        n = int(m.group(2))
        return (max(0, size - n), size - 1) if n and size else None
    start = int(m.group(1))
    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
    return (start, end) if start < size and start <= end else None


class HubServer(BackgroundServer):
    """A Hugging Face Hub endpoint serving model repos from ``root`` (see the module docstring).

    ``requests`` is a snapshot of ``(method, path, status)`` for every request answered so far.
    Usable as a context manager (``with HubServer(root) as hub: ... hub.url``).
    """

    owner_attr = "hub"
    handler = _Handler

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self.root = Path(root)
        # (repo, sha) -> {path: meta}; a commit's content never changes, so the cache never goes stale.
        self._entries_cache: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}

    def _prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def _entries(self, repo: Path, sha: str) -> dict[str, dict[str, Any]]:
        """``{path: {size, oid, sha256, lfs, pointer_size}}`` for a commit (manifest or hashed once)."""
        key = (str(repo), sha)
        with self._lock:
            cached = self._entries_cache.get(key)
        if cached is not None:
            return cached
        commit = repo / "commits" / sha
        manifest = _load_manifest(repo, sha)
        files = _list_files(commit)
        if manifest is None or set(manifest) != set(files):
            manifest = {}
            for rel in files:  # a hand-filled commit dir (e.g. `git archive`): hash it once
                size, oid, sha256 = _hash_file(commit / rel)
                manifest[rel] = {"size": size, "oid": oid, "sha256": sha256}
        entries = {}
        for rel, m in manifest.items():
            lfs = m["size"] >= LFS_THRESHOLD
            entries[rel] = {**m, "lfs": lfs,
                            "pointer_size": len(_lfs_pointer(m["sha256"], m["size"])) if lfs else None}
        with self._lock:
            self._entries_cache[key] = entries
        return entries


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nimflow.testbed.hub_server --root DIR [--host H] [--port N]``."""
    parser = argparse.ArgumentParser(description="Serve a local Hugging Face Hub endpoint.")
    parser.add_argument("--root", type=Path, required=True, help="storage root (see module docstring)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = HubServer(args.root, args.host, args.port)
    server.start()
    print(server.url, flush=True)
    while not stop.wait(0.5):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
