"""The ``nimflow.checkpoint.landed`` event: a new checkpoint of a watched source, for one spec.

The checkpoint watcher (:mod:`nimflow.checkpoint_watch`), ``nimflow notify`` and anything else (a
training job, an S3 notification relay) announce a checkpoint with this one event. Its shape::

    event     nimflow.checkpoint.landed
    resource  {"prefect.resource.id":   "nimflow.source.hf.<org>/<repo>"  | "nimflow.source.s3.<bucket>/<prefix>",
               "prefect.resource.name": "<org>/<repo>"                    | "s3://<bucket>/<prefix>/",
               "nimflow.spec":          "<spec name>"}
    payload   {"spec": "<spec name>", "revision": "<40-hex commit sha>"}        (Hugging Face)
              {"spec": "<spec name>", "uri": "s3://<bucket>/<prefix>/<dir>/"}   (S3)
              plus "ref": "<branch or tag>" when the watcher knows which ref moved

The event id is a uuid5 of (spec, source id, revision or uri), so announcing the same checkpoint twice
(the watcher and a training job, or a retried pass) gives the same event. Prefect's server stores an
event id once (the insert ignores a known id), and its trigger service ignores an id it has seen in the
last 30 minutes; beyond that window a re-sent id could fire a trigger again, which is why the watcher
also keeps durable state (see :mod:`nimflow.checkpoint_watch`).

Events are sent with ``POST /api/events`` through Prefect's API client, not the background events
worker of ``emit_event``: the POST answers 204 once the server has accepted the event, and raises
otherwise, so a caller only records a checkpoint as announced when it was. No token or credential is
ever part of an event.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from nimflow.errors import ConfigError, PermanentError, Problem, ServiceUnavailable
from nimflow.redaction import redact_url
from nimflow.spec import SPEC_NAME, source_id_hf, source_id_s3

__all__ = [
    "EVENT_NAME",
    "POST_EVENTS_EXAMPLE",
    "CheckpointLanded",
    "emit_checkpoint_event",
    "hf_checkpoint",
    "s3_checkpoint",
]

EVENT_NAME = "nimflow.checkpoint.landed"
#: The namespace of the deterministic event ids (never change it: ids would change with it).
EVENT_ID_NAMESPACE = uuid.UUID("6f1c2b9e-5d7a-4c3e-9b1f-2a8d4e6c0f13")
_SHA = re.compile(r"^[0-9a-f]{40}\Z")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_S3_DIR = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\x00-\x1f\x7f]*)?\Z")


def _check(field: str, value: Any, pattern: re.Pattern[str], expected: str) -> str:
    """``value`` when it is a string matching ``pattern``; else a ConfigError naming ``field``."""
    if not isinstance(value, str) or not pattern.match(value):
        raise ConfigError(field, [Problem(field, f"{value!r} is not {expected}")])
    return value

#: The raw request a training job (or any HTTP client) sends instead of ``nimflow notify``. The body is a
#: JSON list of events; the id makes a repeated announcement the same event (any uuid works, a uuid5 of
#: spec + source + revision/uri is what nimflow uses). The server answers 204.
POST_EVENTS_EXAMPLE = """\
curl -sf -X POST "$PREFECT_API_URL/events" -H 'Content-Type: application/json' -d '[{
  "id": "8d0a3c52-6c55-5a8e-9a1e-0b7f4f1d2c3e",
  "occurred": "2026-01-31T12:00:00Z",
  "event": "nimflow.checkpoint.landed",
  "resource": {
    "prefect.resource.id": "nimflow.source.s3.my-bucket/runs/llama-sft",
    "prefect.resource.name": "s3://my-bucket/runs/llama-sft/",
    "nimflow.spec": "llama-sft"
  },
  "payload": {"spec": "llama-sft", "uri": "s3://my-bucket/runs/llama-sft/checkpoint-1200/"}
}]'
# A Hugging Face commit instead: "prefect.resource.id": "nimflow.source.hf.my-org/llama-sft",
# "prefect.resource.name": "my-org/llama-sft", "payload": {"spec": "llama-sft", "revision": "<40-hex sha>"}.
# With Prefect Cloud or an authenticated server add -H "Authorization: Bearer $PREFECT_API_KEY".
"""


@dataclass(frozen=True)
class CheckpointLanded:
    """One new checkpoint of a watched source, announced for one spec.

    Exactly one of ``revision`` (a Hugging Face commit sha) and ``uri`` (an S3 checkpoint directory,
    ending in ``/``) is set.
    """

    spec: str
    source_id: str
    source_name: str
    revision: str | None = None
    uri: str | None = None
    ref: str | None = None
    #: 0 for the first announcement; n for the watcher's n-th re-announcement of a checkpoint that got no
    #: run (a new event id: the server's triggers ignore an id they have already seen).
    attempt: int = 0

    @property
    def checkpoint(self) -> str:
        """What identifies the checkpoint within its source: the commit sha or the directory URI."""
        return self.revision or self.uri or ""

    @property
    def event_id(self) -> uuid.UUID:
        """The deterministic event id: the same checkpoint announced for the same spec is the same event
        (per ``attempt``: a re-announcement is a new event)."""
        name = f"{self.spec}\n{self.source_id}\n{self.checkpoint}"
        return uuid.uuid5(EVENT_ID_NAMESPACE, name if not self.attempt else f"{name}\n#{self.attempt}")

    def resource(self) -> dict[str, str]:
        """The event's resource labels."""
        return {"prefect.resource.id": self.source_id, "prefect.resource.name": self.source_name, "nimflow.spec": self.spec}

    def payload(self) -> dict[str, str]:
        """The event's payload: spec, revision or uri, and ref when known."""
        body = {"spec": self.spec}
        if self.revision is not None:
            body["revision"] = self.revision
        if self.uri is not None:
            body["uri"] = self.uri
        if self.ref is not None:
            body["ref"] = self.ref
        return body

    def body(self, occurred: datetime | None = None) -> dict[str, Any]:
        """The event as one item of a ``POST /api/events`` body (see :data:`POST_EVENTS_EXAMPLE`)."""
        when = occurred or datetime.now(timezone.utc)
        return {
            "id": str(self.event_id),
            "occurred": when.isoformat().replace("+00:00", "Z"),
            "event": EVENT_NAME,
            "resource": self.resource(),
            "payload": self.payload(),
        }


