"""Build config rules: each bad value is refused with a clear message before any GPU time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from nimflow.build_config import (
    check_against_model,
    check_against_target,
    check_built_engine,
    convert_arguments,
    convert_script,
    jit_environment,
    normalized_build_config,
    read_engine_config,
    render_nim_optimize_config,
    trtllm_build_arguments,
)
from nimflow.errors import BuildFailed, ConfigError
from nimflow.gpu_identity import GpuIdentity, TargetIdentity
from nimflow.spec import BuildSpec, parse_spec

LLAMA = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 16}
A100 = GpuIdentity(name="NVIDIA A100-SXM4-80GB", compute_capability="8.0", pci_device_id="0x20b210de")
T4 = GpuIdentity(name="Tesla T4", compute_capability="7.5", pci_device_id="0x1eb810de")


def build(**fields: Any) -> BuildSpec:
    return BuildSpec(**{"backend": "trtllm-build", "image": "trtllm:0.17", **fields})


def spec_problems(**build_fields: Any) -> str:
    """The `nimflow validate` message for a spec with this build section ('' when valid)."""
    data = {"name": "m", "source": {"repo_id": "org/m"}, "cache": {"uri": "s3://engine-bucket/p"},
            "build": {"backend": "nim-optimize", "image": "nim:1.8", **build_fields},
            "deploy": {"image": "nim:1.8", "served_model_name": "m", "cache_dir": "/c"}}
    try:
        parse_spec(data, "spec.yaml")
    except ConfigError as exc:
        return str(exc)
    return ""


# --- validated by `nimflow validate` ----------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"backend": "nim-jit", "dtype": "bfloat16"}, "build.dtype: the nim-jit backend cannot set dtype"),
        ({"backend": "nim-jit", "max_batch_size": 8}, "build.max_batch_size: the nim-jit backend cannot set max_batch_size"),
        ({"backend": "nim-jit", "max_num_tokens": 8}, "build.max_num_tokens: the nim-jit backend cannot set max_num_tokens"),
        ({"convert_script": "/x.py"},
         "build.convert_script: the nim-optimize backend cannot set convert_script; remove it, or use backend trtllm-build"),
        ({"dtype": "float32"}, "build.dtype: float32 is not a precision the nim-optimize backend builds"),
        ({"tp_size": 2, "gpus": [0]}, "build.gpus: 1 GPU(s) given but tp_size x pp_size = 2"),
        ({"max_batch_size": 2, "max_seq_len": 100, "max_num_tokens": 1000},
         "max_num_tokens (1000) must be <= max_batch_size x max_seq_len (200)"),
        ({"env": {"NIM_FT_MODEL": "/x"}}, "build.env: NIM_FT_MODEL is set by nimflow"),
        ({"env": {"HF_TOKEN": "hf_x"}}, "build.env: HF_TOKEN is a secret"),
    ],
    ids=["jit-dtype", "jit-batch", "jit-tokens", "convert-script", "dtype", "gpu-count", "tokens", "reserved-env", "secret-env"],
)
def test_spec_rules_name_field_and_backend(fields: dict[str, Any], expected: str) -> None:
    """Each rule rejects a bad value naming the file, the field and (where it matters) the backend."""
    message = spec_problems(**fields)
    assert expected in message
    assert message.startswith("spec.yaml: ")


def test_deploy_gpus_must_match_engine_ranks() -> None:
    """Serving a tp=2 engine on one GPU is refused at validation time."""
    data = {"name": "m", "source": {"repo_id": "org/m"}, "cache": {"uri": "s3://engine-bucket/p"},
            "build": {"backend": "nim-optimize", "image": "nim:1.8", "tp_size": 2},
            "deploy": {"image": "nim:1.8", "served_model_name": "m", "cache_dir": "/c", "gpus": [3]}}
    with pytest.raises(ConfigError, match="deploy.gpus: 1 GPU.s. given but the engine has tp_size x pp_size = 2"):
        parse_spec(data)


def test_valid_specs_pass_and_get_explicit_limits() -> None:
    """Backends that take limits get explicit defaults; nim-jit gets none it cannot honour."""
    assert spec_problems() == ""
    assert spec_problems(backend="nim-jit", tp_size=2, max_seq_len=4096) == ""
    optimize = BuildSpec(backend="nim-optimize", image="x")
    assert (optimize.dtype, optimize.max_seq_len, optimize.max_batch_size, optimize.max_num_tokens) == ("float16", 8192, 64, 8192)
    jit = BuildSpec(backend="nim-jit", image="x")
    assert (jit.dtype, jit.max_seq_len, jit.max_batch_size, jit.max_num_tokens) == (None, None, None, None)


# --- checked against the model's config.json, right after download ----------------------------


@pytest.mark.parametrize(
    ("fields", "config", "field", "text"),
    [
        ({"tp_size": 3}, LLAMA, "build.tp_size", "num_attention_heads of m/config.json is 32, not divisible by tp_size 3"),
        ({"tp_size": 2}, {**LLAMA, "num_attention_heads": 12, "num_key_value_heads": 3}, "build.tp_size",
         "num_key_value_heads of m/config.json is 3: tp_size 2 can neither split nor duplicate them"),
        ({"pp_size": 32}, LLAMA, "build.pp_size", "pp_size 32 exceeds the 16 layers"),
        ({}, {**LLAMA, "architectures": ["BertModel"]}, "build.backend", "is a BertModel; the trtllm-build backend builds"),
    ],
    ids=["heads", "kv-heads", "layers", "architecture"],
)
def test_model_rules(fields: dict[str, Any], config: dict[str, Any], field: str, text: str) -> None:
    """Rules that need the model's config.json reject bad values naming field and values."""
    with pytest.raises(ConfigError) as caught:
        check_against_model(build(**fields), config, where="m/config.json")
    assert any(p.location == field and text in p.message for p in caught.value.problems), caught.value.problems


