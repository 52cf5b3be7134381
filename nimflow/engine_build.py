"""Compile a TensorRT-LLM engine in a container on the Docker engine, with one of three backends.

Every backend produces NIM's layout in ``out_dir``::

    config.json, generation_config.json, tokenizer*      the model's files
    trtllm_engine/config.json, trtllm_engine/rank{N}.engine

* ``nim-optimize``: ``nim-optimize --model_dir --build_config --output_engine_dir`` in the NIM
  image, with the build YAML rendered from the spec.
* ``nim-jit``: NIM itself, started with ``NIM_FT_MODEL`` + ``NIM_CUSTOM_MODEL_NAME``; it builds at
  start-up and reports ready when done. ``local_cache/<name>`` and ``local_manifest.yaml`` are
  then harvested.
* ``trtllm-build``: ``convert_checkpoint.py`` then ``trtllm-build`` in a TensorRT-LLM release
  image, every limit explicit and the timing cache written to scratch.

Whatever happens, the build containers and the scratch directories are removed before this
module returns or raises, and scratch is private to the user running nimflow. A build container
whose run was killed before it could clean up carries the run's id (:func:`nimflow.run_owner.run_labels`),
and the next nimflow run on this host removes it (:mod:`nimflow.run_leftovers`). The engine's own
``trtllm_engine/config.json`` is then checked against the spec (:mod:`nimflow.build_config`).
Nothing here imports tensorrt_llm: the build runs in the container, on the GPU host.
"""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import docker

from nimflow.build_config import (
    check_built_engine,
    convert_arguments,
    convert_script,
    jit_environment,
    read_engine_config,
    render_nim_optimize_config,
    trtllm_build_arguments,
)
from nimflow.build_progress import BuildProgress, build_progress
from nimflow.checkpoint import side_files
from nimflow.containers import (
    CONTAINER_PORT,
    LABEL_PREFIX,
    ROLE_LABEL,
    container_state,
    device_requests,
    exit_watch,
    following_logs,
    last_log_lines,
    published_port,
    remove_container_quietly,
    run_to_exit,
    start_container,
)
from nimflow.errors import BuildFailed, EndpointUnhealthy, classify_build_failure
from nimflow.nim_api import wait_until_ready
from nimflow.run_owner import run_labels
from nimflow.settings import get_settings
from nimflow.spec import BuildSpec
from nimflow.trtllm_families import family_for, parallelism_problem, supported_architectures

_MODEL_MOUNT = "/workspace/model"
_OUTPUT_MOUNT = "/workspace/output"
_WORK_MOUNT = "/workspace/work"
_JIT_CACHE_MOUNT = "/opt/nim/.cache"


#: The secrets each backend's build container needs. Every backend builds from the checkpoint
#: mounted from local disk, so none needs HF_TOKEN. nim-optimize starts from one of the image's
#: NGC profiles and is documented with NGC_API_KEY (NIM 1.2.0, ft-support.html); a NIM_FT_MODEL
#: JIT build is documented without any (NIM 1.8+, ft-support.html); convert_checkpoint.py and
#: trtllm-build only read and write local files.
BUILD_SECRETS: dict[str, tuple[str, ...]] = {"nim-optimize": ("NGC_API_KEY",), "nim-jit": (), "trtllm-build": ()}


