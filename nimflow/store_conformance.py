"""Whether an S3 store enforces the conditional writes that keep the engine store whole.

nimflow's fleet guarantees are the store's own refusals: a manifest is created with
``If-None-Match: *`` (the first publisher wins, nobody overwrites it), a build lease is taken with
``If-None-Match: *`` and renewed or taken over with ``If-Match: <ETag>`` (one holder), and released
with ``DELETE`` + ``If-Match`` (never someone else's). A store that ignores these headers accepts
every such write: two hosts both take a lease, the second manifest replaces the first, a stale
release deletes the new holder's lease. Older MinIO releases and some S3-compatible stores behave
so, silently.

:func:`require_conditional_writes` proves, on the first use of a store (once per endpoint and
bucket in a process), that the store refuses each of these writes, using a probe object under
``<prefix>/.nimflow-probe/`` that it then removes. :func:`store_now` reads the store's clock from a
fresh probe object, for stores whose answers carry no ``Date`` header.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

from botocore.exceptions import ClientError

from nimflow.engine_store import EngineStore
from nimflow.errors import EngineStoreError, translated_errors

#: Folder of probe objects under the store's prefix; never an engine key (those are 64 hex digits).
PROBE_DIR = ".nimflow-probe"
#: An ETag no object has (an S3 ETag is an MD5 in hex): a write conditioned on it must be refused.
WRONG_ETAG = '"00000000000000000000000000000000"'
FIX = (
    "use a store that enforces S3 conditional writes (AWS S3 does: If-None-Match on PUT since August 2024, "
    "If-Match on PUT since November 2024 and on DELETE since September 2025; for MinIO and other S3-compatible "
    "stores, use a release that enforces all three), or, if this host is the only one that will ever use this "
    "store, set `cache.single_writer: true` in the spec (no fleet guarantees: two hosts could both build a key "
    "and replace each other's engine)"
)

logger = logging.getLogger(__name__)
#: (endpoint, bucket) -> the conditions that store ignores (empty: it enforces them all).
_checked: dict[tuple[str, str], tuple[str, ...]] = {}
_checked_lock = threading.Lock()


def probe_key(store: EngineStore) -> str:
    """A fresh object key under the store's probe folder."""
    return "/".join(p for p in (store.prefix, PROBE_DIR, uuid.uuid4().hex) if p)


def describe_store(store: EngineStore) -> str:
    """The store as messages name it: its endpoint and bucket."""
    return f"the S3 store at {store.client.meta.endpoint_url} (bucket {store.bucket})"


def require_conditional_writes(store: EngineStore) -> None:
    """Refuse a store that does not enforce conditional writes; call before the first write to it.

    The first call for a store (endpoint and bucket) in this process probes it (:func:`ignored_conditions`);
    later calls reuse the answer. With ``cache.single_writer: true`` a store that fails is used anyway,
    with a warning.

    Raises:
        EngineStoreError: (permanent) the store ignores a condition (naming the store, the condition
            and the fix), or it refused the probe itself (e.g. access denied).
        EngineStoreUnavailable: (transient) the store did not answer the probe; nothing is
            remembered, the next use probes again.
    """
    identity = (str(store.client.meta.endpoint_url), store.bucket)
    with _checked_lock:
        ignored = _checked.get(identity)
    if ignored is None:
        with translated_errors(f"checking that {describe_store(store)} enforces conditional writes", domain=EngineStoreError):
            ignored = ignored_conditions(store)
        with _checked_lock:
            _checked[identity] = ignored
    if not ignored:
        return
    problem = (f"{describe_store(store)} does not enforce conditional writes: it {', '.join(ignored)} "
               "(a conforming store refuses each with 412 PreconditionFailed)")
    if store.cache.single_writer:
        logger.warning("%s. cache.single_writer is true: using it as the only host that writes it (no fleet guarantees)",
                       problem)
        return
    raise EngineStoreError(
        f"{problem}. nimflow relies on them for one build per engine key and one published manifest per key; "
        f"refusing to use it: {FIX}"
    )


