"""Reading a container's GPU identity and refusing engines built for another GPU or TensorRT-LLM."""

from __future__ import annotations

import pytest

from nimflow.errors import ConfigError, DeploymentError, EngineIncompatible
from nimflow.gpu_identity import (
    GpuIdentity,
    TargetIdentity,
    check_servable,
    identity_from_probe,
    incompatibilities,
    parse_gpus,
    parse_probe_output,
)

H100 = GpuIdentity(name="NVIDIA H100 80GB HBM3", compute_capability="9.0", pci_device_id="0x233010de")
L40S = GpuIdentity(name="NVIDIA L40S", compute_capability="8.9", pci_device_id="0x26b910de")


def test_parse_nvidia_smi_csv() -> None:
    """`nvidia-smi --query-gpu=name,compute_cap,pci.device_id --format=csv,noheader`, one line per GPU."""
    text = "NVIDIA H100 80GB HBM3, 9.0, 0x233010DE\nNVIDIA H100 80GB HBM3, 9.0, 0x233010DE\n"
    assert parse_gpus(text) == [H100, H100]
    with pytest.raises(ValueError, match="unexpected nvidia-smi line"):
        parse_gpus("No devices were found")


def test_probe_answer_is_the_marked_line_after_any_banner() -> None:
    """Entrypoint banners before the answer are ignored; no marked line means no answer."""
    logs = '=== NVIDIA NIM ===\nbanner {"x": 1}\nNIMFLOW-PROBE {"gpus": "A, 8.0, 0x1", "trtllm_version": "0.17.0"}\n'
    assert parse_probe_output(logs) == {"gpus": "A, 8.0, 0x1", "trtllm_version": "0.17.0"}
    assert parse_probe_output("exec: python3: not found") is None


def test_identity_from_probe() -> None:
    answer = {"gpus": "NVIDIA L40S, 8.9, 0x26B910DE\n", "nvidia_smi_error": None, "trtllm_version": "0.16.0"}
    identity = identity_from_probe(answer, image="nim:1.8", field="build.gpus")
    assert identity == TargetIdentity(gpus=[L40S], trtllm_version="0.16.0")
    assert identity.key_inputs() == {"gpu": L40S.model_dump(), "trtllm_version": "0.16.0"}


def test_no_gpu_visible_names_the_field() -> None:
    """Without a visible GPU the error names the spec field to set, and nvidia-smi's own words."""
    answer = {"gpus": None, "nvidia_smi_error": "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."}
    with pytest.raises(ConfigError) as caught:
        identity_from_probe(answer, image="nim:1.8", field="deploy.gpus")
    assert caught.value.problems[0].location == "deploy.gpus"
    assert "couldn't communicate with the NVIDIA driver" in str(caught.value)


def test_mixed_gpu_models_are_refused() -> None:
    """An engine is bound to one GPU model: a build over an H100 and an L40S is refused up front."""
    answer = {"gpus": "NVIDIA H100 80GB HBM3, 9.0, 0x233010DE\nNVIDIA L40S, 8.9, 0x26B910DE", "trtllm_version": None}
    with pytest.raises(ConfigError, match="different models"):
        identity_from_probe(answer, image="nim:1.8", field="build.gpus")
    with pytest.raises(DeploymentError, match="unexpected nvidia-smi line"):
        identity_from_probe({"gpus": "garbage"}, image="nim:1.8", field="build.gpus")


def test_servable_only_on_the_same_gpu_and_version() -> None:
    """Both GPUs (or versions) are named; force returns the differences instead of raising."""
    built = {"gpu": H100.model_dump(), "trtllm_version": "0.17.0"}
    assert incompatibilities(built, TargetIdentity(gpus=[H100, H100], trtllm_version="0.17.0")) == []
    elsewhere = TargetIdentity(gpus=[L40S], trtllm_version="0.16.0")
    with pytest.raises(EngineIncompatible) as caught:
        check_servable(built, elsewhere, engine_key="k" * 64, force=False)
    message = str(caught.value)
    assert "NVIDIA H100 80GB HBM3 (compute 9.0" in message and "NVIDIA L40S (compute 8.9" in message
    assert "built with 0.17.0, the target image has 0.16.0" in message and "deploy.force" in message
    assert len(check_servable(built, elsewhere, engine_key="k" * 64, force=True)) == 2
