"""What one run of ``host_model`` may change in a spec: the revision, a checkpoint, and a few overrides.

These are the flow's parameters beyond the spec's name. :class:`Overrides` is a pydantic model, so
Prefect's UI renders it as a grouped form with these titles and descriptions; :func:`apply_run_parameters`
turns the parameters into a validated spec, or a :class:`~nimflow.errors.ConfigError` naming the parameter.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nimflow.errors import ConfigError, Problem
from nimflow.spec import FinetuneSpec, HostingSpec, load_spec, update_spec
from nimflow.spec_registry import host_overrides, load_named_spec, spec_names

_CHECKPOINT_SCHEMES = ("s3://", "hf://")


class Overrides(BaseModel):
    """Changes for this run only; the spec file is not changed. Empty fields keep the spec's value."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="Overrides")

    rollout_strategy: Literal["auto", "blue-green", "recreate"] | None = Field(
        None,
        title="Rollout strategy",
        description="Replaces rollout.strategy: `blue-green` starts the new container beside the old one; "
        "`recreate` stops the old one first; `auto` picks by GPUs. Empty: the spec's strategy.",
    )
    verify_deadline_seconds: float | None = Field(
        None,
        gt=0,
        title="Verify deadline (seconds)",
        description="Replaces verify.deadline_seconds: how long the new NIM may take to become ready. "
        "Empty: the spec's deadline.",
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
        if self.rollout_strategy is not None:
            changes["rollout.strategy"] = self.rollout_strategy
        if self.verify_deadline_seconds is not None:
            changes["verify.deadline_seconds"] = self.verify_deadline_seconds
        if self.force:
            changes["deploy.force"] = True
        return changes


def checkpoint_changes(spec: HostingSpec, checkpoint_uri: str) -> dict[str, Any]:
    """The spec fields a fine-tune checkpoint from an event replaces: ``finetune.path`` (and its S3 endpoint).

    Where the checkpoint lies under ``watch.s3_prefix`` and ``finetune.endpoint_url`` is empty, the
    watch section's ``endpoint_url`` is used.

    Raises:
        ConfigError: the spec has no ``finetune`` section, or the URI is not a valid ``s3://`` or ``hf://`` URI.
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
) -> HostingSpec:
    """``spec`` as this run uses it: revision, checkpoint and overrides applied, validated again.

    Args:
        spec: the spec as loaded.
        revision: replaces ``source.revision`` (e.g. the commit a checkpoint event names).
        checkpoint_uri: replaces ``finetune.path`` (see :func:`checkpoint_changes`).
        overrides: see :class:`Overrides`.

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
        changes.update(checkpoint_changes(spec, checkpoint_uri))
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
) -> HostingSpec:
    """The spec a run uses: found by name (or read from a `.yaml`/`.yml` path), with the run's parameters
    and this host's settings (NIMFLOW_CACHE_DIR, NIMFLOW_GPUS) applied.

    Raises:
        ConfigError: unknown name, invalid file, or a parameter or host setting that does not fit the spec.
    """
    loaded = load_spec(spec) if spec.endswith((".yaml", ".yml")) else load_named_spec(spec)
    resolved = apply_run_parameters(loaded, revision=revision, checkpoint_uri=checkpoint_uri, overrides=overrides)
    return host_overrides(resolved)


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
Revision = Annotated[
    str | None,
    _ui("Revision", "Replaces source.revision: a branch, tag or commit sha (e.g. the commit a checkpoint event "
        "names). Empty: the spec's revision."),
]
CheckpointUri = Annotated[
    str | None,
    _ui("Fine-tuned checkpoint", "Replaces finetune.path for this run: an s3://bucket/prefix/ or "
        "hf://org/repo@revision checkpoint (e.g. the one a checkpoint event names). Empty: the spec's."),
]
RunOverrides = Annotated[
    Overrides | None,
    _ui("Overrides", "Rollout strategy, verify deadline and force, for this run only. Empty: the spec's settings."),
]