def ignored_conditions(store: EngineStore) -> tuple[str, ...]:
    """The conditional writes the store does not enforce, each as it was found; empty when all hold.

    Writes a probe object, then asks for three writes that a conforming store refuses with 412
    (PUT ``If-None-Match: *`` on it, PUT and DELETE with ``If-Match`` on another ETag), and removes
    it. A 501 (the store does not implement the header) counts as ignored too.

    Raises:
        ClientError / BotoCoreError: the store refused or did not answer (callers translate them).
    """
    client, bucket, key = store.client, store.bucket, probe_key(store)
    found: list[str] = []
    try:
        client.put_object(Bucket=bucket, Key=key, Body=b"nimflow conformance probe")
        checks: tuple[tuple[str, Callable[[], Any]], ...] = (
            ("PUT with If-None-Match: * on an existing object",
             lambda: client.put_object(Bucket=bucket, Key=key, Body=b"overwritten", IfNoneMatch="*")),
            ("PUT with If-Match on another ETag",
             lambda: client.put_object(Bucket=bucket, Key=key, Body=b"overwritten", IfMatch=WRONG_ETAG)),
            ("DELETE with If-Match on another ETag (a lease release relies on it)",
             lambda: client.delete_object(Bucket=bucket, Key=key, IfMatch=WRONG_ETAG)),
        )
        for condition, write in checks:
            answer = _refusal(write)
            if answer != "refused":
                found.append(f"{answer} a {condition}")
    finally:
        _remove(store, key)
    return tuple(found)


def _refusal(write: Callable[[], Any]) -> str:
    """``refused`` when the write got 412; else how the store answered it (``accepted``, ``answered 501 ...``).

    Raises:
        ClientError: any other refusal (access denied, 409 conflict, 5xx): not an answer about conditions.
    """
    try:
        write()
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "PreconditionFailed" or status == 412:
            return "refused"
        if code == "NotImplemented" or status == 501:
            return "answered 501 NotImplemented to"
        raise
    return "accepted"


def _remove(store: EngineStore, key: str) -> None:
    """Delete a probe object; a failure only leaves a small object that is no engine."""
    try:
        store.client.delete_object(Bucket=store.bucket, Key=key)
    except Exception as exc:  # noqa: BLE001 - never hides the caller's outcome
        logger.warning("could not remove the probe object s3://%s/%s (%s); it is no engine, delete it at will",
                       store.bucket, key, exc)


def store_now(store: EngineStore) -> datetime:
    """The store's clock now: the LastModified of a probe object written for the purpose, then removed.

    For answers without a ``Date`` header: an object's own LastModified is no "now".

    Raises:
        ClientError / BotoCoreError: the store refused or did not answer (callers translate them).
    """
    key = probe_key(store)
    try:
        store.client.put_object(Bucket=store.bucket, Key=key, Body=b"")
        modified: datetime = store.client.head_object(Bucket=store.bucket, Key=key)["LastModified"]
    finally:
        _remove(store, key)
    return modified


def age_on_store_clock(store: EngineStore, answer: dict[str, Any]) -> float:
    """Seconds since an object's LastModified on the store's clock, from the answer to its GET or HEAD.

    "Now" is the answer's ``Date``; an answer without one reads the store's clock from a fresh
    probe object (:func:`store_now`): the object's own LastModified is no "now", and this host's
    clock may be wrong. Leases and in-use markers age this way.

    Raises:
        ClientError / BotoCoreError: the probe was refused or not answered (callers translate them).
    """
    date = answer.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    now = parsedate_to_datetime(date) if date else store_now(store)
    return max(0.0, (now - answer["LastModified"]).total_seconds())


def forget_checked_stores() -> None:
    """Forget every store's check, so each is probed again on its next use (tests; a store that was upgraded)."""
    with _checked_lock:
        _checked.clear()
