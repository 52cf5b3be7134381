"""One build per engine key across the fleet: a lease object in the engine store.

``<key>/lease.json`` is created with ``IfNoneMatch="*"``, so exactly one host holds it; the others
wait for the manifest and restore. The holder renews it (``IfMatch`` on its ETag) while it builds
and uploads, and deletes it once the manifest is published or the build failed. A holder that
crashed stops renewing: once the lease is older than its TTL, the next host takes it over with
``IfMatch`` on the stale ETag, so two hosts never both take over the same lease. Age is measured
on the store's clock (the object's Last-Modified against the response's Date, or against a fresh
probe object's Last-Modified when the store sends no Date), so host clocks do not matter.

A holder trusts its lease only while it can show it still holds it (:class:`LeaseHandle`): a
renewal must have succeeded less than :attr:`BuildLeases.trusted_for` ago by its own monotonic
clock, and immediately before it publishes anything it renews once more (:meth:`LeaseHandle.confirm`).
A holder that was paused past the TTL, or whose renewals hung, finds the lease taken over (or cannot
show it is not) and raises :class:`~nimflow.errors.BuildLeaseLost` instead of publishing. Renewals
use their own short timeouts, so a hung one gives up long before the lease expires.

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
from functools import cached_property
from typing import Any

from botocore.exceptions import ClientError

from nimflow.engine_store import EngineStore
from nimflow.errors import BuildLeaseLost, is_transient
from nimflow.s3 import is_missing, s3_client
from nimflow.store_conformance import age_on_store_clock

LEASE_NAME = "lease.json"
#: Attempts at one renewal; with a timeout of TTL/16 per connect and per read, all of them end
#: within about a quarter of the TTL, so a hung renewal is given up and tried again in time.
RENEW_ATTEMPTS = 2
#: The store's clock (Last-Modified, Date) has one-second steps: a lease may look this much older to others.
CLOCK_STEP = 1.0
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lease:
    """A held build lease: the token proves ownership, the ETag is the version last written.

    ``written_at`` is this host's ``time.monotonic()`` at or before the moment the store wrote that
    version (taken before the request was sent), so the lease's true age is never more than
    ``time.monotonic() - written_at`` (plus the store clock's one-second step).
    """

    engine_key: str
    token: str
    etag: str
    ttl_seconds: float
    written_at: float


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
        #: How long after its last successful write a holder still counts its lease as its own: a
        #: quarter of the TTL (and the store clock's step) is kept in reserve for a publish request in
        #: flight and the coarse clock with which other hosts judge the lease expired.
        self.trusted_for = max(0.0, 0.75 * ttl_seconds - CLOCK_STEP)

    @cached_property
    def _renew_client(self) -> Any:
        """An S3 client whose timeouts fit the TTL: a hung renewal must not outlive the lease."""
        timeout = max(1.0, self.ttl / 16)
        cache = self.store.cache
        return s3_client(endpoint_url=cache.endpoint_url, region=cache.region, max_pool=4,
                         read_timeout=timeout, connect_timeout=timeout, max_retries=RENEW_ATTEMPTS - 1)

    def _key(self, engine_key: str) -> str:
        return self.store.object_key(engine_key, LEASE_NAME)

    def _put(self, engine_key: str, token: str, client: Any = None, **condition: str) -> Lease:
        started = time.monotonic()  # before the request: the store writes the lease after this
        answer = (client or self.store.client).put_object(
            Bucket=self.store.bucket, Key=self._key(engine_key), Body=_body(token, self.ttl, self.purpose),
            ContentType="application/json", **condition,
        )
        return Lease(engine_key, token, str(answer["ETag"]), self.ttl, started)

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
        age = age_on_store_clock(self.store, answer)
        return (body if isinstance(body, dict) else {}), str(answer["ETag"]), age

    def try_acquire(self, engine_key: str) -> Lease | LeaseHolder:
        """Take the lease, or take over an expired one; otherwise say who holds it."""
        token = uuid.uuid4().hex
        try:
            return self._put(engine_key, token, IfNoneMatch="*")
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
            lease = self._put(engine_key, token, IfMatch=etag)
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
        asked = time.monotonic()
        held = self.current(engine_key)
        if held is None or held[0].get("token") != token:
            return None
        return Lease(engine_key, token, held[1], self.ttl, asked - held[2] - CLOCK_STEP)

    def holder_of(self, engine_key: str) -> str:
        """Who holds ``engine_key``'s lease now, for messages; never raises."""
        try:
            held = self.current(engine_key)
        except Exception:  # noqa: BLE001 - only a message depends on it
            return "another host"
        return "nobody now (the new holder already released it)" if held is None else str(held[0].get("holder", "another host"))

    def renew(self, lease: Lease) -> Lease | None:
        """Extend a held lease; None when it was lost (expired and taken over, or removed).

        Uses short timeouts (:data:`RENEW_ATTEMPTS` tries of TTL/16 per connect and read): a hung
        renewal fails in time to be tried again before the lease expires.

        Raises:
            ClientError / BotoCoreError: the store refused or did not answer; a 409
                ConditionalRequestConflict (a concurrent takeover attempt) too: transient, try again.
        """
        try:
            return self._put(lease.engine_key, lease.token, self._renew_client, IfMatch=lease.etag)
        except ClientError as exc:
            if _code(exc) not in ("PreconditionFailed", "NoSuchKey", "404"):
                raise
        # Our own attempt whose answer was lost (botocore then retried it) also changed the ETag: still ours then.
        return self.adopt(lease.engine_key, lease.token)

    def release(self, lease: Lease) -> None:
        """Give the lease up (only if still ours); never raises over the caller's outcome."""
        try:
            self.store.client.delete_object(Bucket=self.store.bucket, Key=self._key(lease.engine_key), IfMatch=lease.etag)
        except Exception as exc:  # noqa: BLE001 - an unreleased lease only expires
            logger.warning("could not release the build lease of %s (%s); it expires by itself", lease.engine_key, exc)

    @contextmanager
    def kept_alive(self, lease: Lease) -> Iterator[LeaseHandle]:
        """Renew ``lease`` in the background while the block runs (a long build or upload).

        The block calls :meth:`LeaseHandle.confirm` immediately before it publishes anything.
        """
        handle = LeaseHandle(self, lease)
        stop = threading.Event()

        def renew_forever() -> None:
            wait = self.ttl / 3
            while not stop.wait(wait):
                try:
                    still_ours = handle.renew_now()
                except Exception as exc:  # noqa: BLE001 - a store hiccup: try again soon, before the lease expires
                    wait = self.ttl / 12
                    logger.warning("renewing the build lease of %s failed (%s); retrying in %.1fs",
                                   lease.engine_key, exc, wait)
                    continue
                if not still_ours:
                    logger.warning("the build lease of %s was taken over by %s", lease.engine_key, handle.taken_over_by)
                    return
                wait = self.ttl / 3

        thread = threading.Thread(target=renew_forever, name=f"lease-{lease.engine_key[:12]}", daemon=True)
        thread.start()
        try:
            yield handle
        finally:
            stop.set()
            thread.join(timeout=30)


class LeaseHandle:
    """The latest version of a lease that is being renewed in the background, and whether it is still ours."""

    def __init__(self, leases: BuildLeases, lease: Lease) -> None:
        self.leases = leases
        self.lease = lease
        #: Who took the lease over, once a renewal found it taken (then it stays lost).
        self.taken_over_by: str | None = None
        self._lock = threading.Lock()  # one renewal at a time: each writes on the ETag of the last one

    @property
    def silent_for(self) -> float:
        """Seconds since the store last wrote this lease for us, by this host's monotonic clock (an upper bound)."""
        return time.monotonic() - self.lease.written_at

    @property
    def lost(self) -> bool:
        """Taken over, or not renewed for longer than it is trusted (another host may have taken it over)."""
        return self.taken_over_by is not None or self.silent_for > self.leases.trusted_for

    def renew_now(self) -> bool:
        """Renew the lease now; False once it was found taken over.

        Raises:
            ClientError / BotoCoreError: the store refused or did not answer.
        """
        with self._lock:
            if self.taken_over_by is not None:
                return False
            renewed = self.leases.renew(self.lease)
            if renewed is None:
                self.taken_over_by = self.leases.holder_of(self.lease.engine_key)
                return False
            self.lease = renewed
            return True

    def confirm(self) -> None:
        """Show that the lease is still ours, immediately before publishing; raise if it is not.

        A renewal is written now (``If-Match`` on the last ETag): when it succeeds nobody took the
        lease over since, and nobody can for the next TTL. When the store does not answer, the lease
        still counts as ours while its last successful write is recent (:attr:`BuildLeases.trusted_for`).

        Raises:
            BuildLeaseLost: (transient) the lease was taken over, or not renewed for longer than it
                is trusted: another host may hold it and publish its own build.
            EngineStoreError / ClientError: the store refused the renewal (not a transient fault).
        """
        try:
            self.renew_now()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if not self.lost:  # the last renewal is recent enough: still ours
                logger.warning("renewing the build lease of %s before publishing failed (%s); it was renewed %.0fs ago",
                               self.lease.engine_key, exc, self.silent_for)
                return
            raise BuildLeaseLost(self._lost_message()) from exc
        if self.lost:
            raise BuildLeaseLost(self._lost_message())

    def _lost_message(self) -> str:
        key = self.lease.engine_key
        if self.taken_over_by is not None:
            why = f"it was taken over by {self.taken_over_by}"
        else:
            why = (f"not renewed for {self.silent_for:.0f}s (a lease is trusted for {self.leases.trusted_for:.0f}s of its "
                   f"{self.leases.ttl:g}s TTL), so another host may hold it")
        return (f"lost the build lease of {key}: {why}; not publishing this host's build. The task's retry restores "
                "the engine the new holder publishes (or takes the lease again)")
