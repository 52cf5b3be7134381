"""One build per engine key across the fleet: a lease object in the engine store.

``<key>/lease.json`` is created with ``IfNoneMatch="*"``, so exactly one host holds it; the others
wait for the manifest and restore. The holder renews it (``IfMatch`` on its ETag) while it builds
and uploads, and deletes it once the manifest is published or the build failed. A holder that
crashed stops renewing: once the lease is older than its TTL, the next host takes it over with
``IfMatch`` on the stale ETag, so two hosts never both take over the same lease. Age is measured
on the store's clock (the object's Last-Modified against the response's Date), so host clocks do
not matter.

The lease only saves GPU time; the store stays correct without it (each upload has its own
prefix and the manifest is created once, see :mod:`nimflow.engine_store`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

from botocore.exceptions import ClientError

from nimflow.engine_store import EngineStore
from nimflow.s3 import is_missing

LEASE_NAME = "lease.json"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lease:
    """A held build lease: the token proves ownership, the ETag is the version last written."""

    engine_key: str
    token: str
    etag: str
    ttl_seconds: float


@dataclass(frozen=True)
class LeaseHolder:
    """Who holds a lease someone else wants, for messages."""

    holder: str
    age_seconds: float
    ttl_seconds: float


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _body(token: str, ttl: float, purpose: str = "") -> bytes:
    return json.dumps({
        "token": token,
        "holder": f"{socket.gethostname()} pid {os.getpid()}" + (f" ({purpose})" if purpose else ""),
        "ttl_seconds": ttl,
        "renewed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }).encode()


class BuildLeases:
    """The build leases of one engine store."""

    def __init__(self, store: EngineStore, ttl_seconds: float, purpose: str = "") -> None:
        """The leases of ``store``.

        Args:
            purpose: named in the holder text others see (``nimflow cache gc``); empty for a build.
        """
        self.store = store
        self.ttl = ttl_seconds
        self.purpose = purpose

    def _key(self, engine_key: str) -> str:
        return self.store.object_key(engine_key, LEASE_NAME)

    def _put(self, engine_key: str, token: str, **condition: str) -> str:
        answer = self.store.client.put_object(
            Bucket=self.store.bucket, Key=self._key(engine_key), Body=_body(token, self.ttl, self.purpose),
            ContentType="application/json", **condition,
        )
        return str(answer["ETag"])

    def current(self, engine_key: str) -> tuple[dict[str, Any], str, float] | None:
        """The lease on ``engine_key`` as (body, etag, age in seconds on the store's clock), or None."""
        try:
            answer = self.store.client.get_object(Bucket=self.store.bucket, Key=self._key(engine_key))
        except ClientError as exc:
            if is_missing(self.store.client, self.store.bucket, self._key(engine_key), exc):  # 403: raises, naming s3:ListBucket
                return None
            raise
        try:
            body = json.loads(answer["Body"].read())
        except ValueError:
            body = {}
        now = answer["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        server_now = parsedate_to_datetime(now) if now else answer["LastModified"]
        age = max(0.0, (server_now - answer["LastModified"]).total_seconds())
        return (body if isinstance(body, dict) else {}), str(answer["ETag"]), age

    def try_acquire(self, engine_key: str) -> Lease | LeaseHolder:
        """Take the lease, or take over an expired one; otherwise say who holds it."""
        token = uuid.uuid4().hex
        try:
            return Lease(engine_key, token, self._put(engine_key, token, IfNoneMatch="*"), self.ttl)
        except ClientError as exc:
            if _code(exc) not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise
        held = self.current(engine_key)
        if held is None:  # released between our two calls: try once more next round
            return LeaseHolder("(released just now)", 0.0, self.ttl)
        body, etag, age = held
        if (holder := self._live(body, age)) is not None:
            return holder
        try:  # expired: its holder stopped renewing (crashed). Exactly one taker wins this write.
            lease = Lease(engine_key, token, self._put(engine_key, token, IfMatch=etag), self.ttl)
        except ClientError as exc:
            if _code(exc) not in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404"):
                raise
            return LeaseHolder("(taken over just now)", 0.0, self.ttl)
        logger.warning("took over the build lease of %s from %s (not renewed for %.0fs)", engine_key, body.get("holder"), age)
        return lease

    def _live(self, body: dict[str, Any], age: float) -> LeaseHolder | None:
        ttl = float(body.get("ttl_seconds") or self.ttl)
        return LeaseHolder(str(body.get("holder", "?")), age, ttl) if age <= ttl else None

    def live_holder(self, engine_key: str) -> LeaseHolder | None:
        """Who is building ``engine_key`` now; None when nobody is, or the lease expired (a crashed holder)."""
        held = self.current(engine_key)
        return None if held is None else self._live(held[0], held[2])

    def adopt(self, engine_key: str, token: str) -> Lease | None:
        """The lease this run took earlier (by its token, e.g. in another task), if still held."""
        held = self.current(engine_key)
        if held is None or held[0].get("token") != token:
            return None
        return Lease(engine_key, token, held[1], self.ttl)

    def renew(self, lease: Lease) -> Lease | None:
        """Extend a held lease; None when it was lost (expired and taken over)."""
        try:
            return Lease(lease.engine_key, lease.token, self._put(lease.engine_key, lease.token, IfMatch=lease.etag), self.ttl)
        except ClientError as exc:
            if _code(exc) in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404"):
                return None
            raise

    def release(self, lease: Lease) -> None:
        """Give the lease up (only if still ours); never raises over the caller's outcome."""
        try:
            self.store.client.delete_object(Bucket=self.store.bucket, Key=self._key(lease.engine_key), IfMatch=lease.etag)
        except Exception as exc:  # noqa: BLE001 - an unreleased lease only expires
            logger.warning("could not release the build lease of %s (%s); it expires by itself", lease.engine_key, exc)

    @contextmanager
    def kept_alive(self, lease: Lease) -> Iterator[LeaseHandle]:
        """Renew ``lease`` in the background while the block runs (a long build or upload)."""
        handle = LeaseHandle(lease)
        stop = threading.Event()

        def renew_forever() -> None:
            while not stop.wait(self.ttl / 3):
                try:
                    renewed = self.renew(handle.lease)
                except Exception as exc:  # noqa: BLE001 - a store hiccup: try again next round
                    logger.warning("renewing the build lease of %s failed (%s); retrying", lease.engine_key, exc)
                    continue
                if renewed is None:
                    handle.lost = True
                    logger.warning("the build lease of %s was taken over by another host", lease.engine_key)
                    return
                handle.lease = renewed

        thread = threading.Thread(target=renew_forever, name=f"lease-{lease.engine_key[:12]}", daemon=True)
        thread.start()
        try:
            yield handle
        finally:
            stop.set()
            thread.join(timeout=30)


@dataclass
class LeaseHandle:
    """The latest version of a lease that is being renewed in the background."""

    lease: Lease
    lost: bool = False
