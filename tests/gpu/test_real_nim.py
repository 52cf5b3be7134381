"""The flow with a real NIM 1.x image on a GPU host (marker `gpu`).

Skipped, with the reason, wherever there is no GPU or no NIM image configured. To run on a GPU host
(image pulled, HF_TOKEN and AWS credentials exported):

    NIMFLOW_GPU_NIM_IMAGE=nvcr.io/nim/meta/llama-3.1-8b-instruct:1.8.0 \
    NIMFLOW_GPU_REPO=meta-llama/Llama-3.2-1B-Instruct NIMFLOW_GPU_S3_URI=s3://bucket/prefix \
    .venv/bin/python -m pytest -m gpu
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import write_spec

pytestmark = pytest.mark.gpu

REQUIRED = ("NIMFLOW_GPU_NIM_IMAGE", "NIMFLOW_GPU_REPO", "NIMFLOW_GPU_S3_URI")


def _skip_reason() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return "GPU-only: no NVIDIA GPU here (nvidia-smi not found); real NIM images need one"
    missing = [name for name in REQUIRED if not os.environ.get(name)]
    if missing:
        return f"GPU-only: set {', '.join(missing)} (a pulled NIM 1.x image, an HF repo, an S3 prefix)"
    return None


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
@pytest.mark.parametrize("backend", ["nim-optimize", "nim-jit"])
def test_real_nim_builds_caches_and_serves(tmp_path: Path, prefect_api: str, backend: str) -> None:
    from flows.host_model import host_model

    image = os.environ["NIMFLOW_GPU_NIM_IMAGE"]
    name = f"gpu-{backend}"
    spec = {
        "name": name,
        "source": {"repo_id": os.environ["NIMFLOW_GPU_REPO"]},
        "build": {"backend": backend, "image": image, "gpus": [0], "tp_size": 1, "max_seq_len": 4096,
                  "max_batch_size": 8, "max_num_tokens": 4096},
        "cache": {"uri": f"{os.environ['NIMFLOW_GPU_S3_URI'].rstrip('/')}/{name}"},
        "deploy": {"image": image, "served_model_name": name, "gpus": [0], "user": "root",
                   "host_port": int(os.environ.get("NIMFLOW_GPU_PORT", "18080")), "cache_dir": str(tmp_path / "cache")},
    }
    config = write_spec(tmp_path / "spec.yaml", spec)
    first = host_model(config_path=str(config))
    assert first["engine_origin"] in ("built", "engine-store") and first["completion"].strip()
    again = host_model(config_path=str(config))
    assert again["engine_origin"] == "local-cache" and again["uploaded_files"] == 0 and again["downloaded_files"] == 0
