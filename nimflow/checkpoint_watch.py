"""The checkpoint watcher: one pass over specs with a ``watch`` section, announcing each new checkpoint once.

What counts as a new checkpoint:

- **Hugging Face** (``watch.branches``, ``watch.tags``): the repo's refs are listed (``list_repo_refs``).
  A watched branch that points at a commit not seen before, or a new (or moved) tag matching the
  ``watch.tags`` glob that points at such a commit, is a new checkpoint: one event per new commit sha,
  with ``ref`` the first ref that names it (branches in ``watch.branches`` order, then tags by name).
  A tag put on a commit the watcher already knew (the baseline head, an announced commit) is the same
  checkpoint and is not announced again.
- **S3** (``watch.s3_prefix``): the checkpoint directories directly under the prefix (``CommonPrefixes``).
  A directory is complete when it holds ``watch.marker``, or, with no marker configured, when it holds
  ``model.safetensors.index.json`` and every shard that index lists. A complete directory not seen
  before is a new checkpoint. An incomplete one is not recorded, so it is announced once it is complete.

Durable state: one Prefect Variable per spec, ``nimflow-watch-<spec>``, a JSON object of at most 5000
characters::

    {"v": 1,
     "hf": {"source": "nimflow.source.hf.org/repo", "refs": {"heads/main": "<sha[:16]>", "tags/v1": "<sha[:16]>"},
            "announced": {"<sha[:16]>": {"revision": "<sha>", "ref": "main", "n": 1, "at": <unix time>}}},
     "s3": {"source": "nimflow.source.s3.bucket/prefix", "seen": ["<sha256(dir name)[:10]>", ...],
            "announced": {"<sha256(dir name)[:10]>": {"uri": "s3://...", "n": 1, "at": <unix time>}}}}

Only the watched refs and the directories still listed are kept, so it stays small; a watch that outgrows
the limit fails with a message naming the fix. The state is written after each event is accepted by the
API (and once more at the end of the pass), so a pass that dies half way neither misses nor repeats a
checkpoint: what it did not record it announces again next time, with the same event id.

**Announced is not done.** An accepted event can still start nothing (the trigger was being changed,
the server restarted between accepting and acting on it). So each announced checkpoint stays under
``announced`` until a ``host-on-checkpoint`` run for it exists (its parameters name the spec and the
revision or directory); a later pass that finds none after :data:`REANNOUNCE_AFTER_SECONDS` announces it
again with a new event id (the server's triggers ignore an id they saw, so the same one would start
nothing), unless an automation is acting on the last event (its run is on its way: a second event could
make a second run). An action that failed (the server busy, the run refused) made no run: it is announced
again. After :data:`MAX_ANNOUNCEMENTS` the pass gives up on it and fails naming the checkpoint.

**The first pass** for a spec (no Variable yet, or the watched repo or prefix changed) records a baseline and
announces nothing: what already exists when watching starts is not a new checkpoint. To start a run for a
checkpoint that already exists, use ``nimflow notify``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from nimflow.checkpoint_events import CheckpointLanded, emit_checkpoint_event, hf_checkpoint, s3_checkpoint
from nimflow.checkpoint_trigger import CHECKPOINT_AUTOMATION_NAME, HOST_ON_CHECKPOINT_DEPLOYMENT, HOST_ON_CHECKPOINT_FLOW
from nimflow.errors import NimflowError, PermanentError, translated_errors
from nimflow.redaction import redact_url
from nimflow.s3 import s3_client, split_s3_uri
from nimflow.settings import get_settings
from nimflow.spec import HostingSpec, source_id_hf, source_id_s3

__all__ = [
    "INDEX_FILE",
    "MAX_ANNOUNCEMENTS",
    "DirectoryStatus",
    "RunCheck",
    "SpecPass",
    "WatchReport",
    "check_runs",
    "directory_status",
    "list_checkpoint_dirs",
    "load_state",
    "new_commits",
    "new_directories",
    "render_markdown",
    "repo_refs",
    "save_state",
    "scan_prefix",
    "state_variable",
    "watch_spec",
    "watch_specs",
    "watched_refs",
]

logger = logging.getLogger(__name__)

STATE_VERSION = 1
STATE_PREFIX = "nimflow-watch-"
#: Prefect Variables hold at most this many characters of JSON.
MAX_STATE_CHARS = 5000
INDEX_FILE = "model.safetensors.index.json"
_SHA_CHARS = 16
_DIR_HASH_CHARS = 10
#: An announced checkpoint without a run is announced again once this old (the trigger makes the run
#: within seconds; the watcher passes every 2 minutes, so the next pass qualifies).
REANNOUNCE_AFTER_SECONDS = 90.0
#: How often one checkpoint is announced before the watcher gives up on it (and its pass fails naming it).
MAX_ANNOUNCEMENTS = 5

Emitter = Callable[[CheckpointLanded], Any]


@dataclass(frozen=True)
class DirectoryStatus:
    """One checkpoint directory under a watched S3 prefix, and whether it is complete."""

    name: str
    uri: str
    complete: bool
    reason: str


@dataclass
class SpecPass:
    """What one pass saw and did for one spec."""

    spec: str
    baseline: bool = False
    emitted: list[CheckpointLanded] = field(default_factory=list)
    refs: dict[str, str] = field(default_factory=dict)  # "heads/main" -> full sha
    directories: list[DirectoryStatus] = field(default_factory=list)
    #: Checkpoints announced by an earlier pass whose host-on-checkpoint run now exists.
    confirmed: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class WatchReport:
    """The result of one pass over several specs."""

    passes: list[SpecPass] = field(default_factory=list)

    @property
    def emitted(self) -> list[CheckpointLanded]:
        """Every event this pass sent, in order."""
        return [event for one in self.passes for event in one.emitted]

    @property
    def errors(self) -> dict[str, str]:
        """Spec name -> error, for the specs whose pass failed."""
        return {one.spec: one.error for one in self.passes if one.error}

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able summary: the events sent and, per spec, what was seen."""
        return {
            "emitted": [{"id": str(e.event_id), "spec": e.spec, "source": e.source_id, **e.payload()} for e in self.emitted],
            "specs": {
                one.spec: {
                    "baseline": one.baseline,
                    "refs": one.refs,
                    "directories": [{"uri": d.uri, "complete": d.complete, "reason": d.reason} for d in one.directories],
                    "confirmed": one.confirmed,
                    "error": one.error,
                }
                for one in self.passes
            },
        }


