"""What one run of ``host_model`` may change in a spec: the revision, a checkpoint, and a few overrides.

These are the flow's parameters beyond the spec's name. :class:`Overrides` is a pydantic model, so
Prefect's UI renders it as a grouped form with these titles and descriptions; :func:`apply_run_parameters`
turns the parameters into a validated spec, or a :class:`~nimflow.errors.ConfigError` naming the parameter.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from nimflow.containment import safe_relative
from nimflow.errors import ConfigError, PermanentError, Problem
from nimflow.spec import SPEC_NAME, FinetuneSpec, HostingSpec, load_spec, update_spec
from nimflow.spec_registry import host_overrides, load_named_spec, spec_names

_CHECKPOINT_SCHEMES = ("s3://", "hf://")


def _none_as(default: object) -> BeforeValidator:
    """Take ``None`` (a Python caller's, or an older client's, "not given") as the field's plain default.

    The UI's form shows a field typed ``X | None`` as a choice of types with a "None" toggle; typed
    plain (``str`` with default ``""``) it is a plain field with its default. ``None`` still means "not
    given" to Python callers, and a before-validator leaves the JSON schema as the plain type's.
    """
    return BeforeValidator(lambda value: default if value is None else value)


#: The rollout strategy override that keeps the spec's ``rollout.strategy``.
SPEC_STRATEGY: Literal["spec"] = "spec"


class Overrides(BaseModel):
    """Changes for this run only; the spec file is not changed. Fields left at their defaults keep the spec's value."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="Overrides")

    rollout_strategy: Annotated[Literal["spec", "auto", "blue-green", "recreate"], _none_as(SPEC_STRATEGY)] = Field(
        SPEC_STRATEGY,
        title="Rollout strategy",
        description="Replaces rollout.strategy: `blue-green` starts the new container beside the old one; "
        "`recreate` stops the old one first; `auto` picks by GPUs. `spec`: the spec's strategy.",
    )
    verify_deadline_seconds: Annotated[float, _none_as(0.0)] = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        title="Verify deadline (seconds)",
        description="Replaces verify.deadline_seconds: how long the new NIM may take to become ready. "
        "0: the spec's deadline.",
    )
    force: bool = Field(
        False,
        title="Force an incompatible engine",
        description="Sets deploy.force: deploy an engine even where this host's GPU or TensorRT-LLM version "
        "differs from the one it was built for. Off: the spec's setting.",
    )

    def changes(self) -> dict[str, Any]:
        """The spec fields these overrides replace, by dotted path."""
        changes: dict[str, Any] = {}
        if self.rollout_strategy != SPEC_STRATEGY:
            changes["rollout.strategy"] = self.rollout_strategy
        if self.verify_deadline_seconds:
            changes["verify.deadline_seconds"] = self.verify_deadline_seconds
        if self.force:
            changes["deploy.force"] = True
        return changes


def _check_under_watch_prefix(spec: HostingSpec, checkpoint_uri: str) -> None:
    """Refuse a deployment run's checkpoint that is not a directory under the spec's ``watch.s3_prefix``.

    Whoever can emit an event or start a deployment run chooses ``checkpoint_uri``; the spec's author
    chose the prefix. The part after the prefix passes the containment rule (no ``..``, ``.`` or empty
    components), so ``s3://b/p/../other/`` is not "under" ``s3://b/p/``; the prefix ends in ``/``,
    so ``s3://b/p-evil/`` is not either.

    Raises:
        ConfigError: naming ``checkpoint_uri``, the URI and the prefix (or that the spec has none).
    """
    prefix = spec.watch.s3_prefix if spec.watch is not None else None

    def refuse(why: str) -> ConfigError:
        return ConfigError("checkpoint_uri", [Problem("checkpoint_uri", f"{checkpoint_uri!r}: {why}")])

    if prefix is None:
        raise refuse(f"the spec {spec.name!r} has no watch.s3_prefix, so a run started by a deployment (the UI, "
                     "an event, a schedule) takes no checkpoint_uri; set watch.s3_prefix in the spec, or set "
                     "finetune.path in the spec itself")
    rest = checkpoint_uri[len(prefix):] if checkpoint_uri.startswith(prefix) else ""
    try:
        # Normalising must change nothing: `./` or `//` would be other S3 keys than the path they spell.
        contained = bool(rest) and safe_relative(rest, source="checkpoint_uri", error=PermanentError) == rest.rstrip("/")
    except PermanentError:
        contained = False
    if not contained:
        raise refuse(f"a run started by a deployment (the UI, an event, a schedule) only takes a checkpoint "
                     f"directory under the spec's watch.s3_prefix {prefix} (no '..', '.' or empty parts); "
                     "announce checkpoints under that prefix, or change watch.s3_prefix in the spec")


