"""Which engines the fleet serves: small TTL'd ``in-use`` markers in the engine store.

A host that serves an engine records it next to the engine::

    s3://bucket/prefix/<engine_key>/in-use/<host-id>--<deployment>.json

written when a deployment starts serving the engine (``deploy_nim``) and refreshed by ``reconcile``
for every deployment it finds serving. ``nimflow cache gc`` keeps every engine with a live marker,
whichever host wrote it, so an engine served anywhere stays restorable for a rollback or a new host.

A marker is live while its age, on the store's clock (its Last-Modified against the response's
``Date``), is within the ``ttl_seconds`` its body states: a host that stops serving (or dies) stops
refreshing, and its markers stop protecting once they lapse. The host id is the host name plus a
digest of the cache dir, since hosts that share a machine (the test bed, several workers on one
box) have different cache dirs; one marker per deployment, so one deployment stopping does not
unmark an engine another deployment on the same host still serves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import ClientError

from nimflow.engine_store import EngineStore
from nimflow.s3 import is_missing
from nimflow.settings import get_settings
from nimflow.spec import CacheSpec
from nimflow.store_conformance import age_on_store_clock

IN_USE = "in-use"
#: How long a marker protects its engine without a refresh: reconcile (every 5 minutes where
#: scheduled) refreshes it many times over; a host down for a day no longer holds engines back.
MARKER_TTL_SECONDS = 24 * 3600.0
#: Longest marker body read (a marker is a few hundred bytes; anything larger is not ours).
MAX_MARKER_BYTES = 64 * 1024
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
logger = logging.getLogger(__name__)


def host_id(cache_dir: str | Path) -> str:
    """This host's id in marker names: its name and a short digest of its (resolved) cache dir."""
    name = _UNSAFE.sub("-", get_settings().host_name).strip("-.")[:63] or "host"
    return f"{name}-{hashlib.sha256(str(Path(cache_dir).resolve()).encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class InUseMarker:
    """One host's record that a deployment serves an engine, with its age on the store's clock."""

    engine_key: str
    name: str
    serving: str
    age_seconds: float
    ttl_seconds: float
    etag: str

    @property
    def live(self) -> bool:
        """True while the marker is within its TTL."""
        return self.age_seconds <= self.ttl_seconds


class EngineUse:
    """The in-use markers of one engine store."""

    def __init__(self, store: EngineStore, ttl_seconds: float = MARKER_TTL_SECONDS) -> None:
        self.store = store
        self.ttl = ttl_seconds

    def _marker_key(self, engine_key: str, cache_dir: str | Path, deployment: str) -> str:
        name = _UNSAFE.sub("-", deployment)[:100]
        return self.store.object_key(engine_key, IN_USE, f"{host_id(cache_dir)}--{name}.json")

    def mark(self, engine_key: str, cache_dir: str | Path, deployment: str, container: str | None = None) -> None:
        """Record (or refresh) that ``deployment`` on this host serves ``engine_key``.

        Raises:
            botocore.exceptions.ClientError / BotoCoreError: the store refused or did not answer.
        """
        body = {
            "host": get_settings().host_name,
            "cache_dir": str(Path(cache_dir).resolve()),
            "deployment": deployment,
            "container": container,
            "engine_key": engine_key,
            "ttl_seconds": self.ttl,
        }
        self.store.client.put_object(
            Bucket=self.store.bucket, Key=self._marker_key(engine_key, cache_dir, deployment),
            Body=json.dumps(body).encode(), ContentType="application/json",
        )

    def unmark(self, engine_key: str, cache_dir: str | Path, deployment: str) -> None:
        """Remove this host's marker for ``deployment`` on ``engine_key``; best effort (it lapses by itself)."""
        try:
            self.store.client.delete_object(Bucket=self.store.bucket, Key=self._marker_key(engine_key, cache_dir, deployment))
        except Exception as exc:  # noqa: BLE001 - an unremoved marker only lapses after its TTL
            logger.warning("could not remove the in-use marker of %s for %s (%s); it lapses by itself", engine_key, deployment, exc)

    def markers(self, engine_key: str) -> list[InUseMarker]:
        """Every marker on ``engine_key``, live or lapsed (a body that is not a marker counts as lapsed)."""
        base = self.store.object_key(engine_key, IN_USE) + "/"
        found = []
        for page in self.store.client.get_paginator("list_objects_v2").paginate(Bucket=self.store.bucket, Prefix=base):
            for item in page.get("Contents", []):
                marker = self._read(engine_key, item["Key"], base)
                if marker is not None:
                    found.append(marker)
        return found

    def _read(self, engine_key: str, object_key: str, base: str) -> InUseMarker | None:
        try:
            answer = self.store.client.get_object(Bucket=self.store.bucket, Key=object_key)
        except ClientError as exc:
            if is_missing(self.store.client, self.store.bucket, object_key, exc):
                return None  # removed since the listing
            raise
        try:
            data = answer["Body"].read(MAX_MARKER_BYTES + 1)
        finally:
            answer["Body"].close()
        try:
            body = json.loads(data) if len(data) <= MAX_MARKER_BYTES else {}
        except (ValueError, RecursionError):
            body = {}
        body = body if isinstance(body, dict) else {}
        ttl = body.get("ttl_seconds")
        ttl = float(ttl) if isinstance(ttl, (int, float)) and not isinstance(ttl, bool) else -1.0  # not a marker: lapsed
        serving = f"{body.get('deployment', '?')} on {body.get('host', '?')}"
        return InUseMarker(engine_key, object_key[len(base):], serving, age_on_store_clock(self.store, answer), ttl, str(answer["ETag"]))

    def live(self, engine_key: str) -> list[InUseMarker]:
        """The live markers on ``engine_key``."""
        return [m for m in self.markers(engine_key) if m.live]

    def remove_lapsed(self, marker: InUseMarker) -> bool:
        """Delete a lapsed marker, only if it is still the version read (``IfMatch``); True when it went.

        A host that refreshed it in between wrote a new version: the delete is refused and the marker stays.
        """
        key = self.store.object_key(marker.engine_key, IN_USE, marker.name)
        try:
            self.store.client.delete_object(Bucket=self.store.bucket, Key=key, IfMatch=marker.etag)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("PreconditionFailed", "NoSuchKey", "404"):
                return False
            raise
        return True


def record_in_use(cache: CacheSpec, engine_key: str, cache_dir: str | Path, deployment: str,
                  container: str | None = None) -> str | None:
    """Write (or refresh) this host's in-use marker for ``deployment``; best effort.

    A deployment serves whether or not the store answers: a failure is returned as one line for
    the caller to log (gc elsewhere may then remove the engine from the store once no marker or
    local container protects it; this host keeps serving its local copy).

    Returns:
        None when the marker was written; otherwise why not.
    """
    try:
        EngineUse(EngineStore(cache)).mark(engine_key, cache_dir, deployment, container)
    except Exception as exc:  # noqa: BLE001 - serving goes on; the next reconcile tries again
        return (f"could not record in {cache.uri} that {deployment} serves engine {engine_key[:12]} "
                f"({type(exc).__name__}: {exc}); `nimflow cache gc` on other hosts does not see it in use")
    return None