def test_model_rules_accept_a_fitting_build() -> None:
    """A tp that divides both head counts, on a supported architecture, passes."""
    check_against_model(build(tp_size=8, pp_size=2), LLAMA, where="m")
    check_against_model(build(tp_size=16), LLAMA, where="m")  # 8 KV heads duplicated over 16 ranks


def test_custom_convert_script_allows_other_architectures() -> None:
    """With an explicit convert_checkpoint.py the architecture is the user's call."""
    check_against_model(build(convert_script="/app/x/convert_checkpoint.py"), {**LLAMA, "architectures": ["FooForCausalLM"]}, where="m")


# --- checked against the probed GPUs ---------------------------------------------------------


def test_target_rules() -> None:
    """GPU count must equal tp x pp; bf16 needs compute capability 8.0."""
    with pytest.raises(ConfigError) as caught:
        check_against_target(build(tp_size=2, dtype="bfloat16"), TargetIdentity(gpus=[T4], trtllm_version="0.17.0"))
    messages = {p.location: p.message for p in caught.value.problems}
    assert "sees 1 GPU(s) (Tesla T4) but tp_size x pp_size = 2" in messages["build.gpus"]
    assert "bfloat16 needs compute capability >= 8.0; Tesla T4" in messages["build.dtype"]
    check_against_target(build(tp_size=2, dtype="bfloat16"), TargetIdentity(gpus=[A100, A100], trtllm_version="0.17.0"))


# --- what each backend is given ----------------------------------------------------------------


def test_nim_optimize_yaml_has_exactly_its_fields() -> None:
    """The nim-optimize build YAML has the engine's parameters with the spec's values, nothing else."""
    spec = BuildSpec(backend="nim-optimize", image="x", dtype="bfloat16", tp_size=2, pp_size=2, max_seq_len=2048,
                     max_batch_size=8, max_num_tokens=1000, gpus=[0, 1, 2, 3], shm_size="32g", timeout_seconds=99)
    assert yaml.safe_load(render_nim_optimize_config(spec)) == {
        "dtype": "bfloat16", "tp_size": 2, "pp_size": 2, "max_seq_len": 2048, "max_batch_size": 8, "max_num_tokens": 1000,
    }


def test_jit_environment_passes_what_nim_honours() -> None:
    """JIT gets tp, pp and the context length as NIM variables; the context length only when set."""
    assert jit_environment(BuildSpec(backend="nim-jit", image="x", tp_size=2, max_seq_len=4096)) == {
        "NIM_TENSOR_PARALLEL_SIZE": "2", "NIM_PIPELINE_PARALLEL_SIZE": "1", "NIM_MAX_MODEL_LEN": "4096",
    }
    assert "NIM_MAX_MODEL_LEN" not in jit_environment(BuildSpec(backend="nim-jit", image="x"))


