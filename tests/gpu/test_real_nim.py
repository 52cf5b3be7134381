"""The flow with real NIM 1.x and TensorRT-LLM images on a GPU host (marker `gpu`).

Skipped, with the reason, wherever there is no GPU or no image configured. To run on a GPU host
(images pulled, HF_TOKEN and AWS credentials exported):

    NIMFLOW_GPU_NIM_IMAGE=nvcr.io/nim/meta/llama-3.1-8b-instruct:1.8.0 \
    NIMFLOW_GPU_TRTLLM_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:0.17.0 \
    NIMFLOW_GPU_REPO=meta-llama/Llama-3.2-1B-Instruct NIMFLOW_GPU_S3_URI=s3://bucket/prefix \
    .venv/bin/python -m pytest -m gpu

Or, the same with one command: `make test-gpu NIM_IMAGE=... TRTLLM_IMAGE=... HF_REPO=... S3_URI=...`
(a skip is then a failure). The tests record what the real software printed (tests/gpu/recording.py)
under `$NIMFLOW_GPU_RECORD_DIR` (default `tests/gpu/recorded/<image>/`) and fail where a recorded fact
contradicts an assumption of the code (tests/gpu/assumptions.py); commit what they write: the unit
tests check the code against every committed recording on each CPU run. `<kind>-image-probe.json` holds
what nimflow's image probe found in each image.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import write_spec

pytestmark = pytest.mark.gpu

REQUIRED = ("NIMFLOW_GPU_NIM_IMAGE", "NIMFLOW_GPU_REPO", "NIMFLOW_GPU_S3_URI")
#: The nim-optimize flags nimflow (and the stand-in) use; documented only in NIM 1.2.0 docs.
NIM_OPTIMIZE_FLAGS = ("--model_dir", "--build_config", "--output_engine_dir")


def _skip_reason(*extra: str) -> str | None:
    if shutil.which("nvidia-smi") is None:
        return "GPU-only: no NVIDIA GPU here (nvidia-smi not found); real NIM images need one"
    missing = [name for name in (*REQUIRED, *extra) if not os.environ.get(name)]
    if missing:
        return f"GPU-only: set {', '.join(missing)} (pulled NIM 1.x / TensorRT-LLM images, an HF repo, an S3 prefix)"
    return None


def _record_folder() -> Path:
    from tests.gpu.recording import RECORD_ROOT, recording_dir

    return recording_dir(os.environ["NIMFLOW_GPU_NIM_IMAGE"], Path(os.environ.get("NIMFLOW_GPU_RECORD_DIR") or RECORD_ROOT))


def _record_served(record: dict) -> None:
    """Record the real /v1/models, /v1/metadata and /v1/version of a NIM nimflow verified."""
    from nimflow.containers import docker_client
    from nimflow.rollout import MODEL_ROOT_LABEL
    from tests.gpu.assumptions import contradictions
    from tests.gpu.recording import record_endpoint

    folder = _record_folder()
    labels = docker_client().containers.get(record["container_id"]).labels  # what nimflow told this NIM
    record_endpoint(record["endpoint"], served_model_name=record["served_model_name"],
                    model_root=labels[MODEL_ROOT_LABEL], nim_api=record["nim_api"], folder=folder)
    assert contradictions(folder) == []


def _spec(tmp_path: Path, backend: str, build_image: str) -> dict:
    image = os.environ["NIMFLOW_GPU_NIM_IMAGE"]
    name = f"gpu-{backend}"
    build = {"backend": backend, "image": build_image, "gpus": [0], "tp_size": 1, "max_seq_len": 4096}
    if backend != "nim-jit":
        build.update(max_batch_size=8, max_num_tokens=4096)
    return {
        "name": name,
        "source": {"repo_id": os.environ["NIMFLOW_GPU_REPO"]},
        "build": build,
        "cache": {"uri": f"{os.environ['NIMFLOW_GPU_S3_URI'].rstrip('/')}/{name}"},
        "deploy": {"image": image, "served_model_name": name, "gpus": [0],
                   "host_port": int(os.environ.get("NIMFLOW_GPU_PORT", "18080")), "cache_dir": str(tmp_path / "cache")},
    }


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
@pytest.mark.parametrize("backend", ["nim-optimize", "nim-jit"])
def test_real_nim_builds_caches_and_serves(tmp_path: Path, prefect_api: str, backend: str) -> None:
    """A real nim-optimize and a real NIM JIT build: built (or restored), checked, served; a rerun is a hit."""
    from nimflow.flows.host_model import host_model

    config = write_spec(tmp_path / "spec.yaml", _spec(tmp_path, backend, os.environ["NIMFLOW_GPU_NIM_IMAGE"]))
    first = host_model(spec=str(config))
    assert first["engine_origin"] in ("built", "engine-store") and first["completion"].strip()
    _record_served(first)
    again = host_model(spec=str(config))
    assert again["engine_origin"] == "local-cache" and again["uploaded_files"] == 0 and again["downloaded_files"] == 0


@pytest.mark.skipif(_skip_reason("NIMFLOW_GPU_TRTLLM_IMAGE") is not None, reason=_skip_reason("NIMFLOW_GPU_TRTLLM_IMAGE") or "")
def test_real_trtllm_build_serves_in_nim(tmp_path: Path, prefect_api: str) -> None:
    """convert_checkpoint.py + trtllm-build in a real TensorRT-LLM image, served by the NIM image.

    The TensorRT-LLM versions of the two images must match, or the deploy guard refuses the engine.
    """
    from nimflow.flows.host_model import host_model

    spec = _spec(tmp_path, "trtllm-build", os.environ["NIMFLOW_GPU_TRTLLM_IMAGE"])
    record = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)))
    assert record["engine_origin"] in ("built", "engine-store") and record["completion"].strip()


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_real_images_agree_with_what_nimflow_assumes() -> None:
    """Record what the real images print (tests/gpu/recording.py) and fail on every assumption of the
    code that the recording contradicts (tests/gpu/assumptions.py); commit the recording."""
    from nimflow.containers import docker_client
    from tests.gpu.assumptions import contradictions
    from tests.gpu.recording import record_images

    folder = _record_folder()
    record_images(docker_client(), os.environ["NIMFLOW_GPU_NIM_IMAGE"], os.environ.get("NIMFLOW_GPU_TRTLLM_IMAGE"), folder)
    assert contradictions(folder) == []


@pytest.mark.skipif(_skip_reason("NIMFLOW_GPU_STANDBY") is not None, reason=_skip_reason("NIMFLOW_GPU_STANDBY") or "")
def test_real_nim_blue_green_rollout_drops_no_request(tmp_path: Path, prefect_api: str) -> None:
    """A real NIM served through the front proxy; a changed spec rolls out blue-green onto the standby
    GPU (NIMFLOW_GPU_STANDBY, e.g. 1) while a client loop calls the endpoint: no request fails, and
    the real /v1/models `root` passes the `model` check (record what it is if it does not)."""
    import threading

    import httpx
    from nimflow.flows.host_model import host_model

    spec = {
        "name": "gpu-rollout",
        "source": {"repo_id": os.environ["NIMFLOW_GPU_REPO"]},
        "deploy": {"image": os.environ["NIMFLOW_GPU_NIM_IMAGE"], "served_model_name": "gpu-rollout", "gpus": [0],
                   "host_port": int(os.environ.get("NIMFLOW_GPU_PORT", "18080")),
                   "cache_dir": str(tmp_path / "cache")},
        "rollout": {"strategy": "blue-green", "standby_gpus": [int(os.environ["NIMFLOW_GPU_STANDBY"])]},
    }
    first = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)))
    failures: list[str] = []
    stop = threading.Event()

    def loop() -> None:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                response = client.post(f"{first['endpoint']}/v1/completions",
                                       json={"model": "gpu-rollout", "prompt": "Hello", "max_tokens": 4})
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text[:200]}")

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        spec["deploy"]["env"] = {"NIM_LOG_LEVEL": "DEBUG"}  # a changed spec: a new container
        second = host_model(spec=str(write_spec(tmp_path / "spec.yaml", spec)))
    finally:
        stop.set()
        thread.join(timeout=300)
    assert failures == []
    assert second["replaced_container_id"] == first["container_id"] and "model" in second["checks"]


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_record_image_probe_facts(tmp_path: Path) -> None:
    """Record what the image probe finds in the real images (converters and how their flags were learnt,
    trtllm-build, nim-optimize, user, manifest path) as `image-probe.json`; fail where a fact contradicts
    what nimflow would run (the checks `nimflow plan` makes, for a Llama checkpoint)."""
    from nimflow.containers import docker_client
    from nimflow.image_probe import check_build_against_image, probe_image
    from nimflow.spec import BuildSpec

    client = docker_client()
    images = {"nim": os.environ["NIMFLOW_GPU_NIM_IMAGE"], "trtllm": os.environ.get("NIMFLOW_GPU_TRTLLM_IMAGE")}
    for kind, image in images.items():
        if not image:
            continue
        facts = probe_image(client, image, cache_dir=tmp_path)
        record_dir = _record_folder()
        record_dir.mkdir(parents=True, exist_ok=True)
        (record_dir / f"{kind}-image-probe.json").write_text(facts.model_dump_json(indent=1) + "\n")
        if kind == "nim":
            assert facts.model_manifest, f"{image}: no model manifest at either documented path"
        else:
            check_build_against_image(facts, BuildSpec(backend="trtllm-build", image=image), image=image,
                                      model_config={"architectures": ["LlamaForCausalLM"]})
