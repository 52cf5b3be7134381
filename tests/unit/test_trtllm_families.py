"""The per-family conversion table, checked against the converters' real arguments.

The ``--help`` fixtures under ``tests/unit/fixtures/trtllm/`` are reconstructed from the
``add_argument`` calls of the public TensorRT-LLM sources, one per layout: releases up to 0.17
(``examples/<family>/``) and from 0.18 (``examples/models/core/<family>/``); each names its source
URL in its header.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nimflow.build_config import check_against_model, convert_arguments, convert_script, trtllm_build_arguments
from nimflow.engine_build import builder_invocation
from nimflow.errors import ConfigError
from nimflow.spec import BuildSpec, parse_spec
from nimflow.trtllm_families import (
    FAMILIES,
    check_command_against_help,
    family_for,
    missing_flags,
    parse_help_flags,
    script_candidates,
)

FIXTURES = Path(__file__).parent / "fixtures" / "trtllm"
#: Both layouts' --help of each family's converter.
HELP_FIXTURES = {
    "llama": ("llama-examples-llama.help", "llama-models-core-llama.help"),
    "qwen2": ("qwen-examples-qwen.help", "qwen-models-core-qwen.help"),
    "gemma": ("gemma-examples-gemma.help", "gemma-models-core-gemma.help"),
    "phi3": ("phi-examples-phi.help", "phi-models-core-phi.help"),
}


def help_text(name: str) -> str:
    return (FIXTURES / name).read_text()


def build(**fields: Any) -> BuildSpec:
    return BuildSpec(**{"backend": "trtllm-build", "image": "nvcr.io/nvidia/tensorrt-llm/release:0.17.0", **fields})


def config(architecture: str, heads: int = 16, kv_heads: int = 8, layers: int = 16) -> dict[str, Any]:
    return {"architectures": [architecture], "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "num_hidden_layers": layers}


# --- every row's command line --------------------------------------------------------------------

EXPECTED_COMMANDS = {
    "LlamaForCausalLM": ("llama", ["--model_dir", "/m", "--output_dir", "/c", "--dtype", "bfloat16",
                                   "--tp_size", "2", "--pp_size", "1"]),
    "MistralForCausalLM": ("llama", ["--model_dir", "/m", "--output_dir", "/c", "--dtype", "bfloat16",
                                     "--tp_size", "2", "--pp_size", "1"]),
    "MixtralForCausalLM": ("llama", ["--model_dir", "/m", "--output_dir", "/c", "--dtype", "bfloat16",
                                     "--tp_size", "2", "--pp_size", "1"]),
    "Qwen2ForCausalLM": ("qwen", ["--model_dir", "/m", "--output_dir", "/c", "--dtype", "bfloat16",
                                  "--tp_size", "2", "--pp_size", "1"]),
    "GemmaForCausalLM": ("gemma", ["--model-dir", "/m", "--output-model-dir", "/c", "--ckpt-type", "hf",
                                   "--dtype", "bfloat16", "--world-size", "2"]),
    "Gemma2ForCausalLM": ("gemma", ["--model-dir", "/m", "--output-model-dir", "/c", "--ckpt-type", "hf",
                                    "--dtype", "bfloat16", "--world-size", "2"]),
    "Phi3ForCausalLM": ("phi", ["--model_dir", "/m", "--output_dir", "/c", "--dtype", "bfloat16",
                                "--tp_size", "2", "--pp_size", "1"]),
}


@pytest.mark.parametrize("architecture", sorted(EXPECTED_COMMANDS))
def test_each_row_builds_its_converters_command_line(architecture: str) -> None:
    """Each architecture gets its family's script and flags, accepted by both releases' --help.

    Run on old main every row failed with TypeError (convert_arguments took no model config, one
    llama-style line for all). Its Gemma line, printed there by hand, was ``--model_dir /m --output_dir
    /c --dtype float16 --tp_size 1 --pp_size 1`` with no ``--ckpt-type``: the next test shows both
    Gemma releases' --help refusing it.
    """
    directory, expected = EXPECTED_COMMANDS[architecture]
    spec = build(dtype="bfloat16", tp_size=2)
    assert convert_script(spec, config(architecture)) == (
        f"/app/tensorrt_llm/examples/models/core/{directory}/convert_checkpoint.py")
    arguments = convert_arguments(spec, config(architecture), "/m", "/c")
    assert arguments == expected
    family = family_for(architecture)
    assert family is not None
    for fixture in HELP_FIXTURES[family.name]:
        assert missing_flags(arguments, parse_help_flags(help_text(fixture))) == [], fixture


def test_every_family_cites_both_layouts_and_both_script_paths() -> None:
    """Every row cites a GitHub source per layout, and the probe gets both script locations."""
    for family in FAMILIES:
        assert len(family.sources) == 2 and all(s.startswith("https://github.com/NVIDIA/TensorRT-LLM/blob/") for s in family.sources)
        assert "/examples/models/core/" in family.sources[1] and "/examples/models/core/" not in family.sources[0]
        assert script_candidates(family) == [
            f"/app/tensorrt_llm/examples/models/core/{family.example_dir}/convert_checkpoint.py",
            f"/app/tensorrt_llm/examples/{family.example_dir}/convert_checkpoint.py",
        ]


def test_old_llama_style_gemma_command_is_refused_by_the_real_help() -> None:
    """The command line old main built for Gemma is refused by both Gemma releases' --help, naming each flag."""
    old_main = ["--model_dir", "/m", "--output_dir", "/c", "--dtype", "float16", "--tp_size", "1", "--pp_size", "1"]
    older, newer = (help_text(name) for name in HELP_FIXTURES["gemma"])
    assert missing_flags(old_main, parse_help_flags(older)) == ["--model_dir", "--output_dir", "--tp_size", "--pp_size"]
    # 0.18+ added --model_dir/--output_dir as aliases; the parallelism flags are still missing.
    assert missing_flags(old_main, parse_help_flags(newer)) == ["--tp_size", "--pp_size"]
    with pytest.raises(ConfigError) as caught:
        check_command_against_help("/app/tensorrt_llm/examples/gemma/convert_checkpoint.py", "trtllm:0.17", old_main, older)
    message = str(caught.value)
    assert "build.image: /app/tensorrt_llm/examples/gemma/convert_checkpoint.py in trtllm:0.17 does not accept" in message
    assert "--tp_size, --pp_size" in message


