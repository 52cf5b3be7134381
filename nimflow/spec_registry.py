"""Which spec a name, an event or a UI run means: the specs directory, looked up by the specs' names.

Every ``*.yaml`` directly in the specs directory (``NIMFLOW_SPECS_DIR``, default ``configs`` relative to
the working directory; subdirectories such as ``configs/examples`` are not scanned) is one hosted model,
known by its ``name`` field. A checkpoint event names its source with a resource id (:func:`source_id_hf`,
:func:`source_id_s3`, defined in :mod:`nimflow.spec` and re-exported here); :func:`specs_watching` says
which specs watch it. :func:`host_overrides` applies what the worker's host sets (``NIMFLOW_CACHE_DIR``,
``NIMFLOW_GPUS``) to a spec.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from nimflow.errors import ConfigError, Problem
from nimflow.settings import get_settings
from nimflow.spec import GpuIds, HostingSpec, load_spec, source_id_hf, source_id_s3, update_spec

__all__ = [
    "find_specs",
    "host_overrides",
    "load_named_spec",
    "source_id_hf",
    "source_id_s3",
    "spec_names",
    "specs_watching",
]

logger = logging.getLogger(__name__)

_GPU_IDS: TypeAdapter[Any] = TypeAdapter(GpuIds)


def _specs_dir(directory: Path | None) -> Path:
    return directory if directory is not None else get_settings().specs_dir


def _load_all(directory: Path | None) -> dict[str, tuple[Path, HostingSpec]]:
    """Every loadable spec directly in the directory, by name.

    Raises:
        ConfigError: the directory does not exist, or two files define the same name.
    """
    folder = _specs_dir(directory)
    if not folder.is_dir():
        raise ConfigError(
            str(folder),
            [Problem("(directory)", "no such specs directory; set NIMFLOW_SPECS_DIR or run from the directory holding `configs/`")],
        )
    found: dict[str, tuple[Path, HostingSpec]] = {}
    for path in sorted(folder.glob("*.yaml")):
        if not path.is_file():
            continue
        try:
            spec = load_spec(path)
        except ConfigError as exc:
            logger.warning("skipping %s: it is not a valid hosting spec:\n%s", path, exc)
            continue
        if spec.name in found:
            other = found[spec.name][0]
            raise ConfigError(
                str(folder),
                [Problem("name", f"{spec.name!r} is the name of both {other.name} and {path.name}; "
                                 "each spec needs its own name (rename one, or move it out of the directory)")],
            )
        found[spec.name] = (path, spec)
    return found


def find_specs(directory: Path | None = None) -> dict[str, Path]:
    """The specs in the specs directory: every ``*.yaml`` directly in it, keyed by its ``name`` field.

    A file that does not load as a spec is skipped, with a warning logged.

    Args:
        directory: the specs directory; default ``settings.specs_dir`` (``NIMFLOW_SPECS_DIR`` or ``configs``).

    Raises:
        ConfigError: the directory does not exist, or two files define the same name (naming both files).
    """
    return {name: path for name, (path, _) in _load_all(directory).items()}


def spec_names(directory: Path | None = None) -> list[str]:
    """The names of the specs in the specs directory, sorted.

    Raises:
        ConfigError: as :func:`find_specs`.
    """
    return sorted(find_specs(directory))


def load_named_spec(name: str, directory: Path | None = None) -> HostingSpec:
    """The spec called ``name`` in the specs directory.

    Raises:
        ConfigError: no spec has that name (listing the names that exist and the directory), or as
            :func:`find_specs`.
    """
    specs = _load_all(directory)
    if name not in specs:
        folder = _specs_dir(directory)
        known = ", ".join(sorted(specs)) or "(none)"
        raise ConfigError(
            "spec",
            [Problem("spec", f"no spec named {name!r} in {folder}; the specs there are: {known} "
                             "(a spec's name is its `name` field; set NIMFLOW_SPECS_DIR for another directory)")],
        )
    return specs[name][1]


def host_overrides(spec: HostingSpec) -> HostingSpec:
    """``spec`` with what this host sets: ``NIMFLOW_CACHE_DIR`` and ``NIMFLOW_GPUS``.

    ``NIMFLOW_CACHE_DIR`` replaces ``deploy.cache_dir`` (resolved against the working directory).
    ``NIMFLOW_GPUS`` replaces ``deploy.gpus``, and ``build.gpus`` where the build has GPUs.

    Raises:
        ConfigError: ``NIMFLOW_GPUS`` is not a GPU selection, or the spec with it is invalid (e.g. the
            build has another number of ranks), naming the variable.
    """
    settings = get_settings()
    changes: dict[str, Any] = {}
    source: list[str] = []
    if settings.host_cache_dir is not None:
        changes["deploy.cache_dir"] = settings.host_cache_dir.expanduser().resolve()
        source.append("NIMFLOW_CACHE_DIR")
    if settings.host_gpus is not None:
        try:
            gpus = _GPU_IDS.validate_python(settings.host_gpus)
        except ValidationError as exc:
            message = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise ConfigError("NIMFLOW_GPUS", [Problem("NIMFLOW_GPUS", f"{message} (e.g. NIMFLOW_GPUS=0,1)")]) from None
        changes["deploy.gpus"] = gpus
        if spec.build is not None and spec.build.gpus is not None:
            changes["build.gpus"] = gpus
        source.append("NIMFLOW_GPUS")
    if not changes:
        return spec
    return update_spec(spec, changes, " and ".join(source))


def specs_watching(source_id: str, directory: Path | None = None) -> list[str]:
    """The names (sorted) of the specs whose ``watch`` section watches ``source_id``.

    Args:
        source_id: a resource id such as ``nimflow.source.hf.org/repo`` or ``nimflow.source.s3.bucket/prefix``.
        directory: the specs directory; default ``settings.specs_dir``.

    Raises:
        ConfigError: as :func:`find_specs`.
    """
    return sorted(name for name, (_, spec) in _load_all(directory).items() if source_id in spec.source_ids)
