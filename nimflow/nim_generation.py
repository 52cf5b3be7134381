"""Which NIM generation an image is: 1.x (TensorRT-LLM engines, NIM_MODEL_NAME) or 2.x (vLLM/SGLang,
NIM_MODEL_PATH, no engines).

The two take different paths through the pipeline (guide/reference §1), so the generation is
settled before anything is downloaded or built, from what the image says about itself, in order:

1. ``deploy.nim_api`` when it is not ``auto`` (the user knows best).
2. Image labels: ``nimflow.nim-api`` (the CPU stand-in and images nimflow builds), then NVIDIA's
   ``com.nvidia.nim.version`` (seen on NIM LLM images, e.g. ``1.12.2`` and ``2.0.12``).
3. Image environment: ``INFERENCE_MICROSERVICE_LLM_NIM_VERSION`` (set to the release in NIM 2.x
   images; present but empty in some 1.x ones, so only a non-empty value counts).
4. The entrypoint and command: ``nim-serve`` is the 2.x server ("the nim-run CLI command is
   replaced with the new nim-serve command", NIM 1.x migration guide); ``nim-run``,
   ``start-server``/``start-server.sh``/``start_server.sh`` (the 1.x start scripts) and NGC's
   ``/opt/nvidia/nvidia_entrypoint.sh`` (shipped by 1.x images, absent from 2.x) mean 1.x.

``org.opencontainers.image.version`` is deliberately not read: NIM images inherit it from their
base (an Ubuntu or vLLM version), which says nothing about NIM.

Undecidable images are treated as 1.x (the path every NIM had before 2.0) with a warning. After
start-up, :func:`running_generation_problem` asks the server itself (``/v1/version``) and catches
an image that was routed the wrong way.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import docker

from nimflow.containers import image_id
from nimflow.errors import ConfigError, Problem, translated_errors
from nimflow.nim_api import optional_json
from nimflow.spec import BuildSpec, DeploySpec, SourceSpec

logger = logging.getLogger(__name__)

Generation = Literal["1.x", "2.x"]
Declared = Literal["auto", "1.x", "2.x"]

#: The stand-in's (and nimflow's own) label: "1.x" or "2.x".
NIMFLOW_LABEL = "nimflow.nim-api"
#: NVIDIA's label on NIM images: the NIM release, e.g. "1.12.2".
NVIDIA_VERSION_LABEL = "com.nvidia.nim.version"
#: NIM's release as an environment variable (non-empty in 2.x images).
NVIDIA_VERSION_ENV = "INFERENCE_MICROSERVICE_LLM_NIM_VERSION"
#: Entrypoint/command basenames by generation.
ENTRYPOINTS_2X = frozenset({"nim-serve"})
ENTRYPOINTS_1X = frozenset({"nim-run", "start-server", "start-server.sh", "start_server.sh", "nvidia_entrypoint.sh"})

_VERSION = re.compile(r"^\s*v?(\d+)(?:\.[0-9A-Za-z.+-]*)?\s*$")


def generation_of_version(text: str) -> Generation | None:
    """``"1.x"`` for a 1.* release, ``"2.x"`` for 2.* or later (no engines since 2.0), else None.

    Accepts ``1.x``/``2.x`` as written by nimflow's label, and releases like ``1.12.2`` or ``2.0.12``.
    """
    match = _VERSION.match(text.replace(".x", ".0")) if text else None
    if not match:
        return None
    major = int(match.group(1))
    if major < 1:
        return None
    return "1.x" if major == 1 else "2.x"


def _env(config: Mapping[str, Any]) -> dict[str, str]:
    pairs = (item.partition("=") for item in config.get("Env") or [])
    return {key: value for key, _, value in pairs}


def _command_words(config: Mapping[str, Any]) -> list[str]:
    """Basenames of every word in Entrypoint + Cmd (a shell form ``sh -c "..."`` is split too)."""
    words: list[str] = []
    for part in ("Entrypoint", "Cmd"):
        value: Sequence[str] | str | None = config.get(part)
        items = [value] if isinstance(value, str) else list(value or [])
        for item in items:
            words.extend(word.rsplit("/", 1)[-1] for word in str(item).replace(";", " ").split())
    return words


def generation_from_config(config: Mapping[str, Any]) -> tuple[Generation, str] | None:
    """The generation an image's config (``docker image inspect``'s ``Config``) states, and how.

    Returns:
        (generation, how) or None when nothing in the config decides it.
    """
    labels = config.get("Labels") or {}
    for label in (NIMFLOW_LABEL, NVIDIA_VERSION_LABEL):
        value = labels.get(label)
        if value and (found := generation_of_version(str(value))):
            return found, f"image label {label}={value}"
    value = _env(config).get(NVIDIA_VERSION_ENV, "")
    if value and (found := generation_of_version(value)):
        return found, f"image env {NVIDIA_VERSION_ENV}={value}"
    words = _command_words(config)
    for word in words:  # nim-serve first: a 2.x image may still start through a wrapper script
        if word in ENTRYPOINTS_2X:
            return "2.x", f"image entrypoint/command runs {word}"
    for word in words:
        if word in ENTRYPOINTS_1X:
            return "1.x", f"image entrypoint/command runs {word}"
    return None


def nim_generation(client: docker.DockerClient, image: str, declared: Declared = "auto") -> tuple[Generation, str]:
    """The NIM generation of ``image`` and how it was decided (for logs and the hosting record).

    Raises:
        DeploymentError: the image is not on this Docker host (nimflow does not pull).
        ServiceUnavailable: the Docker daemon did not answer.
    """
    if declared != "auto":
        return declared, f"deploy.nim_api: {declared}"
    image_id(client, image)  # a missing image is a DeploymentError that says how to get it
    with translated_errors(f"inspecting image {image}"):
        config = client.images.get(image).attrs.get("Config") or {}
    found = generation_from_config(config)
    if found is not None:
        return found
    command = [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]
    how = (f"assumed NIM 1.x: image {image} has no {NIMFLOW_LABEL} or {NVIDIA_VERSION_LABEL} label, no "
           f"{NVIDIA_VERSION_ENV}, and its command {command} names neither nim-serve nor a 1.x start script")
    logger.warning("%s; set deploy.nim_api: 1.x or 2.x to say which it is", how)
    return "1.x", how


def running_generation_problem(endpoint: str, routed: Generation) -> str | None:
    """What is wrong when the running server's ``/v1/version`` release is of another generation.

    A server without ``/v1/version`` (older 1.x releases) or without a parseable release passes:
    only a stated, different generation is a problem.

    Raises:
        EndpointUnhealthy: ``/v1/version`` failed in a way other than not existing.
    """
    body = optional_json(endpoint, "/v1/version")
    release = str((body or {}).get("release") or "")
    running = generation_of_version(release) if release else None
    if running is None or running == routed:
        return None
    variable = {"1.x": "NIM_MODEL_NAME", "2.x": "NIM_MODEL_PATH"}[routed]
    return (f"the image is NIM {running} ({endpoint}/v1/version release {release}) but the deployment was routed "
            f"as NIM {routed} (the model given by {variable}, which NIM {running} does not read); "
            f"set deploy.nim_api: {running}")


def refuse_unservable(
    generation: Generation, how: str, deploy: DeploySpec, build: BuildSpec | None, source: SourceSpec, *, spec: str = "hosting spec"
) -> None:
    """Refuse what the image's generation cannot do, before anything is downloaded or built.

    NIM 2.x has no TensorRT-LLM engines (so no ``build``, and no NIM_FT_MODEL JIT build), and it
    selects models by NIM_MODEL_PATH, not by NIM_MODEL_NAME and a bundled manifest (guide §1).

    Raises:
        ConfigError: naming ``build`` / ``build.backend`` / ``source.manifest``, ``deploy.image`` and the fix.
    """
    if generation != "2.x":
        return
    image = f"deploy.image {deploy.image} is NIM 2.x ({how})"
    wrong = " (if the detection is wrong, set deploy.nim_api: 1.x)" if deploy.nim_api == "auto" else ""
    problems = []
    if build is not None and build.backend == "nim-jit":
        problems.append(Problem(
            "build.backend",
            f"nim-jit is NIM 1.x building an engine from NIM_FT_MODEL at start-up, but {image}, which builds no "
            f"engines; remove `build` (NIM 2.x serves the weights through NIM_MODEL_PATH) or deploy a NIM 1.x image{wrong}",
        ))
    elif build is not None:
        problems.append(Problem(
            "build",
            f"{image}: NIM 2.x has no TensorRT-LLM engine path, so a built engine cannot be served; remove `build` "
            f"(NIM 2.x serves the weights through NIM_MODEL_PATH) or deploy a NIM 1.x image{wrong}",
        ))
    if source.manifest is not None:
        problems.append(Problem(
            "source.manifest",
            f"{image}: NIM 2.x selects its model by NIM_MODEL_PATH and does not read NIM_MODEL_NAME with a copied "
            f"model_manifest.yaml (guide §1 is NIM 1.x); use source.repo_id or source.local_dir, or a NIM 1.x "
            f"deploy.image{wrong}",
        ))
    if problems:
        raise ConfigError(spec, problems)