# --- state -----------------------------------------------------------------------------------------


def state_variable(spec: str) -> str:
    """The name of the Prefect Variable holding a spec's last-seen state."""
    return f"{STATE_PREFIX}{spec}"


def load_state(spec: str) -> dict[str, Any]:
    """The spec's stored state; ``{}`` when there is none (or it is from another state version).

    Raises:
        ServiceUnavailable: the Prefect API did not answer.
    """
    from prefect.variables import Variable

    with translated_errors(f"reading the Prefect Variable {state_variable(spec)}"):
        value = Variable.get(state_variable(spec), default=None)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if not isinstance(value, dict) or value.get("v") != STATE_VERSION:
        return {}
    return value


def save_state(spec: str, state: dict[str, Any]) -> None:
    """Store the spec's state (a JSON object of at most 5000 characters).

    Raises:
        PermanentError: the state is too large (too many watched refs or directories).
        ServiceUnavailable: the Prefect API did not answer.
    """
    from prefect.variables import Variable

    text = json.dumps(state, separators=(",", ":"), sort_keys=True)
    if len(text) > MAX_STATE_CHARS:
        raise PermanentError(
            f"{state_variable(spec)}: the watch state of {spec!r} needs {len(text)} characters, more than a Prefect "
            f"Variable holds ({MAX_STATE_CHARS}); narrow watch.tags, or prune old checkpoint directories under "
            "watch.s3_prefix"
        )
    with translated_errors(f"writing the Prefect Variable {state_variable(spec)}"):
        Variable.set(state_variable(spec), json.loads(text), overwrite=True)


def _short_sha(sha: str) -> str:
    return sha[:_SHA_CHARS]


def _dir_hash(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:_DIR_HASH_CHARS]


# --- Hugging Face ----------------------------------------------------------------------------------


def watched_refs(branches: dict[str, str], tags: dict[str, str], watch_branches: list[str], tag_glob: str | None) -> dict[str, str]:
    """The watched refs among a repo's refs, as ``{"heads/<branch>" | "tags/<tag>": sha}``, in announcement order.

    Branches come in ``watch_branches`` order (a watched branch that does not exist is left out), then the
    tags matching ``tag_glob`` by name.
    """
    found = {f"heads/{b}": branches[b] for b in watch_branches if b in branches}
    if tag_glob is not None:
        found.update({f"tags/{t}": tags[t] for t in sorted(tags) if fnmatch.fnmatchcase(t, tag_glob)})
    return found