def build_environment(build: BuildSpec, secrets: Mapping[str, str], fixed: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a build container: ``build.env``, then what nimflow sets, then the secrets it needs.

    Args:
        build: the build spec; its backend decides which secrets are passed (:data:`BUILD_SECRETS`).
        secrets: the secrets available (name to value, as :meth:`Settings.container_secrets` gives).
        fixed: variables nimflow sets for this step (they override ``build.env``).

    Returns:
        The variables; of ``secrets``, only those the backend needs.
    """
    needed = BUILD_SECRETS.get(build.backend, ())
    return {**build.env, **(fixed or {}), **{name: secrets[name] for name in needed if name in secrets}}


#: The nim-optimize command line (NIM 1.2.0 ft-support.html documents only --model_dir; the image probe
#: checks the image's nim-optimize takes every flag of it before a build).
NIM_OPTIMIZE_COMMAND = ["nim-optimize", "--model_dir", _MODEL_MOUNT, "--build_config", f"{_WORK_MOUNT}/build_config.yaml",
                         "--output_engine_dir", _OUTPUT_MOUNT]


def _trtllm_commands(build: BuildSpec, model_config: dict[str, Any], converter: str | None = None) -> tuple[list[str], list[str]]:
    """The ``convert_checkpoint.py`` and ``trtllm-build`` command lines of a trtllm-build backend build.

    Args:
        converter: where the image keeps the family's script (the image probe found it); None: the
            0.18+ layout, as the engine key records the command.

    Raises:
        ConfigError: the checkpoint's family cannot be converted as the spec asks (:mod:`nimflow.trtllm_families`).
    """
    checkpoint = f"{_WORK_MOUNT}/checkpoint"
    return (
        ["python3", convert_script(build, model_config, converter),
         *convert_arguments(build, model_config, _MODEL_MOUNT, checkpoint)],
        ["trtllm-build", *trtllm_build_arguments(build, checkpoint, f"{_OUTPUT_MOUNT}/trtllm_engine", f"{_WORK_MOUNT}/timing.cache")],
    )


def parallelism_allowed(build: BuildSpec, architecture: str) -> bool:
    """Whether the architecture's converter takes the spec's tp x pp (the others are refused before a build)."""
    family = family_for(architecture)
    return family is None or parallelism_problem(family, family.script(), build.tp_size, build.pp_size) is None


def _jit_fixed_environment(build: BuildSpec, custom_model_name: str) -> dict[str, str]:
    """What nimflow sets for a NIM JIT build (on top of ``build.env``)."""
    return {
        **jit_environment(build),
        "NIM_FT_MODEL": _MODEL_MOUNT,
        "NIM_CUSTOM_MODEL_NAME": custom_model_name,
        "NIM_SERVED_MODEL_NAME": custom_model_name,
        "NIM_CACHE_PATH": _JIT_CACHE_MOUNT,
        # Late NIM 1.x: the default PyTorch runtime does not build fine-tuned engines.
        "NIM_USE_TRTLLM_LEGACY_BACKEND": "1",
        "NIM_DISABLE_TRTLLM_PYTORCH_RT": "1",
    }


def builder_invocation(build: BuildSpec) -> dict[str, Any]:
    """What nimflow asks the backend to run, as the engine key records it.

    The same functions produce the build's command lines, rendered config and fixed environment,
    so a change to any flag nimflow passes changes the key (no key-schema bump to remember). Parts
    that follow from the weights are left symbolic: the checkpoint's architecture picks the
    ``convert_checkpoint.py`` family (the table is hashed), and a JIT build's model name is the key.
    Parts that follow from the image are left symbolic too: the converter's path is recorded in the
    0.18+ layout whatever layout the image probe found, because the build image's id is already in
    the key (one id, one layout), so keys of engines built before the probe stay the same.
    """
    if build.backend == "nim-optimize":
        return {"commands": [NIM_OPTIMIZE_COMMAND], "build_config": render_nim_optimize_config(build)}
    if build.backend == "trtllm-build":
        if build.convert_script:
            return {"commands": list(_trtllm_commands(build, {}))}
        # The weights pick the family; every family's command lines are hashed (each as it would run).
        return {"commands_by_architecture": {
            architecture: list(_trtllm_commands(build, {"architectures": [architecture]}))
            for architecture in sorted(supported_architectures())
            if parallelism_allowed(build, architecture)
        }}
    return {"environment": _jit_fixed_environment(build, "<engine key>")}


def _build_environment(build: BuildSpec, fixed: Mapping[str, str] | None = None) -> dict[str, str]:
    # Secrets are looked up (environment, else Prefect Secret blocks) only where the backend needs them.
    needed = BUILD_SECRETS.get(build.backend, ())
    return build_environment(build, get_settings().container_secrets(needed) if needed else {}, fixed)


def build_user(build: BuildSpec) -> str:
    """The user a build container runs as.

    TensorRT-LLM release images (``convert_checkpoint.py``, ``trtllm-build``) and ``nim-optimize``
    run as root, the way their docs run them; they write only into nimflow's scratch, and files
    root wrote there stay readable (0644 / 0755) for serving. A NIM JIT build is NIM itself, which
    its docs run as ``-u $(id -u)``: it runs as nimflow's own uid:gid, so the engine it writes into
    nimflow's scratch stays nimflow's to move and remove even when nimflow is not root.
    """
    return f"{os.geteuid()}:{os.getegid()}" if build.backend == "nim-jit" else "root"


def _container_options(build: BuildSpec, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "environment": _build_environment(build),
        "device_requests": device_requests(build.gpus),
        "shm_size": build.shm_size,
        "user": build_user(build),
        "labels": {**labels, ROLE_LABEL: "build", **run_labels()},
    }


def _run_step(
    client: docker.DockerClient, build: BuildSpec, what: str, command: list[str], volumes: dict[str, dict[str, str]],
    labels: dict[str, str], progress: BuildProgress,
) -> None:
    """Run one build step to its end, its log lines fed to ``progress``; raise the classified failure unless it exited 0."""
    options = _container_options(build, labels)
    progress.start_step(what)
    ended = run_to_exit(
        client, build.image, command, name=f"nimflow-build-{uuid.uuid4().hex[:12]}",
        deadline_seconds=build.timeout_seconds, volumes=volumes,
        on_log_line=progress.feed, **options,
    )
    if ended.timed_out:
        raise BuildFailed(
            f"{what} did not finish within {build.timeout_seconds:g}s; last log lines:\n{ended.logs}\n"
            "Raise build.timeout_seconds or shrink the build."
        )
    if ended.exit_code != 0:
        raise classify_build_failure(what, ended.exit_code, ended.logs, image=build.image)
    progress.step_done()


def build_with_nim_optimize(
    client: docker.DockerClient, build: BuildSpec, model_dir: Path, out_dir: Path, work: Path, labels: dict[str, str],
    progress: BuildProgress,
) -> None:
    """Run ``nim-optimize`` in the build image; ``out_dir`` receives the engine in NIM's layout."""
    config = work / "build_config.yaml"
    config.write_text(render_nim_optimize_config(build))
    _run_step(
        client, build, "nim-optimize", NIM_OPTIMIZE_COMMAND,
        {
            str(model_dir): {"bind": _MODEL_MOUNT, "mode": "ro"},
            str(out_dir): {"bind": _OUTPUT_MOUNT, "mode": "rw"},
            str(work): {"bind": _WORK_MOUNT, "mode": "ro"},
        },
        labels, progress,
    )


def build_with_trtllm(
    client: docker.DockerClient, build: BuildSpec, model_dir: Path, out_dir: Path, work: Path, labels: dict[str, str],
    model_config: dict[str, Any], progress: BuildProgress, converter: str | None = None,
) -> None:
    """``convert_checkpoint.py`` (at ``converter``, where the image keeps it) then ``trtllm-build`` in a
    TensorRT-LLM image, laid out for NIM."""
    convert, compile_ = _trtllm_commands(build, model_config, converter)
    _run_step(
        client, build, "convert_checkpoint.py", convert,
        {str(model_dir): {"bind": _MODEL_MOUNT, "mode": "ro"}, str(work): {"bind": _WORK_MOUNT, "mode": "rw"}},
        labels, progress,
    )
    _run_step(
        client, build, "trtllm-build", compile_,
        {str(work): {"bind": _WORK_MOUNT, "mode": "rw"}, str(out_dir): {"bind": _OUTPUT_MOUNT, "mode": "rw"}},
        labels, progress,
    )
    # NIM serves the engine with the model's config and tokenizer. The engine travels to the store
    # and every host: a side file linked out of the checkpoint is refused, never copied.
    for name, path in side_files(model_dir).items():
        shutil.copyfile(path, out_dir / name)


def build_with_nim_jit(
    client: docker.DockerClient, build: BuildSpec, model_dir: Path, out_dir: Path, work: Path, labels: dict[str, str],
    custom_model_name: str, progress: BuildProgress,
) -> None:
    """Let NIM JIT-build the engine at start-up, then harvest it into ``out_dir``."""
    env = _build_environment(build, _jit_fixed_environment(build, custom_model_name))
    options = _container_options(build, labels)
    options["environment"] = env
    name = f"nimflow-jit-{uuid.uuid4().hex[:12]}"
    try:
        container_id = start_container(
            client, build.image, name=name,
            volumes={str(model_dir): {"bind": _MODEL_MOUNT, "mode": "ro"}, str(work): {"bind": _JIT_CACHE_MOUNT, "mode": "rw"}},
            ports={CONTAINER_PORT: ("127.0.0.1", None)},
            **options,
        )
        endpoint = f"http://127.0.0.1:{published_port(client, container_id)}"
        progress.start_step("NIM JIT build")
        try:
            with following_logs(client, container_id, progress.feed):
                wait_until_ready(endpoint, deadline_seconds=build.timeout_seconds, give_up=exit_watch(client, container_id, name))
        except EndpointUnhealthy as exc:
            _, code = container_state(client, container_id)
            raise classify_build_failure(
                f"NIM JIT build ({exc})", code, last_log_lines(client, container_id, 40), image=build.image
            ) from None
    finally:
        remove_container_quietly(client, name, stop_timeout=30)
    built = work / "local_cache" / custom_model_name
    if not (built / "trtllm_engine").is_dir():
        raise BuildFailed(f"NIM reported ready but wrote no engine under local_cache/{custom_model_name}")
    for item in built.iterdir():
        shutil.move(str(item), out_dir / item.name)
    manifest = work / "local_cache" / "local_manifest.yaml"
    if manifest.exists():
        shutil.move(str(manifest), out_dir / "local_manifest.yaml")


def _refuse_special_files(out_dir: Path) -> None:
    """A build's output is published fleet-wide: only regular files and directories may be in it."""
    for path in out_dir.rglob("*"):
        mode = path.lstat().st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise BuildFailed(f"{path}: the build left a link or special file in its output; refusing to publish it")


def build_engine(
    client: docker.DockerClient,
    build: BuildSpec,
    model_dir: Path,
    out_dir: Path,
    work: Path,
    *,
    key: str,
    labels: dict[str, str],
    model_config: dict[str, Any],
    trtllm_version: str | None,
    converter: str | None = None,
) -> dict[str, Any]:
    """Build with the spec's backend into ``out_dir`` and check the result.

    Args:
        work: a private scratch directory for this build; the caller removes it.
        trtllm_version: the image's TensorRT-LLM version, which the engine must record.
        converter: trtllm-build backend: where the image keeps the checkpoint family's
            ``convert_checkpoint.py`` (:func:`nimflow.image_probe.converter_path`); None: the 0.18+ layout.

    Returns:
        What was built, read from the engine's own config (recorded in the manifest).

    Raises:
        BuildFailed: a deterministic failure (bad config, OOM, unsupported model), a timeout,
            or an engine whose shape differs from the spec (both values named).
        ConfigError: a step refused a flag nimflow passed (the image's release lacks it), or the
            checkpoint's converter cannot convert the spec's tp x pp.
        TransientBuildError: a failure outside the inputs (CUDA device enumeration, NCCL or MPI initialisation).
    """
    # The build's phase, from its container's log, is shown while it runs (nimflow-build artifact).
    with build_progress(f"engine {key[:12]}", build.backend, build.tp_size * build.pp_size) as progress:
        if build.backend == "nim-optimize":
            build_with_nim_optimize(client, build, model_dir, out_dir, work, labels, progress)
        elif build.backend == "trtllm-build":
            build_with_trtllm(client, build, model_dir, out_dir, work, labels, model_config, progress, converter)
        else:
            build_with_nim_jit(
                client, build, model_dir, out_dir, work, labels, custom_model_name=f"nimflow-{key[:16]}", progress=progress
            )
        _refuse_special_files(out_dir)
        built = read_engine_config(out_dir)
        check_built_engine(build, built, trtllm_version=trtllm_version)
    return built


def remove_stale_build_containers(client: docker.DockerClient, key: str) -> int:
    """Remove build containers of ``key`` left by an earlier attempt on this host (this run holds the lease)."""
    stale = client.containers.list(all=True, filters={"label": [f"{LABEL_PREFIX}engine-key={key}", f"{ROLE_LABEL}=build"]})
    for container in stale:
        remove_container_quietly(client, container.id)
    return len(stale)
