"""Build failures are classified from the build log: permanent ones fail once, transient ones retry."""

from __future__ import annotations

import argparse

import pytest

from nimflow.errors import BuildFailed, ConfigError, TransientBuildError, classify_build_failure, is_transient

END = "\nEngine building failed, please check error log."


def test_cuda_mem_get_info_unknown_error_is_permanent_for_builds() -> None:
    """``cudaMemGetInfo ... unknown error`` in a build is not retried: it names the build config.

    TensorRT-LLM issue 1839 (https://github.com/NVIDIA/TensorRT-LLM/issues/1839) shows it coming
    deterministically from a build config (trtllm-build with --auto_parallel 8), so three retries
    repeat the same failure. On old main this returned a TransientBuildError (``is_transient``
    true), so the assertion below failed.
    """
    logs = "RuntimeError: [TensorRT-LLM][ERROR] CUDA runtime error in cudaMemGetInfo(&free, &total): unknown error" + END
    error = classify_build_failure("trtllm-build", 1, logs)
    assert isinstance(error, BuildFailed) and not is_transient(error)
    assert "exit code 1" in str(error) and logs in str(error)
    assert "build.max_num_tokens" in str(error) and "issue 1839" in str(error)


def test_trtllm_build_too_old_for_max_seq_len_is_a_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    """argparse's ``unrecognized arguments: --max_seq_len`` is a permanent ConfigError naming the flag,
    the image and the fix (the older --max_input_len/--max_output_len, or a release >= 0.12).

    The log is argparse's real refusal: a parser with the pre-0.12 trtllm-build length flags given
    --max_seq_len. On old main the call failed with TypeError (no ``image`` argument); called
    without ``image`` there, it returned a generic BuildFailed holding only the log (no flag, image
    or fix named), so the ConfigError assertion fails.
    """
    parser = argparse.ArgumentParser(prog="trtllm-build")
    for flag in ("--checkpoint_dir", "--output_dir", "--max_input_len", "--max_output_len"):
        parser.add_argument(flag)
    with pytest.raises(SystemExit):
        parser.parse_args(["--checkpoint_dir", "/w/ckpt", "--max_input_len", "8192", "--max_seq_len", "8192"])
    logs = capsys.readouterr().err
    assert "unrecognized arguments: --max_seq_len 8192" in logs

    error = classify_build_failure("trtllm-build", 2, logs, image="nvcr.io/nvidia/tensorrt-llm/release:0.11.0")
    assert isinstance(error, ConfigError) and not is_transient(error)
    assert error.problems[0].location == "build.image"
    message = str(error)
    assert "trtllm-build in nvcr.io/nvidia/tensorrt-llm/release:0.11.0 does not accept --max_seq_len" in message
    assert "--max_input_len/--max_output_len" in message and ">= 0.12" in message


def test_converter_refusing_a_flag_is_a_config_error() -> None:
    """A converter that has no --tp_size (Gemma's) fails as a ConfigError naming the flags and the fix.

    On old main: TypeError (no ``image`` argument); without it, a generic BuildFailed.
    """
    logs = ("usage: convert_checkpoint.py [-h] [--ckpt-type {jax,keras,torch,hf}] --model-dir MODEL_DIR\n"
            "convert_checkpoint.py: error: unrecognized arguments: --tp_size 1 --pp_size 1")
    error = classify_build_failure("convert_checkpoint.py", 2, logs, image="trtllm:0.17")
    assert isinstance(error, ConfigError)
    assert "does not accept --tp_size, --pp_size" in str(error) and "--world-size" in str(error)


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