def new_commits(previous: dict[str, str] | None, current: dict[str, str]) -> list[tuple[str, str]]:
    """``(ref, sha)`` of each new checkpoint: a commit a watched ref now names that the previous state knew nowhere.

    Args:
        previous: ref -> short sha from the stored state; None means no state (a baseline: nothing is new).
        current: ref -> full sha now (see :func:`watched_refs`), in announcement order.

    Returns:
        One entry per new commit, with the first ref that names it.
    """
    if previous is None:
        return []
    known = set(previous.values())
    out: list[tuple[str, str]] = []
    for ref, sha in current.items():
        short = _short_sha(sha)
        if previous.get(ref) == short or short in known:
            continue
        known.add(short)
        out.append((ref, sha))
    return out


def repo_refs(repo_id: str) -> tuple[dict[str, str], dict[str, str]]:
    """``(branches, tags)`` of a hub repo, each name -> commit sha.

    Raises:
        CheckpointNotFound: the repo does not exist or the token cannot see it.
        ServiceUnavailable: the hub did not answer.
    """
    from huggingface_hub import HfApi

    settings = get_settings()
    api = HfApi(endpoint=settings.hf_endpoint, token=settings.hf_token_value())
    with translated_errors(f"listing the refs of {repo_id} on {redact_url(settings.hf_endpoint, 'huggingface.co')}"):
        refs = api.list_repo_refs(repo_id)
    return ({b.name: b.target_commit for b in refs.branches}, {t.name: t.target_commit for t in refs.tags})


# --- S3 --------------------------------------------------------------------------------------------


def list_checkpoint_dirs(client: Any, prefix_uri: str) -> list[tuple[str, str]]:
    """``(name, key prefix)`` of each directory directly under an ``s3://`` prefix, by name."""
    bucket, prefix = split_s3_uri(prefix_uri)
    base = f"{prefix}/" if prefix else ""
    found: list[tuple[str, str]] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base, Delimiter="/"):
        for item in page.get("CommonPrefixes", []):
            key = item["Prefix"]
            name = key[len(base):].rstrip("/")
            if name:
                found.append((name, key))
    return sorted(found)