def test_trtllm_commands_have_every_limit_explicit() -> None:
    """convert_checkpoint.py fixes dtype and mapping; trtllm-build gets every limit and a timing cache path."""
    spec = build(dtype="bfloat16", tp_size=2, max_seq_len=4096, max_batch_size=16, max_num_tokens=2048)
    assert convert_script(spec, LLAMA) == "/app/tensorrt_llm/examples/models/core/llama/convert_checkpoint.py"
    assert convert_script(spec, {"architectures": ["Qwen2ForCausalLM"]}).endswith("/qwen/convert_checkpoint.py")
    convert = convert_arguments(spec, LLAMA, "/m", "/w/ckpt")
    assert dict(zip(convert[::2], convert[1::2], strict=False)) == {
        "--model_dir": "/m", "--output_dir": "/w/ckpt", "--dtype": "bfloat16", "--tp_size": "2", "--pp_size": "1"}
    args = trtllm_build_arguments(spec, "/w/ckpt", "/o/trtllm_engine", "/w/timing.cache")
    assert dict(zip(args[::2], args[1::2], strict=False)) == {
        "--checkpoint_dir": "/w/ckpt", "--output_dir": "/o/trtllm_engine", "--max_batch_size": "16", "--max_input_len": "4096",
        "--max_seq_len": "4096", "--max_num_tokens": "2048", "--output_timing_cache": "/w/timing.cache"}


def test_normalized_config_excludes_host_details() -> None:
    """The key's build part has the backend's fields and env, not GPUs, shm, timeout or image."""
    config = normalized_build_config(build(gpus=[0], shm_size="1g", timeout_seconds=5, env={"B": "1", "A": "2"}))
    assert config == {"backend": "trtllm-build", "dtype": "float16", "tp_size": 1, "pp_size": 1, "max_seq_len": 8192,
                      "max_batch_size": 64, "max_num_tokens": 8192, "env": {"A": "2", "B": "1"}}
    assert normalized_build_config(build(convert_script="/c.py"))["convert_script"] == "/c.py"


# --- checked after the build, from the engine's own config ---------------------------------------


def write_engine(root: Path, *, ranks: int = 1, version: str | None = "0.17.0", **build_config: Any) -> Path:
    engine = root / "trtllm_engine"
    engine.mkdir(parents=True)
    config = {"pretrained_config": {"architecture": "LlamaForCausalLM", "dtype": "float16",
                                    "mapping": {"world_size": ranks, "tp_size": ranks, "pp_size": 1}},
              "build_config": {"max_batch_size": 64, "max_seq_len": 8192, "max_num_tokens": 8192, **build_config}}
    if version:
        config["version"] = version
    (engine / "config.json").write_text(json.dumps(config))
    for rank in range(ranks):
        (engine / f"rank{rank}.engine").write_bytes(b"x")
    return root


def test_built_engine_matching_the_spec_passes(tmp_path: Path) -> None:
    built = read_engine_config(write_engine(tmp_path))
    assert built["max_num_tokens"] == 8192 and built["version"] == "0.17.0" and built["tp_size"] == 1
    check_built_engine(build(), built, trtllm_version="0.17.0")


def test_built_engine_that_differs_fails_naming_both_values(tmp_path: Path) -> None:
    """A backend that clipped or ignored a limit is caught: spec and engine values both named."""
    built = read_engine_config(write_engine(tmp_path, max_num_tokens=4096))
    with pytest.raises(BuildFailed, match="max_num_tokens: spec 8192, engine 4096"):
        check_built_engine(build(), built, trtllm_version="0.17.0")
    with pytest.raises(BuildFailed, match="TensorRT-LLM version: image 0.18.0, engine 0.17.0"):
        check_built_engine(build(max_num_tokens=4096), built, trtllm_version="0.18.0")


def test_jit_engine_checked_only_on_what_jit_sets(tmp_path: Path) -> None:
    """A JIT build is held to tp/pp/max_seq_len only; its batch size is whatever NIM chose."""
    built = read_engine_config(write_engine(tmp_path, max_batch_size=2048))
    check_built_engine(BuildSpec(backend="nim-jit", image="x", max_seq_len=8192), built, trtllm_version=None)
    with pytest.raises(BuildFailed, match="max_seq_len: spec 4096, engine 8192"):
        check_built_engine(BuildSpec(backend="nim-jit", image="x", max_seq_len=4096), built, trtllm_version=None)


def test_engine_without_version_or_ranks_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BuildFailed, match="no `version`"):
        read_engine_config(write_engine(tmp_path / "old", version=None))
    root = write_engine(tmp_path / "partial", ranks=2)
    (root / "trtllm_engine" / "rank1.engine").unlink()
    with pytest.raises(BuildFailed, match="rank1.engine missing"):
        read_engine_config(root)
    with pytest.raises(BuildFailed, match="cannot read the engine config"):
        read_engine_config(tmp_path / "nothing")
