"""Looking after the engine store: list entries, explain keys, remove old entries and abandoned uploads.

Backs ``nimflow cache ls``, ``nimflow cache explain`` and ``nimflow cache gc``. Entries are listed
like NIM's ``list-model-profiles``: one line per engine with what it is for (model, revision,
precision, parallelism, GPU, TensorRT-LLM version), its size and age.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import docker

from nimflow.build_lease import BuildLeases, Lease, LeaseHolder
from nimflow.containers import LABEL_PREFIX
from nimflow.engine_key import differing_inputs
from nimflow.engine_store import (
    AbandonedUpload,
    EngineStore,
    IncompleteUpload,
    RefusedManifest,
    StoredManifest,
    remove_stale_scratch,
)
from nimflow.engine_use import EngineUse, InUseMarker
from nimflow.errors import ConfigError, EngineStoreError, ManifestRefused, Problem
from nimflow.store_conformance import require_conditional_writes

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str, *, option: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``2w`` or ``45s`` as a timedelta.

    Raises:
        ConfigError: naming the option and the accepted forms.
    """
    match = _DURATION.match(text)
    if not match:
        raise ConfigError("nimflow cache gc", [Problem(option, f"{text!r} is not a duration; use e.g. 30d, 12h, 90m")])
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def describe_weights(weights: str) -> tuple[str, str]:
    """(model, revision) for display from a weights identity like ``hf:org/name@sha+ft:sha256:d``."""
    base, _, finetune = weights.partition("+ft:sha256:")
    if base.startswith("hf:") and "@" in base:
        model, _, revision = base[3:].rpartition("@")
        revision = revision[:12]
    else:
        model, revision = "(local checkpoint)", base.removeprefix("sha256:")[:12]
    return model, revision + (f"+ft:{finetune[:8]}" if finetune else "")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def entry_row(manifest: dict[str, Any], published: datetime | None = None) -> dict[str, str]:
    """One `cache ls` row of a manifest; ``published`` is its LastModified in the store (the store's clock)."""
    inputs = manifest.get("key_inputs", {})
    engine = manifest.get("engine", {})
    model, revision = describe_weights(str(inputs.get("weights", "?")))
    return {
        "KEY": manifest["engine_key"][:12],
        "MODEL": model,
        "REVISION": revision,
        "PRECISION": str(engine.get("dtype") or inputs.get("build", {}).get("dtype") or "?"),
        "TP/PP": f"{engine.get('tp_size', '?')}/{engine.get('pp_size', '?')}",
        "GPU": str((inputs.get("gpu") or {}).get("name", "?")),
        "TRT-LLM": str(inputs.get("trtllm_version") or engine.get("version") or "?"),
        "BACKEND": str(inputs.get("build", {}).get("backend", "?")),
        "SIZE": _size(sum(f["size"] for f in manifest.get("files", []))),
        "PUBLISHED": f"{published:%Y-%m-%dT%H:%M:%SZ}" if published else "?",
    }


def format_table(rows: list[dict[str, str]]) -> str:
    """Rows as aligned columns (the keys of the first row are the header)."""
    if not rows:
        return ""
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns).rstrip() for r in rows]
    return "\n".join(lines)


def list_entries(store: EngineStore) -> str:
    """The `cache ls` listing of a store: one row per engine, newest first, then one line per refused manifest."""
    listing = store.listing()
    refused = [f"refused {store.uri(r.engine_key)}: {_refusal(r)}" for r in listing.refused]
    if not listing.engines:
        return "\n".join([f"No engines in {store.cache.uri}", *refused])
    rows = [entry_row(s.manifest, s.last_modified) for s in listing.engines]
    return "\n".join([f"Engines in {store.cache.uri} ({len(rows)}):", format_table(rows), *refused])


def _refusal(refused: RefusedManifest) -> str:
    """Why a manifest was refused, without the URI the line already names."""
    return refused.reason.partition(": refused the manifest: ")[2] or refused.reason


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for name in sorted(data):
        value = data[name]
        if isinstance(value, dict) and value:
            items.extend(_flatten(value, f"{prefix}{name}."))
        else:
            items.append((f"{prefix}{name}", value))
    return items


