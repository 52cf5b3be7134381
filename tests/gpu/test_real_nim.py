"""The flow with real NIM 1.x and TensorRT-LLM images on a GPU host (marker `gpu`).

Skipped, with the reason, wherever there is no GPU or no image configured. To run on a GPU host
(images pulled, HF_TOKEN and AWS credentials exported):

    NIMFLOW_GPU_NIM_IMAGE=nvcr.io/nim/meta/llama-3.1-8b-instruct:1.8.0 \
    NIMFLOW_GPU_TRTLLM_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:0.17.0 \
    NIMFLOW_GPU_REPO=meta-llama/Llama-3.2-1B-Instruct NIMFLOW_GPU_S3_URI=s3://bucket/prefix \
    .venv/bin/python -m pytest -m gpu

`test_record_real_cli_output` writes the real `nim-optimize -h`, `list-model-profiles` and GPU
probe output under `$NIMFLOW_GPU_RECORD_DIR` (default `tests/gpu/recorded/`), so the stand-in's
flags and texts can be checked against them; `test_record_image_probe_facts` writes what the image
probe found in each image (`image-probe.json`); commit what they write.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
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
        "deploy": {"image": image, "served_model_name": name, "gpus": [0], "user": "root",
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
def test_record_real_cli_output(tmp_path: Path) -> None:
    """Record the real `nim-optimize -h`, `list-model-profiles` and GPU probe; check the stand-in's flags exist."""
    from nimflow.containers import device_requests, docker_client, run_to_exit
    from nimflow.gpu_identity import PROBE_SCRIPT, identity_from_probe, parse_probe_output

    image = os.environ["NIMFLOW_GPU_NIM_IMAGE"]
    client = docker_client()
    record_dir = Path(os.environ.get("NIMFLOW_GPU_RECORD_DIR", Path(__file__).parent / "recorded"))
    record_dir = record_dir / re.sub(r"[^A-Za-z0-9._-]+", "_", image)
    record_dir.mkdir(parents=True, exist_ok=True)
    outputs = {}
    for name, command in (("nim-optimize-help", ["nim-optimize", "-h"]), ("list-model-profiles", ["list-model-profiles"]),
                          ("gpu-probe", ["python3", "-c", PROBE_SCRIPT])):
        ended = run_to_exit(client, image, command, name=f"nimflow-record-{uuid.uuid4().hex[:8]}", deadline_seconds=600,
                            log_lines=2000, device_requests=device_requests([0]), user="root")
        (record_dir / f"{name}.txt").write_text(f"$ {' '.join(command[:2])}\n# exit code {ended.exit_code}\n{ended.logs}\n")
        outputs[name] = ended.logs
    missing = [flag for flag in NIM_OPTIMIZE_FLAGS if flag not in outputs["nim-optimize-help"]]
    assert not missing, f"the real nim-optimize lacks {missing}: update nimflow/engine_build.py and the stand-in"
    answer = parse_probe_output(outputs["gpu-probe"])
    assert answer is not None
    identity = identity_from_probe(answer, image=image, field="build.gpus")
    assert identity.trtllm_version, "no tensorrt_llm package metadata found in the NIM image: extend PROBE_SCRIPT's search"
    assert "SYSTEM INFO" in outputs["list-model-profiles"]


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
                   "user": "root", "host_port": int(os.environ.get("NIMFLOW_GPU_PORT", "18080")),
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
        record_dir = Path(os.environ.get("NIMFLOW_GPU_RECORD_DIR", Path(__file__).parent / "recorded"))
        record_dir = record_dir / re.sub(r"[^A-Za-z0-9._-]+", "_", image)
        record_dir.mkdir(parents=True, exist_ok=True)
        (record_dir / "image-probe.json").write_text(facts.model_dump_json(indent=1) + "\n")
        if kind == "nim":
            assert facts.model_manifest, f"{image}: no model manifest at either documented path"
        else:
            check_build_against_image(facts, BuildSpec(backend="trtllm-build", image=image), image=image,
                                      model_config={"architectures": ["LlamaForCausalLM"]})
