"""Guide §1: host another NIM-supported model with an existing NIM image and that model's manifest.

The recipe::

    FROM nvcr.io/nim/meta/llama-3.1-8b-instruct:latest
    COPY ./model_manifest_mistral7b.yaml /etc/nim/config/model_manifest.yaml   # where the image keeps its own
    ENV NIM_SERVED_MODEL_NAME=mistralai/mistral-7b-instruct-v0.3
    ENV NIM_MODEL_NAME=mistralai/mistral-7b-instruct-v0.3

The manifest is checked first (it must parse and have a profile for the model asked for), then
the image is derived with :func:`nimflow.derived_image.ensure_derived_image`, tagged by content so
an unchanged manifest is never rebuilt. ENTRYPOINT and CMD are inherited from the base image, so
the NIM starts exactly as the base would.

Manifest shapes (NVIDIA/k8s-nim-operator ``internal/nimparser`` test data):

* v1: a mapping of profile id -> ``{model: <name>, release, tags, workspace: !workspace {...}}``;
  real manifests carry custom YAML tags (``!workspace``, ``!name``), so plain ``safe_load`` refuses them.
* v2: ``schema_version: 2.x``, ``profiles: [{id, tags, workspace}]``; a profile names its model
  in ``model`` or in its tags (``model``/``model_name``) where it names one at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import docker
import yaml

from nimflow import bounded_yaml
from nimflow.bounded_yaml import BoundedSafeLoader
from nimflow.derived_image import derived_tag, ensure_derived_image
from nimflow.errors import ConfigError, Problem

logger = logging.getLogger(__name__)

#: Where the guide puts the manifest (NIM 1.1.0 docs): used when the image probe finds no manifest of
#: the base image's own (:func:`manifest_destination`); otherwise the base image's own is replaced.
MANIFEST_PATH = "/etc/nim/config/model_manifest.yaml"
#: Label on the derived image naming the model its manifest serves.
MODEL_LABEL = "nimflow.manifest-model"
FIELD = "source.manifest"


class _TolerantLoader(BoundedSafeLoader):
    """SafeLoader (alias expansion bounded) that reads any ``!tag`` as the plain value it decorates.

    NIM manifests tag nodes for NIM's own loader (``!workspace``, ``!name``); nimflow only reads
    model names and profile ids, so the tags are dropped rather than executed or refused.
    """


def _untagged(loader: BoundedSafeLoader, _suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_TolerantLoader.add_multi_constructor("!", _untagged)


@dataclass(frozen=True)
class ManifestSummary:
    """What nimflow needs to know about a model manifest."""

    schema: Literal["v1", "v2"]
    profiles: int
    models: tuple[str, ...]  # the model names the profiles declare, sorted; empty when none names one


def _problem(message: str, source: str) -> ConfigError:
    return ConfigError(source, [Problem(FIELD, message)])


def parse_manifest(text: str, *, where: str = "the manifest", source: str = "hosting spec") -> ManifestSummary:
    """Parse a ``model_manifest.yaml`` (v1 or v2) and summarise its profiles.

    Args:
        where: how to name the file in messages (its path).
        source: the spec the manifest came from, for :class:`ConfigError`.

    Raises:
        ConfigError: not YAML, or neither manifest shape, naming ``source.manifest``.
    """
    try:
        data = bounded_yaml.load(text, _TolerantLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise _problem(f"{where} is not valid YAML{at}: {getattr(exc, 'problem', None) or exc}", source) from None
    except ValueError as exc:  # a scalar PyYAML cannot build (`2001-99-99` as a date)
        raise _problem(f"{where} is not valid YAML: {exc}", source) from None
    except RecursionError:
        raise _problem(f"{where} is not valid YAML: nested too deeply", source) from None
    if not isinstance(data, dict) or not data:
        raise _problem(f"{where} is not a NIM model manifest (expected a mapping of profiles); take "
                       "model_manifest.yaml from the model's NIM image", source)
    if "schema_version" in data or "profiles" in data:
        profiles = data.get("profiles")
        if not isinstance(profiles, list) or not all(isinstance(p, dict) for p in profiles) or not profiles:
            raise _problem(f"{where} has schema_version {data.get('schema_version')!r} but no `profiles` list", source)
        names = set()
        for profile in profiles:
            tags = profile.get("tags") if isinstance(profile.get("tags"), dict) else {}
            for value in (profile.get("model"), tags.get("model"), tags.get("model_name")):
                if isinstance(value, str) and value:
                    names.add(value)
        return ManifestSummary("v2", len(profiles), tuple(sorted(names)))
    entries = {key: value for key, value in data.items() if isinstance(value, dict)}
    if len(entries) != len(data):
        odd = sorted(str(key) for key, value in data.items() if not isinstance(value, dict))[:5]
        raise _problem(f"{where} is not a v1 NIM model manifest: top-level keys {odd} are not profiles "
                       "(a profile id mapping to `model:`, `tags:`, `workspace:`)", source)
    names = {str(entry["model"]) for entry in entries.values() if entry.get("model")}
    if not names:
        raise _problem(f"{where}: no profile names a `model:`; it is not a v1 NIM model manifest", source)
    return ManifestSummary("v1", len(entries), tuple(sorted(names)))


def read_manifest(path: str | Path, *, source: str = "hosting spec") -> tuple[bytes, ManifestSummary]:
    """Read and parse the manifest file; return its bytes (copied verbatim) and summary.

    Raises:
        ConfigError: missing, unreadable, larger than bounded_yaml.MAX_MANIFEST_BYTES, not UTF-8, or not
            a NIM manifest.
    """
    path = Path(path)
    try:
        text = bounded_yaml.read_text(path, limit=bounded_yaml.MAX_MANIFEST_BYTES)
    except bounded_yaml.UnreadableInput as exc:
        raise _problem(f"{path}: {exc}", source) from None
    except FileNotFoundError:
        raise _problem(f"{path}: no such file; download model_manifest.yaml from the model's NIM image", source) from None
    except OSError as exc:
        raise _problem(f"{path}: cannot read: {exc.strerror}", source) from None
    except UnicodeDecodeError as exc:
        raise _problem(f"{path}: not UTF-8 text (byte {exc.start})", source) from None
    # UTF-8 decoding is lossless: the bytes re-encoded are the file's, copied verbatim into the image.
    return text.encode("utf-8"), parse_manifest(text, where=str(path), source=source)


def check_model_listed(summary: ManifestSummary, model_name: str, *, where: str, source: str = "hosting spec") -> None:
    """Refuse a manifest without a profile for ``model_name`` (NIM would fail at start-up).

    A v2 manifest whose profiles name no model at all cannot be checked; that is logged.

    Raises:
        ConfigError: naming ``source.model_name``, the models the manifest has, and the fix.
    """
    if model_name in summary.models:
        return
    if not summary.models:
        logger.warning("%s (manifest %s) names no model in its profiles; cannot check that it serves %r",
                       where, summary.schema, model_name)
        return
    raise ConfigError(source, [Problem(
        "source.model_name",
        f"{where} has no profile for {model_name!r}; it has profiles for {list(summary.models)}. Set "
        "source.model_name to one of them, or use the manifest of the model's own NIM image",
    )])


def manifest_destination(client: docker.DockerClient, base_image: str) -> str:
    """Where the derived image's manifest goes: where ``base_image`` keeps its own (the image probe's
    ``model_manifest``: ``/opt/nim/etc/default/`` in later NIM releases, ``/etc/nim/config/`` in 1.1),
    else the guide's :data:`MANIFEST_PATH`. No variable redirects NIM to another path in NIM's
    documentation, so the file must replace the image's own.

    Raises:
        DeploymentError: the base image is not on this host or cannot run the probe.
    """
    from nimflow.image_probe import probe_image

    found = probe_image(client, base_image).model_manifest
    if found is None:
        logger.warning("%s has no model manifest at the documented places; writing the manifest to %s (the NIM 1.1 "
                       "docs' path)", base_image, MANIFEST_PATH)
    return found or MANIFEST_PATH


def _manifest_image_inputs(client: docker.DockerClient, name: str, base_image: str, manifest: bytes, model_name: str,
                           served_model_name: str) -> dict[str, Any]:
    return {
        "repository": f"nimflow/{name}",
        "files": {manifest_destination(client, base_image): manifest},
        "env": {"NIM_MODEL_NAME": model_name, "NIM_SERVED_MODEL_NAME": served_model_name},
        "labels": {MODEL_LABEL: model_name},
    }


def manifest_image_tag(
    client: docker.DockerClient, name: str, base_image: str, manifest: bytes, *, model_name: str, served_model_name: str
) -> str:
    """The tag :func:`manifest_image` gives these inputs, without building anything (``nimflow plan``).

    Raises:
        DeploymentError: the base image is not on this host.
    """
    inputs = _manifest_image_inputs(client, name, base_image, manifest, model_name, served_model_name)
    return derived_tag(client, inputs.pop("repository"), base_image, **inputs)


def manifest_image(
    client: docker.DockerClient, name: str, base_image: str, manifest: bytes, *, model_name: str, served_model_name: str
) -> tuple[str, bool]:
    """Build (or reuse) ``FROM base_image`` + the manifest + NIM_MODEL_NAME / NIM_SERVED_MODEL_NAME.

    Returns:
        (tag, built): ``nimflow/<name>:<content hash>``; ``built`` False when it already existed.

    Raises:
        DeploymentError: the base image is not on this host, or the build failed.
        ServiceUnavailable: the Docker daemon did not answer.
    """
    inputs = _manifest_image_inputs(client, name, base_image, manifest, model_name, served_model_name)
    return ensure_derived_image(client, inputs.pop("repository"), base_image, **inputs)