def checkpoint_changes(spec: HostingSpec, checkpoint_uri: str, *, deployment_run: bool = False) -> dict[str, Any]:
    """The spec fields a fine-tune checkpoint from an event replaces: ``finetune.path`` (and its S3 endpoint).

    Where the checkpoint lies under ``watch.s3_prefix`` and ``finetune.endpoint_url`` is empty, the
    watch section's ``endpoint_url`` is used.

    Args:
        deployment_run: the run was started by a deployment (UI, event, schedule): the URI must then be a
            directory under the spec's ``watch.s3_prefix``. From the CLI or Python any ``s3://`` or
            ``hf://`` checkpoint is taken.

    Raises:
        ConfigError: the spec has no ``finetune`` section, the URI is not a valid ``s3://`` or ``hf://`` URI,
            or (``deployment_run``) it is not under ``watch.s3_prefix``.
    """
    if spec.finetune is None:
        raise ConfigError(
            "checkpoint_uri",
            [Problem("checkpoint_uri", f"the spec {spec.name!r} has no `finetune` section, so there is no "
                                       "finetune.path to replace; add one, or run without checkpoint_uri")],
        )
    if not isinstance(checkpoint_uri, str) or not checkpoint_uri.startswith(_CHECKPOINT_SCHEMES):
        raise ConfigError(
            "checkpoint_uri",
            [Problem("checkpoint_uri", f"{checkpoint_uri!r}: give an s3://bucket/prefix/ or hf://org/repo@revision URI")],
        )
    try:
        FinetuneSpec.model_validate({**spec.finetune.model_dump(), "path": checkpoint_uri})
    except ValidationError as exc:
        message = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise ConfigError("checkpoint_uri", [Problem("checkpoint_uri", message)]) from None
    if deployment_run:
        _check_under_watch_prefix(spec, checkpoint_uri)
    changes: dict[str, Any] = {"finetune.path": checkpoint_uri}
    watch = spec.watch
    if (watch is not None and watch.s3_prefix is not None and watch.endpoint_url is not None
            and spec.finetune.endpoint_url is None and checkpoint_uri.startswith(watch.s3_prefix)):
        changes["finetune.endpoint_url"] = watch.endpoint_url
    return changes


def apply_run_parameters(
    spec: HostingSpec,
    *,
    revision: str | None = None,
    checkpoint_uri: str | None = None,
    overrides: Overrides | None = None,
    deployment_run: bool = False,
) -> HostingSpec:
    """``spec`` as this run uses it: revision, checkpoint and overrides applied, validated again.

    Args:
        spec: the spec as loaded.
        revision: replaces ``source.revision`` (e.g. the commit a checkpoint event names).
        checkpoint_uri: replaces ``finetune.path`` (see :func:`checkpoint_changes`).
        overrides: see :class:`Overrides`.
        deployment_run: the run was started by a deployment (see :func:`checkpoint_changes`).

    Raises:
        ConfigError: a parameter does not fit the spec, naming it and the fix.
    """
    changes: dict[str, Any] = {}
    if revision:
        if spec.source.repo_id is None:
            raise ConfigError(
                "revision",
                [Problem("revision", f"the spec {spec.name!r} has no source.repo_id, so there is no revision to choose; "
                                     "run without revision")],
            )
        changes["source.revision"] = revision
    if checkpoint_uri:
        changes.update(checkpoint_changes(spec, checkpoint_uri, deployment_run=deployment_run))
    if overrides is not None:
        changes.update(overrides.changes())
    if not changes:
        return spec
    return update_spec(spec, changes, "run parameters")


