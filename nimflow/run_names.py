"""Names a person reads in the Prefect UI: flow run names and artifact keys.

A run list of ``effective-tiger`` and ``clever-otter`` says nothing; ``tiny-llama-demo@706dadd`` says
which model and which revision a run hosts. Progress artifacts keyed ``nimflow-download`` would be
shared by every model (each run's artifact a new version of one key), so they carry the spec's name,
and the reconcile report carries the host's.

The run-name functions are given to ``@flow(flow_run_name=...)``: Prefect calls them with no
arguments once the run's parameters are validated (``prefect.runtime.flow_run.parameters``); an
exception there would crash the run, so they never raise.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import PurePosixPath

#: Prefect's rule for artifact keys (prefect.types.names): lowercase letters, digits and dashes.
_NOT_KEY_CHARACTERS = re.compile(r"[^a-z0-9]+")
_COMMIT_SHA = re.compile(r"^[0-9a-f]{12,64}$")
#: A readable part stays short: a run list shows the first few dozen characters.
_PART_LENGTH = 40
_KEY_LENGTH = 120


def key_part(text: str) -> str:
    """``text`` as a part of an artifact key: lowercase, runs of other characters as one dash.

    ``GPU-Host_01.example`` becomes ``gpu-host-01-example``; a spec name (already lowercase letters,
    digits and dashes) stays as it is.
    """
    return _NOT_KEY_CHARACTERS.sub("-", text.lower()).strip("-")


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key from ``parts``, joined by dashes, e.g. ``nimflow-download-tiny-llama-demo``.

    Empty parts are left out; the key is cut to a length the UI shows whole.
    """
    joined = "-".join(p for p in (key_part(part) for part in parts) if p)
    return joined[:_KEY_LENGTH].rstrip("-")


def _short(value: object) -> str:
    """A parameter's value as a short readable part; a commit sha as its first 7 characters."""
    text = " ".join(str(value).split())
    if _COMMIT_SHA.match(text):
        return text[:7]
    return text[:_PART_LENGTH]


def _spec_label(spec: object) -> str:
    """The spec as a run name shows it: its name, or a `.yaml` path's file name without the suffix."""
    text = str(spec)
    if text.endswith((".yaml", ".yml")):
        text = PurePosixPath(text.replace("\\", "/")).stem
    return _short(text) or "host-model"


def _checkpoint_label(uri: object) -> str:
    """The last part of a checkpoint URI: ``s3://ckpts/alpha/step-200/`` shows as ``step-200``."""
    parts = [p for p in str(uri).split("/") if p]
    return _short(parts[-1]) if parts else ""


def model_run_name(parameters: Mapping[str, object]) -> str:
    """A ``host_model`` run's name from its parameters: ``<spec>[@<revision>][+<checkpoint>]``.

    ``{"spec": "tiny-llama-demo", "revision": "706dadd1…"}`` is ``tiny-llama-demo@706dadd``; a
    checkpoint adds its last path part (``alpha+step-200``). The spec's own revision is not read here
    (the name is set before the spec is loaded): without a ``revision`` parameter the name is the
    spec's alone.
    """
    name = _spec_label(parameters.get("spec") or "")
    revision, checkpoint = parameters.get("revision"), parameters.get("checkpoint_uri")
    if revision:
        name += f"@{_short(revision)}"
    if checkpoint:
        name += f"+{_checkpoint_label(checkpoint)}"
    return name


def _parameters() -> Mapping[str, object]:
    from prefect.runtime import flow_run

    return flow_run.parameters


def _host() -> str:
    from nimflow.settings import get_settings

    return key_part(get_settings().host_name) or "host"


def host_model_run_name() -> str:
    """The running ``host_model`` (or ``host_on_checkpoint``) run's name; ``host-model`` if it cannot be told."""
    try:
        return model_run_name(_parameters())
    except Exception:  # noqa: BLE001 - a name is never worth a crashed run
        return "host-model"


def reconcile_run_name() -> str:
    """``reconcile-<host>``: which host's deployments a reconcile run looked after."""
    try:
        return f"reconcile-{_host()}"
    except Exception:  # noqa: BLE001 - a name is never worth a crashed run
        return "reconcile"


def watcher_run_name() -> str:
    """``watch-checkpoints-<host>``, or ``watch-checkpoints-<spec>,…`` for a pass over named specs."""
    try:
        specs = _parameters().get("specs")
        if isinstance(specs, (list, tuple)) and specs:
            return "watch-checkpoints-" + _short(",".join(str(s) for s in specs))
        return f"watch-checkpoints-{_host()}"
    except Exception:  # noqa: BLE001 - a name is never worth a crashed run
        return "watch-checkpoints"
