"""Compile a TensorRT-LLM engine inside a NIM 1.x container on the Docker engine.

Two backends, both producing NIM's layout in ``out_dir``::

    config.json, generation_config.json, tokenizer*      the model's files
    trtllm_engine/config.json, trtllm_engine/rank{N}.engine

* ``nim-optimize``: run ``nim-optimize --model_dir --build_config --output_engine_dir`` with the
  build YAML rendered from the spec, and wait for the container to exit.
* ``nim-jit``: start NIM with ``NIM_FT_MODEL`` + ``NIM_CUSTOM_MODEL_NAME``; NIM builds at start-up
  and reports ready when done. Then harvest ``$NIM_CACHE_PATH/local_cache/<name>`` and
  ``local_manifest.yaml``.

Nothing here imports tensorrt_llm: the build runs in the container, on the GPU host.
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import docker
import yaml

from nimflow.containers import (
    CONTAINER_PORT,
    LABEL_PREFIX,
    container_state,
    device_requests,
    exit_watch,
    last_log_lines,
    published_port,
    remove_container,
)
from nimflow.errors import BuildFailed, EndpointUnhealthy, TransientBuildError
from nimflow.nim_api import wait_until_ready
from nimflow.settings import get_settings
from nimflow.spec import BuildSpec

_MODEL_MOUNT = "/workspace/model"
_OUTPUT_MOUNT = "/workspace/output"
_JIT_CACHE_MOUNT = "/opt/nim/.cache"
# Build failures that a retry (ideally on another node) can fix, per TensorRT-LLM's issue history.
_TRANSIENT_BUILD_SIGNS = (
    "cudaMemGetInfo",
    "Unexpected error from cudaGetDeviceCount",
    "NCCL error",
    "MPI_Init",
)


def render_build_config(build: BuildSpec) -> str:
    """The ``nim-optimize --build_config`` YAML for a build spec."""
    config = {
        "dtype": build.dtype,
        "tp_size": build.tp_size,
        "pp_size": build.pp_size,
        "max_seq_len": build.max_seq_len,
        "max_batch_size": build.max_batch_size,
        "max_num_tokens": build.max_num_tokens,
    }
    return yaml.safe_dump(config, sort_keys=False)


def _classify_failure(what: str, exit_code: int | None, logs: str) -> Exception:
    message = f"{what} failed (exit code {exit_code}); last log lines:\n{logs}"
    if any(sign in logs for sign in _TRANSIENT_BUILD_SIGNS):
        return TransientBuildError(message)
    if exit_code == 137 or "Killed" in logs:
        return BuildFailed(message + "\nThe host ran out of memory: build on a node with more RAM.")
    if "OutOfMemory" in logs or "could not be allocated" in logs:
        return BuildFailed(
            message + "\nThe GPU ran out of memory: lower max_num_tokens/max_batch_size/max_seq_len or raise tp_size."
        )
    return BuildFailed(message)


def build_with_nim_optimize(
    client: docker.DockerClient, build: BuildSpec, model_dir: Path, out_dir: Path, labels: dict[str, str]
) -> None:
    """Run ``nim-optimize`` in the build image; ``out_dir`` receives the engine in NIM's layout.

    Raises:
        BuildFailed: the build exited non-zero for a deterministic reason (logs included).
        TransientBuildError: it failed for a reason outside its inputs (driver, NCCL, MPI).
    """
    work = out_dir.parent / f".work-{out_dir.name}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "build_config.yaml").write_text(render_build_config(build))
    name = f"nimflow-build-{uuid.uuid4().hex[:12]}"
    container = client.containers.run(
        build.image,
        command=[
            "nim-optimize",
            "--model_dir", _MODEL_MOUNT,
            "--build_config", "/workspace/build_config.yaml",
            "--output_engine_dir", _OUTPUT_MOUNT,
        ],
        name=name,
        detach=True,
        environment=get_settings().container_secrets(),
        volumes={
            str(model_dir): {"bind": _MODEL_MOUNT, "mode": "ro"},
            str(out_dir): {"bind": _OUTPUT_MOUNT, "mode": "rw"},
            str(work / "build_config.yaml"): {"bind": "/workspace/build_config.yaml", "mode": "ro"},
        },
        device_requests=device_requests(build.gpus),
        shm_size=build.shm_size,
        user="root",
        labels={**labels, f"{LABEL_PREFIX}role": "build"},
    )
    try:
        try:
            result = container.wait(timeout=build.timeout_seconds)
        except Exception:  # requests' ReadTimeout: the build outlived its budget
            raise BuildFailed(
                f"nim-optimize did not finish within {build.timeout_seconds:g}s; last log lines:\n"
                f"{last_log_lines(client, container.id)}\nRaise build.timeout_seconds or shrink the build."
            ) from None
        exit_code = int(result.get("StatusCode", -1))
        if exit_code != 0:
            raise _classify_failure("nim-optimize", exit_code, last_log_lines(client, container.id, 30))
    finally:
        remove_container(client, container.id, stop_timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    if not list((out_dir / "trtllm_engine").glob("rank*.engine")):
        raise BuildFailed(f"nim-optimize exited 0 but wrote no trtllm_engine/rank*.engine under {out_dir}")


def build_with_nim_jit(
    client: docker.DockerClient,
    build: BuildSpec,
    model_dir: Path,
    out_dir: Path,
    labels: dict[str, str],
    custom_model_name: str,
) -> None:
    """Let NIM JIT-build the engine at start-up, then harvest it into ``out_dir``.

    Raises:
        BuildFailed: the container exited or never became ready (logs included).
        TransientBuildError: it failed for a reason outside its inputs.
    """
    scratch = out_dir.parent / f".jit-{out_dir.name}"
    scratch.mkdir(parents=True, exist_ok=True)
    scratch.chmod(0o777)  # NIM may run as a non-root user and must write its cache here
    env = {
        "NIM_FT_MODEL": _MODEL_MOUNT,
        "NIM_CUSTOM_MODEL_NAME": custom_model_name,
        "NIM_SERVED_MODEL_NAME": custom_model_name,
        "NIM_CACHE_PATH": _JIT_CACHE_MOUNT,
        "NIM_TENSOR_PARALLEL_SIZE": str(build.tp_size),
        "NIM_PIPELINE_PARALLEL_SIZE": str(build.pp_size),
        "NIM_MAX_MODEL_LEN": str(build.max_seq_len),
        # Late NIM 1.x: the default PyTorch runtime does not build fine-tuned engines.
        "NIM_USE_TRTLLM_LEGACY_BACKEND": "1",
        "NIM_DISABLE_TRTLLM_PYTORCH_RT": "1",
        **get_settings().container_secrets(),
    }
    container = client.containers.run(
        build.image,
        name=f"nimflow-jit-{uuid.uuid4().hex[:12]}",
        detach=True,
        environment=env,
        volumes={
            str(model_dir): {"bind": _MODEL_MOUNT, "mode": "ro"},
            str(scratch): {"bind": _JIT_CACHE_MOUNT, "mode": "rw"},
        },
        ports={CONTAINER_PORT: ("127.0.0.1", None)},
        device_requests=device_requests(build.gpus),
        shm_size=build.shm_size,
        user="root",
        labels={**labels, f"{LABEL_PREFIX}role": "build"},
    )
    try:
        endpoint = f"http://127.0.0.1:{published_port(client, container.id)}"

        try:
            wait_until_ready(
                endpoint, deadline_seconds=build.timeout_seconds, give_up=exit_watch(client, container.id, container.name)
            )
        except EndpointUnhealthy as exc:
            _, code = container_state(client, container.id)
            raise _classify_failure(f"NIM JIT build ({exc})", code, last_log_lines(client, container.id, 30)) from None
    finally:
        remove_container(client, container.id, stop_timeout=30)
    built = scratch / "local_cache" / custom_model_name
    if not list((built / "trtllm_engine").glob("rank*.engine")):
        raise BuildFailed(f"NIM reported ready but wrote no engine under local_cache/{custom_model_name}")
    for item in built.iterdir():
        shutil.move(str(item), out_dir / item.name)
    manifest = scratch / "local_cache" / "local_manifest.yaml"
    if manifest.exists():
        shutil.move(str(manifest), out_dir / "local_manifest.yaml")
    shutil.rmtree(scratch, ignore_errors=True)


def build_engine(
    client: docker.DockerClient, build: BuildSpec, model_dir: Path, out_dir: Path, labels: dict[str, str], key: str
) -> float:
    """Build with the spec's backend into ``out_dir``; return the build's wall time in seconds."""
    started = time.monotonic()
    if build.backend == "nim-optimize":
        build_with_nim_optimize(client, build, model_dir, out_dir, labels)
    else:
        build_with_nim_jit(client, build, model_dir, out_dir, labels, custom_model_name=f"nimflow-{key[:16]}")
    return time.monotonic() - started
