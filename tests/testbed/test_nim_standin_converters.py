"""The stand-in's converters, one per TensorRT-LLM family, each with that family's real arguments.

Run on the host as the image runs them: ``python3 <root>/<dir>/convert_checkpoint.py`` where the
path is a link to the stand-in, which picks the family by the directory. Before this change the
stand-in had one llama-style parser for every family at ``examples/models/core/llama`` only: a
Gemma or Phi converter did not exist (``can't open file``), and the llama parser took Gemma's
checkpoint with ``--tp_size`` (real Gemma refuses it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nimflow.trtllm_families import parse_help_flags
from tests.testbed.test_nim_standin import STANDIN, make_model, standin_env


def converter(tmp_path: Path, directory: str) -> Path:
    link = tmp_path / "examples" / directory / "convert_checkpoint.py"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(STANDIN)
    return link


def run(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-S", str(script), *args], env=standin_env(), capture_output=True,
                          text=True, timeout=30)


def test_gemma_takes_its_own_arguments_and_refuses_llama_style_ones(tmp_path: Path) -> None:
    script = converter(tmp_path, "gemma")
    model = make_model(tmp_path / "m", arch="Gemma2ForCausalLM")
    flags = parse_help_flags(run(script, "--help").stdout)
    assert {"--model-dir", "--output-model-dir", "--ckpt-type", "--world-size"} <= flags
    assert not flags & {"--tp_size", "--pp_size", "--model_dir", "--output_dir"}

    ok = run(script, "--model-dir", str(model), "--output-model-dir", str(tmp_path / "c"), "--ckpt-type", "hf",
             "--dtype", "float16", "--world-size", "2")
    assert ok.returncode == 0, ok.stderr
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["architecture"] == "Gemma2ForCausalLM" and config["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}

    llama_style = run(script, "--model_dir", str(model), "--output_dir", str(tmp_path / "d"), "--tp_size", "1")
    assert llama_style.returncode == 2 and "the following arguments are required: --ckpt-type" in llama_style.stderr
    unknown = run(script, "--model-dir", str(model), "--output-model-dir", str(tmp_path / "e"), "--ckpt-type", "hf",
                  "--pp_size", "2")
    assert unknown.returncode == 2 and "unrecognized arguments: --pp_size 2" in unknown.stderr


def test_phi_asserts_no_pipeline_parallelism(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m", arch="Phi3ForCausalLM")
    refused = run(converter(tmp_path, "phi"), "--model_dir", str(model), "--output_dir", str(tmp_path / "c"),
                  "--pp_size", "2")
    assert refused.returncode == 1 and refused.stderr.rstrip().endswith("AssertionError: Pipeline parallelism is not supported.")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(("directory", "architecture"), [("qwen", "LlamaForCausalLM"), ("llama", "Qwen2ForCausalLM")])
def test_a_converter_refuses_another_familys_architecture(tmp_path: Path, directory: str, architecture: str) -> None:
    model = make_model(tmp_path / "m", arch=architecture)
    refused = run(converter(tmp_path, directory), "--model_dir", str(model), "--output_dir", str(tmp_path / "c"))
    assert refused.returncode == 1 and f"Unsupported model architecture: {architecture}" in refused.stderr
