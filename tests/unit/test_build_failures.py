"""Build failures are classified from the build log: permanent ones fail once, transient ones retry."""

from __future__ import annotations

import pytest

from nimflow.errors import BuildFailed, TransientBuildError, classify_build_failure, is_transient

END = "\nEngine building failed, please check error log."


def test_cuda_driver_glitch_is_transient() -> None:
    """cudaMemGetInfo failures are a node problem: transient, logs included."""
    logs = "RuntimeError: [TensorRT-LLM][ERROR] CUDA runtime error in cudaMemGetInfo(&free, &total): unknown error" + END
    error = classify_build_failure("trtllm-build", 1, logs)
    assert isinstance(error, TransientBuildError) and is_transient(error)
    assert "exit code 1" in str(error) and logs in str(error)


@pytest.mark.parametrize(
    "logs",
    [
        "RuntimeError: NCCL error in: /src/allreducePlugin.cpp:512, unhandled system error",
        "MPI_Init failed",
        "RuntimeError: Unexpected error from cudaGetDeviceCount(). Did you run some cuda functions before?",
    ],
)
def test_other_transient_signs(logs: str) -> None:
    """NCCL, MPI and CUDA device-count start-up failures are transient."""
    assert isinstance(classify_build_failure("nim-optimize", 1, logs + END), TransientBuildError)


def test_sigterm_is_transient() -> None:
    """A build stopped from outside (exit 143: SIGTERM, a preemption) is retried."""
    assert isinstance(classify_build_failure("trtllm-build", 143, "[TRT-LLM] building layer 12"), TransientBuildError)


@pytest.mark.parametrize(
    ("exit_code", "logs", "advice"),
    [
        (137, "[TRT-LLM] building layer 12", "more RAM"),
        (1, "[TRT-LLM] building layer 12\nKilled", "more RAM"),
        (1, "[TRT] [E] 2: [virtualMemoryBuffer.cpp::resizePhysical::140] Error Code 2: OutOfMemory (no further information)",
         "build.max_num_tokens"),
        (1, "[TRT] [E] Requested amount of GPU memory (17179869184 bytes) could not be allocated.", "raise build.tp_size"),
        (1, "ValueError: Unsupported model architecture: FooForCausalLM", "support matrix"),
        (1, "The engine plan file is generated on an incompatible device, expecting compute 9.0 got compute 8.9, please rebuild.",
         "rebuild for the target"),
        (1, "Serialization assertion stdVersionRead == kSERIALIZATION_VERSION failed.Version tag does not match", "rebuild"),
        (1, "bf16 is not supported on compute capability 7.5 (needs SM >= 80)", "build.dtype"),
        (1, "ValueError: `rope_scaling` must be a dictionary with two fields", "newer build image"),
    ],
    ids=["exit-137", "killed", "gpu-oom", "gpu-alloc", "arch", "device", "version", "bf16", "rope"],
)
def test_permanent_failures_name_cause_and_fix(exit_code: int, logs: str, advice: str) -> None:
    """Deterministic failures are permanent (tried once) and say what to change."""
    error = classify_build_failure("trtllm-build", exit_code, logs + END)
    assert type(error) is BuildFailed and not is_transient(error)
    assert advice in str(error)
    assert f"exit code {exit_code}" in str(error)


def test_oom_reported_through_cuda_call_is_still_oom() -> None:
    """Permanent signs win over transient ones: an OOM inside cudaMemGetInfo is not retried."""
    logs = "CUDA runtime error in cudaMemGetInfo: out of memory\n[TRT] [E] Error Code 2: OutOfMemory"
    assert type(classify_build_failure("trtllm-build", 1, logs)) is BuildFailed


def test_unknown_failure_is_permanent_without_advice() -> None:
    """An unrecognised failure is permanent with the logs and no made-up advice."""
    error = classify_build_failure("nim-optimize", 2, "ValueError: something odd")
    assert type(error) is BuildFailed
    assert "something odd" in str(error) and "Cause:" not in str(error)