def hf_checkpoint(spec: str, repo_id: str, revision: str, ref: str | None = None) -> CheckpointLanded:
    """The event for commit ``revision`` of a Hugging Face repo.

    Raises:
        ConfigError: ``revision`` is not a full 40-hex commit sha (a branch name would name no checkpoint).
    """
    _check("spec", spec, SPEC_NAME, "a spec name (lowercase letters, digits and dashes, at most 63)")
    _check("repo_id", repo_id, _REPO_ID, "a Hugging Face repo id 'org/name'")
    _check("revision", revision, _SHA, "a full commit sha (40 lowercase hex digits)")
    if ref is not None and (not isinstance(ref, str) or not ref.strip() or not ref.isprintable()):
        raise ConfigError("ref", [Problem("ref", f"{ref!r} is not a branch or tag name")])
    return CheckpointLanded(spec=spec, source_id=source_id_hf(repo_id), source_name=repo_id, revision=revision, ref=ref)


def s3_checkpoint(spec: str, prefix_uri: str, directory_uri: str) -> CheckpointLanded:
    """The event for checkpoint directory ``directory_uri`` directly under the watched ``prefix_uri``.

    Raises:
        ConfigError: either is not an ``s3://`` URI, or the directory is not directly under the prefix.
    """
    _check("spec", spec, SPEC_NAME, "a spec name (lowercase letters, digits and dashes, at most 63)")
    for label, value in (("prefix", prefix_uri), ("uri", directory_uri)):
        _check(label, value, _S3_DIR, "an s3://bucket/prefix URI")
    prefix = prefix_uri.rstrip("/") + "/"
    directory = directory_uri.rstrip("/") + "/"
    name = directory[len(prefix):-1] if directory.startswith(prefix) else ""
    if not name or "/" in name:
        raise ConfigError(
            "uri", [Problem("uri", f"{directory_uri!r} is not a checkpoint directory directly under the watched {prefix}")]
        )
    return CheckpointLanded(spec=spec, source_id=source_id_s3(prefix), source_name=prefix, uri=directory)


def _api_url() -> str:
    """The configured Prefect API URL, as messages may name it (credentials redacted).

    Raises:
        PermanentError: PREFECT_API_URL is not set (Prefect would send the event to a throwaway server).
    """
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise PermanentError(
            "PREFECT_API_URL is not set: the checkpoint event would go to a throwaway local server; "
            "export PREFECT_API_URL=http://<prefect-server>:4200/api where this runs"
        )
    return redact_url(str(url))


def emit_checkpoint_event(event: CheckpointLanded) -> uuid.UUID:
    """Send ``event`` to the Prefect API and return its id once the server has accepted it.

    Raises:
        PermanentError: PREFECT_API_URL is not set, or the server refused the event (4xx).
        ServiceUnavailable: the API did not answer, or answered 5xx.
    """
    import httpx
    from prefect.client.orchestration import get_client

    url = _api_url()
    try:
        with get_client(sync_client=True) as client:
            response = client.request("POST", "/events", json=[event.body()])
            response.raise_for_status()
    except httpx.HTTPStatusError as exc:
        status = exc.response.status_code
        kind = ServiceUnavailable if status >= 500 or status == 429 else PermanentError
        raise kind(f"Prefect API at {url} refused the {EVENT_NAME} event: HTTP {status} {exc.response.text[:300]}") from None
    except (httpx.TransportError, OSError) as exc:
        raise ServiceUnavailable(f"Prefect API at {url} is unreachable ({type(exc).__name__}): {exc}") from None
    return event.event_id