# --- refusals before any GPU time ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("architecture", "family", "script_dir", "limit"),
    [
        ("GemmaForCausalLM", "gemma", "gemma", "has no pipeline parallelism"),
        ("Gemma2ForCausalLM", "gemma", "gemma", "has no pipeline parallelism"),
        ("Phi3ForCausalLM", "phi3", "phi", "asserts pp_size == 1"),
    ],
)
def test_pipeline_parallelism_refused_for_families_without_it(architecture: str, family: str, script_dir: str, limit: str) -> None:
    """pp_size 2 is refused with the family, the script, the limit and the fix, before any container.

    Run on old main: ``DID NOT RAISE`` for all three (check_against_model accepted pp 2; the
    converter would then have failed on the GPU host: Gemma on its arguments, Phi on its assertion).
    """
    with pytest.raises(ConfigError) as caught:
        check_against_model(build(tp_size=1, pp_size=2), config(architecture), where="m/config.json")
    message = str(caught.value)
    assert f"build.pp_size: pp_size 2 cannot be converted for the {family} family" in message
    assert f"/app/tensorrt_llm/examples/models/core/{script_dir}/convert_checkpoint.py" in message
    assert limit in message and "e.g. tp_size 2, pp_size 1" in message


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM"])
def test_pipeline_parallelism_allowed_where_the_converter_has_it(architecture: str) -> None:
    """Llama-style and Qwen converters take --pp_size: tp 2 x pp 2 passes the family check."""
    check_against_model(build(tp_size=2, pp_size=2), config(architecture), where="m")
    assert convert_arguments(build(tp_size=2, pp_size=2), config(architecture), "/m", "/c")[-4:] == [
        "--tp_size", "2", "--pp_size", "2"]


