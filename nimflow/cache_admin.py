"""Looking after the engine store: list entries, explain keys, remove old entries and abandoned uploads.

Backs ``nimflow cache ls``, ``nimflow cache explain`` and ``nimflow cache gc``. Entries are listed
like NIM's ``list-model-profiles``: one line per engine with what it is for (model, revision,
precision, parallelism, GPU, TensorRT-LLM version), its size and age.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import docker

from nimflow.build_lease import BuildLeases
from nimflow.containers import LABEL_PREFIX
from nimflow.engine_key import differing_inputs
from nimflow.engine_store import AbandonedUpload, EngineStore
from nimflow.errors import ConfigError, EngineStoreError, Problem

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


def entry_row(manifest: dict[str, Any]) -> dict[str, str]:
    """One `cache ls` row of a manifest."""
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
        "CREATED": str(manifest.get("created_at", "?")),
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
    """The `cache ls` listing of a store."""
    manifests = store.manifests()
    if not manifests:
        return f"No engines in {store.cache.uri}"
    return f"Engines in {store.cache.uri} ({len(manifests)}):\n" + format_table([entry_row(m) for m in manifests])


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


@dataclass
class GcPlan:
    """What `cache gc` removes and keeps, and why."""

    engines: list[dict[str, Any]] = field(default_factory=list)
    uploads: list[AbandonedUpload] = field(default_factory=list)
    kept_in_use: list[tuple[str, str]] = field(default_factory=list)
    kept_in_progress: list[AbandonedUpload] = field(default_factory=list)


def plan_gc(
    store: EngineStore,
    *,
    keep: int | None,
    older_than: timedelta | None,
    abandoned_after: timedelta,
    in_use: dict[str, str],
    now: datetime | None = None,
    lease_seconds: float = 300,
) -> GcPlan:
    """Decide what `cache gc` removes.

    Args:
        keep: keep the N newest engines of each (model, GPU); older ones go.
        older_than: remove engines created longer ago than this.
        abandoned_after: uploads no manifest names are removed once untouched this long (an
            upload still being written is recent, or its key has a live build lease).
        in_use: engine keys served by running containers on this host: never removed.
    """
    now = now or datetime.now(timezone.utc)
    plan = GcPlan()
    groups: dict[tuple[str, str], int] = {}
    manifests = store.manifests()
    for manifest in manifests:  # newest first
        row = entry_row(manifest)
        group = (row["MODEL"], row["GPU"])
        groups[group] = groups.get(group, 0) + 1
        created = _parse_time(manifest.get("created_at"))
        expired = older_than is not None and created is not None and now - created > older_than
        surplus = keep is not None and groups[group] > keep
        if not (expired or surplus):
            continue
        if manifest["engine_key"] in in_use:
            plan.kept_in_use.append((manifest["engine_key"], in_use[manifest["engine_key"]]))
        else:
            plan.engines.append(manifest)
    removed_keys = {m["engine_key"] for m in plan.engines}
    leases = BuildLeases(store, lease_seconds)
    for upload in store.abandoned_uploads(manifests):
        if upload.engine_key in removed_keys:
            continue  # goes with its engine
        if now - upload.last_modified < abandoned_after or leases.live_holder(upload.engine_key) is not None:
            plan.kept_in_progress.append(upload)
        else:
            plan.uploads.append(upload)
    return plan


def _parse_time(text: Any) -> datetime | None:
    try:
        return datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def run_gc(store: EngineStore, plan: GcPlan, *, dry_run: bool) -> str:
    """Carry out (or, with ``dry_run``, only describe) a :class:`GcPlan`; return the report."""
    verb = "would remove" if dry_run else "removed"
    lines = []
    for manifest in plan.engines:
        row = entry_row(manifest)
        if not dry_run:
            store.delete_engine(manifest["engine_key"])
        lines.append(f"{verb} engine {row['KEY']}  {row['MODEL']}@{row['REVISION']}  {row['GPU']}  {row['SIZE']}  created {row['CREATED']}")
    for upload in plan.uploads:
        if not dry_run:
            store.delete_upload(upload.engine_key, upload.upload_id)
        lines.append(f"{verb} abandoned upload {upload.engine_key[:12]}/{upload.upload_id}  {upload.objects} objects, "
                     f"{_size(upload.bytes)}, last written {upload.last_modified:%Y-%m-%dT%H:%M:%SZ}")
    for key, container in plan.kept_in_use:
        lines.append(f"kept engine {key[:12]}: in use by running container {container}")
    for upload in plan.kept_in_progress:
        lines.append(f"kept upload {upload.engine_key[:12]}/{upload.upload_id}: recent or its build is still running")
    freed = sum(sum(f["size"] for f in m.get("files", [])) for m in plan.engines) + sum(u.bytes for u in plan.uploads)
    lines.append(f"{verb} {len(plan.engines)} engine(s) and {len(plan.uploads)} abandoned upload(s), {_size(freed)}"
                 + (" (dry run: nothing was deleted)" if dry_run else ""))
    return "\n".join(lines)