def resolve_run_spec(
    spec: str,
    *,
    revision: str | None = None,
    checkpoint_uri: str | None = None,
    overrides: Overrides | None = None,
    deployment_run: bool = False,
) -> HostingSpec:
    """The spec a run uses: found by name (or read from a `.yaml`/`.yml` path), with the run's parameters
    and this host's settings (NIMFLOW_CACHE_DIR, NIMFLOW_GPUS) applied.

    Args:
        deployment_run: the run was started by a deployment (the UI, an event, a schedule), whose
            parameters anyone with access to the Prefect API chooses: ``spec`` must then name a spec in
            the specs directory (never a file), and ``checkpoint_uri`` lie under its ``watch.s3_prefix``.
            Paths stay a convenience of the CLI and of Python callers.

    Raises:
        ConfigError: unknown name, invalid file, a path from a deployment run, or a parameter or host
            setting that does not fit the spec.
    """
    if deployment_run:
        loaded = _named_spec_only(spec)
    else:
        loaded = load_spec(spec) if spec.endswith((".yaml", ".yml")) else load_named_spec(spec)
    resolved = apply_run_parameters(loaded, revision=revision, checkpoint_uri=checkpoint_uri, overrides=overrides,
                                    deployment_run=deployment_run)
    return host_overrides(resolved)


def _named_spec_only(spec: object) -> HostingSpec:
    """The spec a deployment run names: a spec's ``name`` in the specs directory, never a path.

    Raises:
        ConfigError: naming the ``spec`` parameter: not a spec name (a path, say), or no spec has it.
    """
    if not isinstance(spec, str) or not SPEC_NAME.match(spec):
        raise ConfigError("spec", [Problem(
            "spec",
            f"{str(spec)[:200]!r} is not a spec name: a run started by a deployment (the UI, an event, a schedule) "
            "names its spec by the `name` field of a YAML file in the specs directory (NIMFLOW_SPECS_DIR), never "
            f"by a path; the specs there are: {', '.join(_names_or_none())}. Put the file in the specs directory "
            "and pass its name, or run a file from the host itself with `nimflow host PATH`",
        )])
    return load_named_spec(spec)


def _names_or_none() -> list[str]:
    """The spec names for a message; ``(none)`` where the directory has none or cannot be read."""
    try:
        return spec_names() or ["(none)"]
    except ConfigError:
        return ["(none: the specs directory cannot be read)"]


# --- the flow's parameters, as the Prefect UI renders them ---------------------------------------


def _known_specs() -> dict[str, object]:
    """The JSON-schema addition that makes the `spec` parameter a dropdown of the specs that exist now.

    Computed at import, so `prefect deploy` records the names in the deployment's parameter schema.
    Without a specs directory (or with a broken one) there is no dropdown; the run names the problem.
    """
    try:
        names = spec_names()
    except ConfigError as exc:
        logging.getLogger(__name__).warning("the UI offers no list of specs: %s", exc)
        return {}
    return {"enum": names} if names else {}


def _ui(title: str, description: str, **extra: Any) -> Any:
    """A parameter's title and description for Prefect's UI form.

    Prefect's ``parameter_schema`` sets every parameter's title to its Python name and its description
    to the docstring's, over the ``Field``'s; ``json_schema_extra`` is applied last, so the UI's words
    go there too.
    """
    return Field(title=title, description=description, json_schema_extra={"title": title, "description": description, **extra})