def test_validate_refuses_pp_for_a_gemma_convert_script() -> None:
    """A spec naming Gemma's converter with pp_size 2 fails `nimflow validate` (no checkpoint needed).

    Run on old main: ``DID NOT RAISE`` (the spec was valid).
    """
    data = {"name": "m", "source": {"repo_id": "org/m"}, "cache": {"uri": "s3://engine-bucket/p"},
            "build": {"backend": "trtllm-build", "image": "trtllm:0.17", "tp_size": 1, "pp_size": 2,
                      "convert_script": "/app/tensorrt_llm/examples/gemma/convert_checkpoint.py"},
            "deploy": {"image": "nim:1.8", "served_model_name": "m", "cache_dir": "/c"}}
    with pytest.raises(ConfigError) as caught:
        parse_spec(data, "spec.yaml")
    assert "pp_size 2 cannot be converted for the gemma family: /app/tensorrt_llm/examples/gemma/convert_checkpoint.py" in str(caught.value)


def test_custom_convert_script_of_a_known_family_gets_its_flags() -> None:
    """build.convert_script pointing at the 0.17 Gemma script gets Gemma's flags; an unknown one llama-style."""
    gemma = build(convert_script="/app/tensorrt_llm/examples/gemma/convert_checkpoint.py")
    assert "--world-size" in convert_arguments(gemma, {}, "/m", "/c")
    custom = build(convert_script="/opt/mine/convert.py")
    assert convert_arguments(custom, {}, "/m", "/c")[-4:] == ["--tp_size", "1", "--pp_size", "1"]


def test_engine_key_hashes_each_familys_command_line() -> None:
    """The key records each architecture's real converter command (a change to a row changes the key)."""
    commands = builder_invocation(build())["commands_by_architecture"]
    assert sorted(commands) == sorted(EXPECTED_COMMANDS)
    assert "--world-size" in commands["GemmaForCausalLM"][0]
    # Families that cannot convert pp 2 are left out: such a build is refused before it has a key.
    assert "GemmaForCausalLM" not in builder_invocation(build(tp_size=1, pp_size=2))["commands_by_architecture"]


# --- the --help parser ---------------------------------------------------------------------------


@pytest.mark.parametrize(("fixture", "present", "absent"), [
    ("gemma-examples-gemma.help", {"--ckpt-type", "--model-dir", "--output-model-dir", "--world-size", "-kv", "-h"},
     {"--model_dir", "--tp_size", "--pp_size"}),
    ("gemma-models-core-gemma.help", {"--model-dir", "--model_dir", "--output_dir", "--world-size", "--calibrate_kv_cache"},
     {"--tp_size", "--pp_size"}),
    ("llama-examples-llama.help", {"--tp_size", "--pp_size", "--moe_tp_size", "--moe_ep_size", "--dtype"}, {"--cp_size"}),
    ("llama-models-core-llama.help", {"--tp_size", "--pp_size", "--cp_size", "--use_nvfp4"}, {"--use_embedding_sharing"}),
    ("trtllm-build.help", {"--max_seq_len", "--max_decoder_seq_len", "--max_input_len", "--max_num_tokens"}, {"--max_output_len"}),
])
def test_help_parser_on_two_releases(fixture: str, present: set[str], absent: set[str]) -> None:
    """The parser reads every declared flag and alias of each release, and nothing it lacks."""
    flags = parse_help_flags(help_text(fixture))
    assert present <= flags and not absent & flags


def test_help_parser_ignores_flags_named_only_in_help_prose() -> None:
    """A flag mentioned in another flag's description is not one the script declares."""
    text = ("usage: trtllm-build [-h] [--max_num_tokens MAX_NUM_TOKENS]\n\noptions:\n"
            "  -h, --help            show this help message and exit\n"
            "  --max_num_tokens MAX_NUM_TOKENS\n"
            "                        you may explicitly disable it by specifying --remove_input_padding disable\n")
    assert parse_help_flags(text) == {"-h", "--help", "--max_num_tokens"}


def test_trtllm_build_command_matches_the_real_help() -> None:
    """Every flag nimflow passes trtllm-build is in the help of a release with --max_seq_len."""
    arguments = trtllm_build_arguments(build(), "/w/ckpt", "/o/trtllm_engine", "/w/timing.cache")
    assert missing_flags(arguments, parse_help_flags(help_text("trtllm-build.help"))) == []
    assert missing_flags([*arguments, "--max_output_len", "1"], parse_help_flags(help_text("trtllm-build.help"))) == [
        "--max_output_len"]