def directory_status(client: Any, bucket: str, key_prefix: str, marker: str | None) -> tuple[bool, str]:
    """Whether the checkpoint directory at ``key_prefix`` (ending in ``/``) is complete, and why.

    Complete means: ``marker`` is in it when a marker is configured; otherwise its
    ``model.safetensors.index.json`` is present, is valid, and every shard it lists is present.
    """
    names: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix):
        names.update(item["Key"][len(key_prefix):] for item in page.get("Contents", []))
    if marker is not None:
        return (True, f"marker {marker} present") if marker in names else (False, f"waiting for marker {marker}")
    if INDEX_FILE not in names:
        return False, f"waiting for {INDEX_FILE} (or configure watch.marker)"
    try:
        index = json.loads(client.get_object(Bucket=bucket, Key=key_prefix + INDEX_FILE)["Body"].read())
        shards = set(index["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError):
        return False, f"{INDEX_FILE} is not a valid index (no weight_map of shard names)"
    missing = sorted(shards - names)
    if missing:
        return False, f"waiting for {len(missing)} of {len(shards)} shards ({missing[0]}{', ...' if len(missing) > 1 else ''})"
    return True, f"{INDEX_FILE} and its {len(shards)} shards present"


def scan_prefix(prefix_uri: str, marker: str | None, endpoint_url: str | None, skip: set[str]) -> list[DirectoryStatus]:
    """Every checkpoint directory under ``prefix_uri``; those whose name hash is in ``skip`` are not opened.

    Raises:
        NimflowError: the listing failed (translated: missing bucket, no credentials, S3 unavailable).
    """
    client = s3_client(endpoint_url=endpoint_url)
    bucket, _ = split_s3_uri(prefix_uri)
    out: list[DirectoryStatus] = []
    with translated_errors(f"listing checkpoint directories under {prefix_uri}"):
        for name, key in list_checkpoint_dirs(client, prefix_uri):
            uri = f"s3://{bucket}/{key}"
            if _dir_hash(name) in skip:
                out.append(DirectoryStatus(name, uri, True, "seen before"))
                continue
            complete, reason = directory_status(client, bucket, key, marker)
            out.append(DirectoryStatus(name, uri, complete, reason))
    return out


def new_directories(previous_seen: set[str] | None, directories: list[DirectoryStatus]) -> list[DirectoryStatus]:
    """The complete directories not seen before; none when ``previous_seen`` is None (a baseline)."""
    if previous_seen is None:
        return []
    return [d for d in directories if d.complete and _dir_hash(d.name) not in previous_seen]


# --- one pass --------------------------------------------------------------------------------------


def _hf_part(
    name: str, spec: HostingSpec, stored: dict[str, Any], result: SpecPass
) -> tuple[dict[str, Any], list[tuple[CheckpointLanded, dict[str, str]]]]:
    """Observe the repo: the final ``hf`` state part, and each new checkpoint with the refs to record after it."""
    assert spec.watch is not None and spec.source.repo_id is not None
    repo_id = spec.source.repo_id
    source = source_id_hf(repo_id)
    branches, tags = repo_refs(repo_id)
    current = watched_refs(branches, tags, spec.watch.branches, spec.watch.tags)
    result.refs = current
    previous = stored.get("refs") if stored.get("source") == source and isinstance(stored.get("refs"), dict) else None
    changes = []
    for ref, sha in new_commits(previous, current):
        event = hf_checkpoint(name, repo_id, sha, ref=ref.split("/", 1)[1])
        changes.append((event, {r: _short_sha(s) for r, s in current.items() if s == sha}))
    return {"source": source, "refs": {r: _short_sha(s) for r, s in current.items()}}, changes


def _s3_part(
    name: str, spec: HostingSpec, stored: dict[str, Any], result: SpecPass
) -> tuple[dict[str, Any], list[tuple[CheckpointLanded, str]]]:
    """Scan the prefix: the final ``s3`` state part, and each new checkpoint with the directory hash to record."""
    assert spec.watch is not None and spec.watch.s3_prefix is not None
    prefix = spec.watch.s3_prefix
    source = source_id_s3(prefix)
    seen_list = stored.get("seen") if stored.get("source") == source and isinstance(stored.get("seen"), list) else None
    previous = set(seen_list) if seen_list is not None else None
    directories = scan_prefix(prefix, spec.watch.marker, spec.watch.endpoint_url, previous or set())
    result.directories = directories
    changes = [(s3_checkpoint(name, prefix, d.uri), _dir_hash(d.name)) for d in new_directories(previous, directories)]
    seen = sorted({_dir_hash(d.name) for d in directories if d.complete})
    return {"source": source, "seen": seen}, changes


# --- announcements waiting for their run ------------------------------------------------------------


@dataclass(frozen=True)
class RunCheck:
    """What the server holds for announced checkpoints: those with a host-on-checkpoint run, and the
    event ids an automation is acting on or acted on without failing (its run is on its way)."""

    with_run: set[str]
    acted_on: set[str]


#: ``(spec, announced events, since) -> RunCheck``; the default reads the Prefect API (:func:`check_runs`).
RunChecker = Callable[[str, list[CheckpointLanded], datetime], RunCheck]


def check_runs(spec: str, events: list[CheckpointLanded], since: datetime) -> RunCheck:
    """Which of ``events`` (checkpoints of ``spec`` announced since ``since``) have a host-on-checkpoint run
    (by its parameters: spec, and revision or checkpoint_uri), and which event ids an automation acted on
    (a ``prefect.automation.action.*`` event whose triggering event is the announcement, none of them
    ``...action.failed``).

    Raises:
        NimflowError: the Prefect API could not be read (translated).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId, FlowRunFilterExpectedStartTime
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventRelatedFilter
    from prefect.exceptions import ObjectNotFound

    name = f"{HOST_ON_CHECKPOINT_FLOW}/{HOST_ON_CHECKPOINT_DEPLOYMENT}"
    with translated_errors(f"reading the runs of {name}"), get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            return RunCheck(set(), set())  # nothing can run them: re-announcing is bounded, then reported
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id]),
            expected_start_time=FlowRunFilterExpectedStartTime(after_=since)), limit=200)
        with_run = {str(value) for run in runs if run.parameters.get("spec") == spec
                    for value in (run.parameters.get("revision"), run.parameters.get("checkpoint_uri")) if value}
        page = client.read_events(filter=EventFilter(
            event=EventNameFilter(prefix=["prefect.automation.action."]),
            related=EventRelatedFilter(id=[f"prefect.event.{e.event_id}" for e in events]),
            occurred=EventOccurredFilter(since=since, until=datetime.now(timezone.utc) + timedelta(minutes=5))), limit=50)
    actions: dict[str, set[str]] = {}
    for action in page.events:
        for related in action.related:
            if related.role == "triggering-event":
                actions.setdefault(related.id.removeprefix("prefect.event."), set()).add(action.event)
    # A failed action made no run (the server answered >= 300, e.g. 503 while busy): announcing again is safe.
    acted_on = {event_id for event_id, names in actions.items() if "prefect.automation.action.failed" not in names}
    return RunCheck({e.checkpoint for e in events if e.checkpoint in with_run}, acted_on)


def _announced_event(name: str, spec: HostingSpec, part: str, entry: dict[str, Any]) -> CheckpointLanded:
    """The event of an entry of a part's ``announced`` state, as it was last sent."""
    assert spec.watch is not None
    if part == "hf":
        assert spec.source.repo_id is not None
        event = hf_checkpoint(name, spec.source.repo_id, entry["revision"], ref=entry.get("ref"))
    else:
        assert spec.watch.s3_prefix is not None
        event = s3_checkpoint(name, spec.watch.s3_prefix, entry["uri"])
    return replace(event, attempt=int(entry.get("n", 1)) - 1)


def _announcement(event: CheckpointLanded, count: int) -> dict[str, Any]:
    """The ``announced`` entry of an event sent ``count`` times, the last time now."""
    # What identifies the checkpoint is what the event says of it: its payload less the spec (the key).
    return {"n": count, "at": int(time.time()), **{k: v for k, v in event.payload().items() if k != "spec"}}


def _settle_announcements(
    name: str, spec: HostingSpec, progress: dict[str, Any], result: SpecPass, *,
    emit: Emitter, check: RunChecker, reannounce_after: float,
) -> list[str]:
    """Earlier announcements: forget those whose run exists; announce again (a new event id) those that got
    none, at most :data:`MAX_ANNOUNCEMENTS` times; return the checkpoints given up on."""
    pending = [(part, key, entry) for part in ("hf", "s3") for key, entry in ((progress.get(part) or {}).get("announced") or {}).items()]
    if not pending:
        return []
    events = {(part, key): _announced_event(name, spec, part, entry) for part, key, entry in pending}
    since = datetime.fromtimestamp(min(int(entry.get("at", 0)) for _, _, entry in pending) - 300, timezone.utc)
    found = check(name, list(events.values()), since)
    gave_up = []
    now = time.time()
    for part, key, entry in pending:
        event = events[(part, key)]
        announced = progress[part]["announced"]
        if event.checkpoint in found.with_run:
            del announced[key]
            result.confirmed.append(event.checkpoint)
        elif now - int(entry.get("at", 0)) < reannounce_after:
            continue  # the trigger usually makes the run within seconds: give it until the next pass
        elif int(entry.get("n", 1)) >= MAX_ANNOUNCEMENTS:
            del announced[key]
            gave_up.append(event.checkpoint)
        elif str(event.event_id) in found.acted_on:
            announced[key] = {**entry, "n": int(entry.get("n", 1)) + 1, "at": int(now)}  # acted on: no second event
        else:
            again = replace(event, attempt=int(entry.get("n", 1)))
            emit(again)
            result.emitted.append(again)
            announced[key] = _announcement(again, int(entry.get("n", 1)) + 1)
        save_state(name, progress)
    return gave_up


def watch_spec(
    name: str, spec: HostingSpec, *, emit: Emitter = emit_checkpoint_event, check: RunChecker = check_runs,
    reannounce_after: float = REANNOUNCE_AFTER_SECONDS,
) -> SpecPass:
    """One pass for one spec: settle earlier announcements, observe its watched sources, announce each new
    checkpoint, record the state.

    An announced checkpoint stays in the state (``announced``) until a host-on-checkpoint run for it
    exists; one without a run after ``reannounce_after`` seconds is announced again on a later pass (a new
    event id, unless an automation acted on the last one), at most :data:`MAX_ANNOUNCEMENTS` times.

    Raises:
        NimflowError: a source could not be read, an event was not accepted, or the state not stored
            (the state then holds exactly the checkpoints announced so far).
    """
    result = SpecPass(spec=name)
    if spec.watch is None:
        return result
    stored = load_state(name)
    final: dict[str, Any] = {"v": STATE_VERSION}
    hf_changes: list[tuple[CheckpointLanded, dict[str, str]]] = []
    s3_changes: list[tuple[CheckpointLanded, str]] = []
    if spec.watch.watches_repo and spec.source.repo_id is not None:
        final["hf"], hf_changes = _hf_part(name, spec, stored.get("hf") or {}, result)
    if spec.watch.s3_prefix is not None:
        final["s3"], s3_changes = _s3_part(name, spec, stored.get("s3") or {}, result)
    result.baseline = any(
        part in final and (stored.get(part) or {}).get("source") != final[part]["source"] for part in ("hf", "s3")
    )

    # Record each checkpoint right after it is accepted, on top of the stored state: a crash in between
    # repeats at most that one event (same id), and never loses one.
    progress: dict[str, Any] = {"v": STATE_VERSION}
    for part in ("hf", "s3"):
        if part in final and (stored.get(part) or {}).get("source") == final[part]["source"]:
            progress[part] = json.loads(json.dumps(stored[part]))  # a deep copy: settled in place below
    gave_up = _settle_announcements(name, spec, progress, result, emit=emit, check=check, reannounce_after=reannounce_after)
    for event, refs in hf_changes:
        emit(event)
        result.emitted.append(event)
        hf = progress.get("hf") or {}
        progress["hf"] = {"source": final["hf"]["source"], "refs": {**hf.get("refs", {}), **refs},
                          "announced": {**hf.get("announced", {}), _short_sha(event.checkpoint): _announcement(event, 1)}}
        save_state(name, progress)
    for event, digest in s3_changes:
        emit(event)
        result.emitted.append(event)
        s3 = progress.get("s3") or {}
        progress["s3"] = {"source": final["s3"]["source"], "seen": sorted(set(s3.get("seen", [])) | {digest}),
                          "announced": {**s3.get("announced", {}), digest: _announcement(event, 1)}}
        save_state(name, progress)
    for part in ("hf", "s3"):
        announced = (progress.get(part) or {}).get("announced")
        if part in final and announced:
            final[part]["announced"] = announced
    if final != stored:
        save_state(name, final)
    for event in result.emitted:
        logger.info("%s: announced %s %s", name, event.source_name, event.checkpoint)
    if gave_up:
        result.error = (
            f"no {HOST_ON_CHECKPOINT_FLOW}/{HOST_ON_CHECKPOINT_DEPLOYMENT} run for {', '.join(gave_up)} after "
            f"{MAX_ANNOUNCEMENTS} announcements; gave up on it. Check that the automation {CHECKPOINT_AUTOMATION_NAME!r} "
            f"is enabled and the deployment exists (nimflow bootstrap), then host it with `nimflow notify {name} "
            "--revision SHA` (or --uri) or from the UI")
        logger.error("%s: %s", name, result.error)
    return result


def watch_specs(specs: dict[str, HostingSpec], *, emit: Emitter = emit_checkpoint_event) -> WatchReport:
    """One pass over several specs; a spec whose pass fails is reported and does not stop the others."""
    report = WatchReport()
    for name, spec in specs.items():
        try:
            report.passes.append(watch_spec(name, spec, emit=emit))
        except NimflowError as exc:
            logger.error("%s: watch pass failed: %s", name, exc)
            report.passes.append(SpecPass(spec=name, error=f"{type(exc).__name__}: {exc}"))
    return report


def render_markdown(report: WatchReport) -> str:
    """The pass as a markdown artifact: events sent, then per spec what was seen."""
    lines = ["# Checkpoint watch", ""]
    if report.emitted:
        lines += ["| spec | source | checkpoint | ref | event id |", "|---|---|---|---|---|"]
        lines += [f"| {e.spec} | {e.source_name} | {e.checkpoint} | {e.ref or ''} | {e.event_id} |" for e in report.emitted]
    else:
        lines.append("No new checkpoints.")
    lines += ["", "| spec | seen | state |", "|---|---|---|"]
    for one in report.passes:
        seen = [f"{ref} = {sha[:12]}" for ref, sha in one.refs.items()]
        seen += [f"{d.uri}: {'complete' if d.complete else 'incomplete'} ({d.reason})" for d in one.directories]
        state = f"error: {one.error}" if one.error else ("baseline recorded" if one.baseline else "up to date")
        lines.append(f"| {one.spec} | {'<br>'.join(seen) or '(nothing)'} | {state} |")
    return "\n".join(lines) + "\n"