def explain(store: EngineStore, key: str, other: str | None = None) -> str:
    """The inputs of one key, or the inputs that differ between two keys.

    Raises:
        EngineStoreError: a key prefix matches no engine or several.
    """
    first = _manifest_or_fail(store, store.resolve_key(key))
    if other is None:
        lines = [f"engine {first['engine_key']}", "key inputs:"]
        # A multi-line value (the rendered build config) stays on its line, escaped.
        lines += [f"  {name}: {value!r}" if isinstance(value, str) and "\n" in value else f"  {name}: {value}"
                  for name, value in _flatten(first.get("key_inputs", {}))]
        lines.append("built (from the engine's own config):")
        lines += [f"  {name}: {value}" for name, value in _flatten(first.get("engine", {}))]
        lines.append(f"upload {first.get('upload_id')} by {first.get('built_by', '?')} at {first.get('created_at', '?')}, "
                     f"{len(first.get('files', []))} files, {_size(sum(f['size'] for f in first.get('files', [])))}")
        return "\n".join(lines)
    second = _manifest_or_fail(store, store.resolve_key(other))
    diffs = differing_inputs(first.get("key_inputs", {}), second.get("key_inputs", {}))
    header = f"{first['engine_key'][:12]} vs {second['engine_key'][:12]}"
    if not diffs:
        return f"{header}: identical inputs (the keys are equal)"
    # The builder's command line follows from the build config: shown only when it alone differs
    # (another nimflow version passing other flags), not as a second copy of a build.* change.
    if any(name.startswith("build.") for name, _, _ in diffs):
        diffs = [d for d in diffs if not d[0].startswith("builder.")]
    rows = [{"INPUT": name, first["engine_key"][:12]: str(a), second["engine_key"][:12]: str(b)} for name, a, b in diffs]
    return f"{header}: {len(diffs)} input(s) differ\n" + format_table(rows)


def _manifest_or_fail(store: EngineStore, key: str) -> dict[str, Any]:
    manifest = store.manifest(key)
    if manifest is None:
        raise EngineStoreError(f"{store.uri(key)} has no manifest: the engine is not (yet) published")
    return manifest


def engines_in_use(client: docker.DockerClient | None) -> dict[str, str]:
    """Engine keys that running nimflow containers on this host serve, with the container name."""
    if client is None:
        return {}
    running = client.containers.list(filters={"label": f"{LABEL_PREFIX}engine-key"})
    return {c.labels[f"{LABEL_PREFIX}engine-key"]: c.name for c in running}


def keep_group(key_inputs: dict[str, Any]) -> str:
    """What ``--keep N`` counts engines within: every key input except the weights revision.

    The revision is the ``@<sha>`` of ``hf:org/name@sha`` or the content digest of a local
    checkpoint; a fine-tune's digest, the build config, GPU, image and TensorRT-LLM version stay,
    so a tp2 engine or another fine-tune of the same base is never "an older version" of a tp1 one.
    """
    weights = str(key_inputs.get("weights", ""))
    base, marker, finetune = weights.partition("+ft:")
    if base.startswith("hf:") and "@" in base:
        base = base.rpartition("@")[0]
    elif base.startswith("sha256:"):
        base = "sha256:(local checkpoint)"
    return json.dumps({**key_inputs, "weights": base + marker + finetune}, sort_keys=True, default=str)


@dataclass
class GcPlan:
    """What `cache gc` removes and keeps, and why; acted on later under each key's build lease."""

    engines: list[StoredManifest] = field(default_factory=list)
    uploads: list[AbandonedUpload] = field(default_factory=list)
    multipart: list[IncompleteUpload] = field(default_factory=list)
    kept_in_use: list[tuple[str, str]] = field(default_factory=list)
    kept_in_progress: list[AbandonedUpload] = field(default_factory=list)
    kept_multipart: list[tuple[IncompleteUpload, str]] = field(default_factory=list)
    refused: list[RefusedManifest] = field(default_factory=list)
    lapsed_markers: list[InUseMarker] = field(default_factory=list)


def plan_gc(
    store: EngineStore,
    *,
    keep: int | None,
    older_than: timedelta | None,
    abandoned_after: timedelta,
    in_use: dict[str, str],
    lease_seconds: float = 300,
) -> GcPlan:
    """Decide what `cache gc` removes (nothing is deleted here).

    Ages are the store's LastModified against the store's clock, never a host's.

    Args:
        keep: keep the N newest engines of each :func:`keep_group`; older ones go.
        older_than: remove engines published longer ago than this.
        abandoned_after: uploads no manifest names, and incomplete multipart uploads, are removed
            once this old and their key has no live build lease.
        in_use: engine keys served by running containers on this host: never removed (engines
            with a live in-use marker from any host are kept too).

    Raises:
        EngineStoreError / ClientError / BotoCoreError: the store refused or did not answer.
    """
    plan = GcPlan()
    listing = store.listing()
    plan.refused = listing.refused
    use = EngineUse(store)
    counted: dict[str, int] = {}
    for stored in listing.engines:  # newest first
        key = stored.manifest["engine_key"]
        group = keep_group(stored.manifest["key_inputs"])
        counted[group] = counted.get(group, 0) + 1
        expired = older_than is not None and listing.now - stored.last_modified > older_than
        surplus = keep is not None and counted[group] > keep
        if not (expired or surplus):
            continue
        markers = use.markers(key)
        plan.lapsed_markers.extend(m for m in markers if not m.live)
        if key in in_use:
            plan.kept_in_use.append((key, f"in use by running container {in_use[key]}"))
        elif live := [m for m in markers if m.live]:
            plan.kept_in_use.append((key, _served_by(live)))
        else:
            plan.engines.append(stored)
    leases = BuildLeases(store, lease_seconds)
    refused_keys = {r.engine_key for r in listing.refused}
    for upload in store.abandoned_uploads([s.manifest for s in listing.engines], skip_keys=refused_keys):
        if listing.now - upload.last_modified < abandoned_after or leases.live_holder(upload.engine_key) is not None:
            plan.kept_in_progress.append(upload)
        else:
            plan.uploads.append(upload)
    for pending in store.incomplete_uploads():
        if pending.engine_key is None:
            plan.kept_multipart.append((pending, "not under an engine key"))
        elif pending.age_seconds < abandoned_after.total_seconds():
            plan.kept_multipart.append((pending, "recent"))
        elif (holder := leases.live_holder(pending.engine_key)) is not None:
            plan.kept_multipart.append((pending, f"being built/uploaded by {holder.holder}"))
        else:
            plan.multipart.append(pending)
    return plan


