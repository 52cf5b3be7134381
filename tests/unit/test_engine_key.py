"""The engine key: every input that makes an engine valid changes it, nothing else does."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from nimflow.engine_key import KEY_SCHEMA, differing_inputs, engine_key, engine_key_inputs
from nimflow.gpu_identity import GpuIdentity, TargetIdentity
from nimflow.spec import parse_spec

WEIGHTS = "hf:org/tiny-llama@0123456789abcdef0123456789abcdef01234567"
IMAGE_ID = "sha256:" + "a" * 64
H100 = GpuIdentity(name="NVIDIA H100 80GB HBM3", compute_capability="9.0", pci_device_id="0x233010de")
SPEC: dict[str, Any] = {
    "name": "tiny",
    "source": {"repo_id": "org/tiny-llama"},
    "build": {"backend": "nim-optimize", "image": "nvcr.io/nim/meta/llama:1.8.0", "dtype": "float16", "tp_size": 1,
              "max_seq_len": 2048, "max_batch_size": 8, "max_num_tokens": 2048, "gpus": [0]},
    "cache": {"uri": "s3://engines/nim"},
    "deploy": {"image": "nvcr.io/nim/meta/llama:1.8.0", "served_model_name": "tiny", "cache_dir": "/tmp/nim-cache",
               "gpus": [0], "host_port": 8000},
}


def key_of(
    spec: dict[str, Any] = SPEC, *, weights: str = WEIGHTS, image_id: str = IMAGE_ID, gpu: GpuIdentity = H100,
    trtllm_version: str | None = "0.17.0",
) -> str:
    """The engine key a host computes for ``spec`` with these probed/inspected values."""
    parsed = parse_spec(spec)
    assert parsed.build is not None
    target = TargetIdentity(gpus=[gpu] * parsed.build.world_size, trtllm_version=trtllm_version)
    return engine_key(engine_key_inputs(weights_identity=weights, build=parsed.build, image_id=image_id, target=target,
                                        allow_patterns=parsed.source.allow_patterns))


def changed(section: str, **fields: Any) -> dict[str, Any]:
    """SPEC with ``fields`` of ``section`` replaced."""
    spec = copy.deepcopy(SPEC)
    spec[section].update(fields)
    return spec


def with_deploy_gpus(spec: dict[str, Any], gpus: Any) -> dict[str, Any]:
    """``spec`` serving on ``gpus`` (one per rank)."""
    spec["deploy"]["gpus"] = gpus
    return spec


def test_same_inputs_same_key() -> None:
    """The key is deterministic and 64 lowercase hex characters."""
    key = key_of()
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    assert key_of() == key


KEY_INPUTS = {
    "weights revision": lambda: key_of(weights="hf:org/tiny-llama@" + "f" * 40),
    "fine-tune digest": lambda: key_of(weights=WEIGHTS + "+ft:sha256:" + "b" * 64),
    "image id": lambda: key_of(image_id="sha256:" + "b" * 64),
    "trtllm version": lambda: key_of(trtllm_version="0.16.0"),
    "gpu name": lambda: key_of(gpu=H100.model_copy(update={"name": "NVIDIA H100 PCIe"})),
    "compute capability": lambda: key_of(gpu=H100.model_copy(update={"compute_capability": "8.9"})),
    "pci device id": lambda: key_of(gpu=H100.model_copy(update={"pci_device_id": "0x233110de"})),
    "dtype": lambda: key_of(changed("build", dtype="bfloat16")),
    "tp_size": lambda: key_of(with_deploy_gpus(changed("build", tp_size=2, gpus=[0, 1]), [0, 1])),
    "pp_size": lambda: key_of(with_deploy_gpus(changed("build", pp_size=2, gpus=None), None)),
    "max_seq_len": lambda: key_of(changed("build", max_seq_len=4096)),
    "max_batch_size": lambda: key_of(changed("build", max_batch_size=16)),
    "max_num_tokens": lambda: key_of(changed("build", max_num_tokens=1024)),
    "backend": lambda: key_of(changed("build", backend="trtllm-build")),
    "build env": lambda: key_of(changed("build", env={"NIM_MANIFEST_PROFILE": "tp1-latency"})),
    "source.allow_patterns": lambda: key_of(changed("source", allow_patterns=["*.safetensors", "config.json"])),
    "trtllm convert_script": lambda: key_of(changed("build", backend="trtllm-build", convert_script="/x/convert.py")),
}


@pytest.mark.parametrize("name", list(KEY_INPUTS))
def test_every_key_input_changes_the_key(name: str) -> None:
    """Changing any single input that makes an engine valid gives another key."""
    assert KEY_INPUTS[name]() != key_of()


NOT_KEY_INPUTS = {
    "deploy.host_port": changed("deploy", host_port=9000),
    "deploy.shm_size": changed("deploy", shm_size="64g"),
    "deploy.gpus (same model)": changed("deploy", gpus=[3]),
    "deploy.env": changed("deploy", env={"NIM_LOG_LEVEL": "DEBUG"}),
    "verify.deadline_seconds": {**SPEC, "verify": {"deadline_seconds": 60}},
    "build.shm_size": changed("build", shm_size="64g"),
    "build.timeout_seconds": changed("build", timeout_seconds=60),
    "build.gpus (same model)": changed("build", gpus=[5]),
    "build.image tag (same id)": changed("build", image="nvcr.io/nim/meta/llama:latest"),
    "cache.uri": changed("cache", uri="s3://other-bucket/x"),
    "name": {**SPEC, "name": "other-name"},
    "build.env log level": changed("build", env={"NIM_LOG_LEVEL": "DEBUG", "TLLM_LOG_LEVEL": "INFO"}),
    "build.env proxy": changed("build", env={"HTTPS_PROXY": "http://proxy:3128"}),
}


@pytest.mark.parametrize("name", list(NOT_KEY_INPUTS))
def test_host_details_do_not_change_the_key(name: str) -> None:
    """Ports, shm, timeouts, which GPU ids (of the same model), tags and names leave the key alone."""
    assert key_of(NOT_KEY_INPUTS[name]) == key_of()


def test_inputs_record_what_the_key_hashes() -> None:
    """The recorded inputs carry the schema, weights, build config, image, GPU and TensorRT-LLM version."""
    parsed = parse_spec(SPEC)
    assert parsed.build is not None
    inputs = engine_key_inputs(
        weights_identity=WEIGHTS, build=parsed.build, image_id=IMAGE_ID, target=TargetIdentity(gpus=[H100], trtllm_version="0.17.0")
    )
    assert inputs["schema"] == KEY_SCHEMA == "nimflow-engine-key/3"
    assert inputs["files"] is None  # no allow_patterns: the whole repo
    assert inputs["gpu"] == {"name": H100.name, "compute_capability": "9.0", "pci_device_id": "0x233010de"}
    assert inputs["trtllm_version"] == "0.17.0" and inputs["image_id"] == IMAGE_ID and inputs["weights"] == WEIGHTS
    assert inputs["build"] == {"backend": "nim-optimize", "dtype": "float16", "tp_size": 1, "pp_size": 1, "max_seq_len": 2048,
                               "max_batch_size": 8, "max_num_tokens": 2048, "env": {}}
    assert inputs["builder"]["commands"][0][0] == "nim-optimize" and "max_batch_size: 8" in inputs["builder"]["build_config"]
    reordered = dict(reversed(list(inputs.items())))
    assert engine_key(reordered) == engine_key(inputs)


def test_jit_key_hashes_only_what_jit_honours() -> None:
    """A nim-jit build config has no dtype/batch/tokens: NIM cannot be told them, so they are not hashed."""
    spec = changed("build", backend="nim-jit", dtype=None, max_batch_size=None, max_num_tokens=None)
    parsed = parse_spec(spec)
    assert parsed.build is not None
    inputs = engine_key_inputs(weights_identity=WEIGHTS, build=parsed.build, image_id=IMAGE_ID,
                               target=TargetIdentity(gpus=[H100], trtllm_version=None))
    assert inputs["build"] == {"backend": "nim-jit", "tp_size": 1, "pp_size": 1, "max_seq_len": 2048, "env": {}}


def test_differing_inputs_names_each_leaf() -> None:
    """`cache explain KEY KEY2` lists the leaf inputs that differ, with both values."""
    a = {"gpu": {"name": "A", "compute_capability": "8.0"}, "build": {"dtype": "float16"}, "weights": "w"}
    b = {"gpu": {"name": "B", "compute_capability": "8.0"}, "build": {"dtype": "bfloat16"}, "weights": "w"}
    assert differing_inputs(a, b) == [("build.dtype", "float16", "bfloat16"), ("gpu.name", "A", "B")]


def test_allow_patterns_are_a_set() -> None:
    """Order and repeats of allow_patterns do not change what is downloaded, nor the key."""
    first = key_of(changed("source", allow_patterns=["config.json", "*.safetensors"]))
    assert key_of(changed("source", allow_patterns=["*.safetensors", "config.json", "config.json"])) == first


def test_the_builder_command_line_is_hashed_from_the_build_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """A flag nimflow passes to trtllm-build changes the key without a schema bump.

    The key and the build take their command lines from the same function, so changing one
    changes the other (here: a different trtllm-build argument list).
    """
    from nimflow import build_config

    spec = changed("build", backend="trtllm-build")
    before = key_of(spec)
    original = build_config.trtllm_build_arguments
    monkeypatch.setattr("nimflow.engine_build.trtllm_build_arguments",
                        lambda *args: [*original(*args), "--gemm_plugin", "auto"])
    assert key_of(spec) != before