SpecName = Annotated[
    str,
    _ui("Model", "The hosting spec to run, by its `name`: a YAML file in the specs directory (NIMFLOW_SPECS_DIR, "
        "default `configs/`). From Python or `nimflow host`, a path to a `.yaml` file works too.", **_known_specs()),
]
#: host_model's overrides when none are given: every field keeps the spec's value.
NO_OVERRIDES = Overrides()

# The optional parameters are plain types with an empty default, so the UI shows plain fields (module
# `_none_as`); None from a Python caller still means "not given".
Revision = Annotated[
    str,
    _none_as(""),
    _ui("Revision", "Replaces source.revision: a branch, tag or commit sha (e.g. the commit a checkpoint event "
        "names). Empty: the spec's revision."),
]
CheckpointUri = Annotated[
    str,
    _none_as(""),
    _ui("Fine-tuned checkpoint", "Replaces finetune.path for this run: an s3://bucket/prefix/ or "
        "hf://org/repo@revision checkpoint (e.g. the one a checkpoint event names). Empty: the spec's."),
]
RunOverrides = Annotated[
    Overrides,
    _none_as(NO_OVERRIDES),
    _ui("Overrides", "Rollout strategy, verify deadline and force, for this run only. Defaults: the spec's settings."),
]

# --- the parameters of the event-triggered deployment (host-on-checkpoint) ------------------------
# Its runs are created by the `nimflow.checkpoint.landed` trigger from event fields, with Prefect's
# parameter schema enforced: an event whose rendered parameters do not fit never becomes a flow run
# (Prefect records `prefect.automation.action.failed`). Unlike `SpecName`, no list of names is frozen
# into this schema at deploy time: a spec added since (or present only on the worker's host) still
# runs, and the flow refuses unknown names. Enforcement is a first filter, not the boundary: a client
# of the API can create a run with `enforce_parameter_schema=False`; `resolve_run_spec` checks again.

#: JSON Schema's spelling of :data:`~nimflow.spec.SPEC_NAME` (ECMA regex: `$`, not `\Z`).
_SPEC_NAME_SCHEMA = {"pattern": "^[a-z0-9][a-z0-9-]{0,62}$", "maxLength": 63}

EventSpecName = Annotated[
    str,
    _ui("Model", "The hosting spec to run, by its `name` (the event's `nimflow.spec` resource label): a YAML "
        "file in the specs directory (NIMFLOW_SPECS_DIR, default `configs/`). Never a path.", **_SPEC_NAME_SCHEMA),
]
# Plain `str` with an empty default, as host_model's: the trigger renders a missing event field as ""
# (`default('')`, nimflow/checkpoint_trigger.py), and the enforced schema's patterns accept "" (the UI form shows plain fields, no
# "None" toggles). None from a Python caller, or from an automation made before this, still means "not given".
EventRevision = Annotated[
    str,
    _none_as(""),
    _ui("Revision", "Replaces source.revision: the commit a checkpoint event names. Empty: the spec's revision.",
        maxLength=255),
]
EventCheckpointUri = Annotated[
    str,
    _none_as(""),
    _ui("Fine-tuned checkpoint", "Replaces finetune.path for this run: an s3:// checkpoint directory under the "
        "spec's watch.s3_prefix (the one a checkpoint event names). Empty: the spec's.",
        pattern="^(s3://|$)", maxLength=1024),
]

# --- the checkpoint watcher's parameter -------------------------------------------------------------

#: The watcher's ``specs`` as a plain list field (no "None" toggle): empty means every spec with a
#: ``watch`` section. A tuple, so the default is immutable (one default object serves every call);
#: the schema is an array of strings either way, and Prefect passes a given list through as a tuple.
WatchedSpecs = Annotated[
    tuple[str, ...],
    _none_as(()),
    _ui("Specs", "Spec names (their `name` field) in the specs directory to watch in this pass. "
        "Empty: every spec with a `watch` section."),
]