def _served_by(markers: list[InUseMarker]) -> str:
    first = markers[0]
    more = f" and {len(markers) - 1} more" if len(markers) > 1 else ""
    return f"in use by {first.serving} (in-use marker renewed {first.age_seconds:.0f}s ago){more}"


class _GcLease:
    """gc's hold on one key's build lease, renewed before it goes stale by gc's own (monotonic) clock.

    Every upload runs under the key's lease, so while gc holds it nobody publishes or uploads
    under that key. Before each delete gc asks :meth:`fresh`: past a third of the TTL since the
    last write it renews (``IfMatch``); a renewal refused means the lease was taken over (gc was
    paused past the TTL) and gc stops touching the key.
    """

    def __init__(self, leases: BuildLeases, lease: Lease) -> None:
        self.leases, self.lease, self.since = leases, lease, time.monotonic()

    def fresh(self) -> bool:
        if time.monotonic() - self.since < self.leases.ttl / 3:
            return True
        renewed = self.leases.renew(self.lease)
        if renewed is None:
            return False
        self.lease, self.since = renewed, time.monotonic()
        return True


def _writes_to_store(plan: GcPlan) -> bool:
    """Whether carrying out ``plan`` writes to the store at all."""
    return bool(plan.engines or plan.uploads or plan.multipart or plan.lapsed_markers)


def run_gc(store: EngineStore, plan: GcPlan, *, dry_run: bool, lease_seconds: float = 300) -> str:
    """Carry out (or, with ``dry_run``, only describe) a :class:`GcPlan`; return the report.

    The plan may be stale by now: each key is acted on only under its build lease (a key whose
    lease someone else holds is skipped), a manifest is deleted only if it is still the version
    planned with (``IfMatch``), and then only the files of the upload it named; an abandoned
    upload only if the manifest does not name it now, and only the objects listed in the plan.
    A live in-use marker that appeared since the plan keeps its engine.

    Raises:
        EngineStoreError: the store does not enforce conditional writes (unless ``cache.single_writer``):
            gc's safety rests on them, so it deletes nothing there.
        EngineStoreError / ClientError / BotoCoreError: the store refused or did not answer.
    """
    if not dry_run and _writes_to_store(plan):
        require_conditional_writes(store)
    verb = "would remove" if dry_run else "removed"
    lines: list[str] = []
    removed_engines: list[StoredManifest] = []
    removed_uploads: list[AbandonedUpload] = []
    aborted = 0
    leases = BuildLeases(store, lease_seconds, purpose="nimflow cache gc")
    use = EngineUse(store)
    for key in _keys_in(plan):
        engines = [s for s in plan.engines if s.manifest["engine_key"] == key]
        uploads = [u for u in plan.uploads if u.engine_key == key]
        multipart = [m for m in plan.multipart if m.engine_key == key]
        if dry_run:
            lines += [_engine_line(verb, s) for s in engines] + [_upload_line(verb, u) for u in uploads]
            lines += [_multipart_line(verb, m) for m in multipart]
            removed_engines += engines
            removed_uploads += uploads
            aborted += len(multipart)
            continue
        got = leases.try_acquire(key)
        if isinstance(got, LeaseHolder):
            lines.append(f"kept {key[:12]}: being built/uploaded by {got.holder} (lease renewed {got.age_seconds:.0f}s ago)")
            continue
        held = _GcLease(leases, got)
        try:
            for stored in engines:
                if (live := use.live(key)):
                    lines.append(f"kept engine {key[:12]}: {_served_by(live)}")
                elif not held.fresh():
                    lines.append(f"kept engine {key[:12]}: gc lost the build lease (paused past its TTL); left alone")
                elif not store.delete_manifest(stored):
                    lines.append(f"kept engine {key[:12]}: its manifest was replaced or removed since the plan; left alone")
                else:
                    # Unpublished: nobody restores it now, and nobody uploads under the key while gc holds the lease.
                    store.delete_objects(store.upload_object_keys(key, stored.manifest["upload_id"]))
                    lines.append(_engine_line(verb, stored))
                    removed_engines.append(stored)
            for upload in uploads:
                current = _current_upload(store, key)
                if current == upload.upload_id or current is _REFUSED:
                    why = "published since the plan" if current == upload.upload_id else "the key's manifest is refused"
                    lines.append(f"kept upload {key[:12]}/{upload.upload_id}: {why}")
                elif not held.fresh():
                    lines.append(f"kept upload {key[:12]}/{upload.upload_id}: gc lost the build lease; left alone")
                else:
                    store.delete_objects(upload.object_keys)
                    lines.append(_upload_line(verb, upload))
                    removed_uploads.append(upload)
            for pending in multipart:
                if held.fresh():
                    store.abort_incomplete(pending)
                    lines.append(_multipart_line(verb, pending))
                    aborted += 1
        finally:
            leases.release(held.lease)
    for marker in plan.lapsed_markers:
        if dry_run or use.remove_lapsed(marker):
            lines.append(f"{verb} lapsed in-use marker {marker.engine_key[:12]}/{marker.name} (renewed {marker.age_seconds:.0f}s ago)")
    for key, why in plan.kept_in_use:
        lines.append(f"kept engine {key[:12]}: {why}")
    for upload in plan.kept_in_progress:
        lines.append(f"kept upload {upload.engine_key[:12]}/{upload.upload_id}: recent or its build is still running")
    for pending, why in plan.kept_multipart:
        lines.append(f"kept incomplete multipart upload of {pending.object_key}: {why}")
    for refused in plan.refused:
        lines.append(f"refused {store.uri(refused.engine_key)}: never removed automatically; {_refusal(refused)}")
    freed = sum(sum(f["size"] for f in s.manifest["files"]) for s in removed_engines) + sum(u.bytes for u in removed_uploads)
    lines.append(f"{verb} {len(removed_engines)} engine(s), {len(removed_uploads)} abandoned upload(s) and "
                 f"{aborted} incomplete multipart upload(s), {_size(freed)}" + (" (dry run: nothing was deleted)" if dry_run else ""))
    return "\n".join(lines)


_REFUSED = object()


def _current_upload(store: EngineStore, key: str) -> object:
    """The upload id the key's manifest names now; None without one; :data:`_REFUSED` for a refused manifest."""
    try:
        stored = store.stored_manifest(key)
    except ManifestRefused:
        return _REFUSED
    return None if stored is None else stored.manifest["upload_id"]


def _keys_in(plan: GcPlan) -> list[str]:
    """The keys a plan touches, each once, in plan order."""
    keys = [s.manifest["engine_key"] for s in plan.engines] + [u.engine_key for u in plan.uploads]
    keys += [m.engine_key for m in plan.multipart if m.engine_key is not None]
    return list(dict.fromkeys(keys))


def _engine_line(verb: str, stored: StoredManifest) -> str:
    row = entry_row(stored.manifest, stored.last_modified)
    return (f"{verb} engine {row['KEY']}  {row['MODEL']}@{row['REVISION']}  {row['GPU']}  {row['SIZE']}  "
            f"published {row['PUBLISHED']}")


def _upload_line(verb: str, upload: AbandonedUpload) -> str:
    return (f"{verb} abandoned upload {upload.engine_key[:12]}/{upload.upload_id}  {upload.objects} objects, "
            f"{_size(upload.bytes)}, last written {upload.last_modified:%Y-%m-%dT%H:%M:%SZ}")


def _multipart_line(verb: str, pending: IncompleteUpload) -> str:
    verb = {"would remove": "would abort", "removed": "aborted"}[verb]
    return f"{verb} incomplete multipart upload of {pending.object_key} (started {pending.initiated:%Y-%m-%dT%H:%M:%SZ})"


def clean_scratch(cache_dir: Path, older_than: timedelta, *, dry_run: bool) -> list[str]:
    """Remove (or, with ``dry_run``, only name) the scratch directories killed runs left under ``cache_dir``; the report lines."""
    lines = []
    for found in remove_stale_scratch(cache_dir, older_than.total_seconds(), remove=not dry_run):
        verb = ("would remove" if dry_run else "removed") if found.removed else "kept"
        lines.append(f"{verb} scratch directory {found.path}: {found.reason}")
    return lines
