"""The GPU suite's assumption checks (tests/gpu/assumptions.py), on texts from the public sources.

``make test-gpu`` records what real NIM and TensorRT-LLM print and fails on every assumption of
the code the recording contradicts. These tests show each check can fail, on recordings built
from the public ``--help`` texts (tests/unit/fixtures/trtllm/, each citing its source) and a
published ``/v1/models`` answer, and check every committed recording on each CPU run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nimflow.image_probe import ImageFacts, ScriptFacts
from nimflow.trtllm_families import parse_help_flags
from tests.gpu.assumptions import ASSUMPTIONS, HOLDS, NOT_RECORDED, contradictions, converter_output_name, verdicts
from tests.gpu.recording import RECORD_ROOT

FIXTURES = Path(__file__).parent / "fixtures" / "trtllm"
DOCS = Path(__file__).parents[2] / "docs" / "testbed.md"
#: Published NIM 1.x answer (GoogleCloudPlatform/ai-on-gke, best-practices/ml-platform/terraform/features/nim/README.md).
PUBLISHED_MODELS: dict[str, Any] = {"object": "list", "data": [{"id": "meta/llama3-8b-instruct", "object": "model", "owned_by": "system",
                                                 "root": "meta/llama3-8b-instruct", "parent": None}]}


def _write(folder: Path, name: str, text: str, code: int = 0) -> None:
    (folder / f"{name}.txt").write_text(f"$ {name}\n# exit code {code}\n{text}\n")


def _help(name: str) -> str:
    return "\n".join(line for line in (FIXTURES / name).read_text().splitlines() if not line.startswith("#"))


def _recording(folder: Path, layout: str = "models-core") -> Path:
    """A recording of a 0.18+ (``models-core``) or ≤0.17 (``examples``) TensorRT-LLM image and a NIM 1.x."""
    root = "/app/tensorrt_llm/examples/models/core" if layout == "models-core" else "/app/tensorrt_llm/examples"
    families = {"llama": "llama", "qwen2": "qwen", "gemma": "gemma", "phi3": "phi"}
    for family, directory in families.items():
        _write(folder, converter_output_name(family), _help(f"{directory}-{layout}-{directory}.help"))
    _write(folder, "convert-checkpoint-locations", "\n".join(f"{root}/{d}/convert_checkpoint.py" for d in families.values()))
    _write(folder, "trtllm-build-help", _help("trtllm-build.help"))
    _write(folder, "nim-optimize-help", "usage: nim-optimize [-h] --model_dir MODEL_DIR --build_config BUILD_CONFIG "
                                        "--output_engine_dir OUTPUT_ENGINE_DIR")
    (folder / "v1-models.json").write_text(json.dumps(PUBLISHED_MODELS))
    (folder / "deployment.json").write_text(json.dumps(
        {"served_model_name": "meta/llama3-8b-instruct", "model_root": "/opt/nim/.cache/nimflow-model", "nim_api": "1.x"}))
    (folder / "nim-image-facts.json").write_text(json.dumps({"manifests": ["/etc/nim/config/model_manifest.yaml"]}))
    _write(folder, "gpu-probe", 'banner\nNIMFLOW-PROBE {"gpus": "H100, 9.0, 0x2330", "trtllm_version": "0.17.0"}')
    (folder / "build-image-probe.json").write_text(_probe_facts(f"{root}/llama/convert_checkpoint.py", "source").model_dump_json())
    return folder


def _probe_facts(converter: str, learnt_from: str) -> ImageFacts:
    """What the image probe records for an image whose llama converter's flags were learnt ``learnt_from``."""
    flags = sorted(parse_help_flags(_help("llama-models-core-llama.help"))) if learnt_from != "none" else []
    return ImageFacts(
        image_id="sha256:" + "0" * 64, config_user="", uid=0, gid=0, trtllm_version="0.17.0", model_manifest=None,
        converters={"llama": ScriptFacts(path=converter, flags=flags, learnt_from=learnt_from,
                                         help_error="ImportError: libcuda.so.1: cannot open shared object file")},
        trtllm_build=ScriptFacts(path="/usr/local/bin/trtllm-build", flags=sorted(parse_help_flags(_help("trtllm-build.help"))),
                                 learnt_from="help"),
        nim_optimize=ScriptFacts(path=None),
    )


@pytest.mark.parametrize("layout", ["models-core", "examples"])
def test_the_public_texts_of_two_releases_hold_every_recorded_assumption(tmp_path: Path, layout: str) -> None:
    found = verdicts(_recording(tmp_path, layout))
    assert found == {**dict.fromkeys(found, HOLDS), "metadata-2x": NOT_RECORDED}


def test_an_empty_recording_verifies_nothing_and_contradicts_nothing(tmp_path: Path) -> None:
    assert set(verdicts(tmp_path).values()) == {NOT_RECORDED}
    assert contradictions(tmp_path) == []


def test_a_trtllm_build_without_max_seq_len_is_a_contradiction(tmp_path: Path) -> None:
    folder = _recording(tmp_path)
    old = "\n".join(line for line in _help("trtllm-build.help").splitlines() if "--max_seq_len" not in line)
    _write(folder, "trtllm-build-help", old)
    assert contradictions(folder) == ["trtllm-build-flags: trtllm-build lacks ['--max_seq_len']"]


def test_a_converter_that_takes_other_flags_is_a_contradiction(tmp_path: Path) -> None:
    """Gemma's converter answering where the llama one should: it takes --world-size, not --tp_size/--pp_size."""
    folder = _recording(tmp_path)
    _write(folder, converter_output_name("llama"), _help("gemma-models-core-gemma.help"))
    (problem,) = contradictions(folder)
    assert problem.startswith("converter-flags: LlamaForCausalLM (llama): the image's converter lacks ['--tp_size', '--pp_size']")


def test_a_converter_elsewhere_than_nimflow_looks_is_a_contradiction(tmp_path: Path) -> None:
    folder = _recording(tmp_path)
    _write(folder, "convert-checkpoint-locations", "/opt/trtllm/examples/llama/convert_checkpoint.py")
    assert contradictions(folder) == [
        "converter-layout: llama: the image has ['/opt/trtllm/examples/llama/convert_checkpoint.py'], nimflow looks at "
        "['/app/tensorrt_llm/examples/models/core/llama/convert_checkpoint.py', '/app/tensorrt_llm/examples/llama/convert_checkpoint.py']"
    ]


def test_a_root_naming_another_model_or_a_missing_served_name_is_a_contradiction(tmp_path: Path) -> None:
    """A model-specific image serving its bundled llama3 under the served name nimflow gave, told to serve mistral."""
    folder = _recording(tmp_path)
    (folder / "v1-models.json").write_text(json.dumps({"data": [{**PUBLISHED_MODELS["data"][0], "id": "mine"}]}))
    (folder / "deployment.json").write_text(json.dumps(
        {"served_model_name": "mine", "model_root": "mistralai/mistral-7b-instruct-v0.3", "nim_api": "1.x"}))
    (problem,) = contradictions(folder)
    assert problem.startswith("models-root: ") and "serves another model" in problem
    (folder / "deployment.json").write_text(json.dumps({"served_model_name": "other", "model_root": "/m", "nim_api": "1.x"}))
    assert contradictions(folder) == ["models-root: /v1/models lists ['mine'], not the served name 'other'"]


def test_nim_2x_metadata_without_its_documented_fields_is_a_contradiction(tmp_path: Path) -> None:
    folder = _recording(tmp_path)
    (folder / "deployment.json").write_text(json.dumps(
        {"served_model_name": "meta/llama3-8b-instruct", "model_root": "/opt/nim/.cache/m", "nim_api": "2.x"}))
    (folder / "v1-metadata.json").write_text(json.dumps({"version": "2.0.1", "modelInfo": [{"modelUrl": "x"}]}))
    assert contradictions(folder) == ["metadata-2x: /v1/metadata lacks ['selectedModelProfileId']"]


def test_a_manifest_elsewhere_and_a_probe_without_a_version_are_contradictions(tmp_path: Path) -> None:
    folder = _recording(tmp_path)
    (folder / "nim-image-facts.json").write_text(json.dumps({"manifests": ["/opt/nim/etc/model_manifest.yaml"]}))
    _write(folder, "gpu-probe", 'NIMFLOW-PROBE {"gpus": "H100, 9.0, 0x2330", "trtllm_version": null}')
    assert [p.split(":", 1)[0] for p in contradictions(folder)] == ["trtllm-version", "manifest-path"]


def test_a_converter_whose_flags_the_probe_could_not_learn_is_a_contradiction(tmp_path: Path) -> None:
    folder = _recording(tmp_path)
    path = "/app/tensorrt_llm/examples/models/core/llama/convert_checkpoint.py"
    (folder / "build-image-probe.json").write_text(_probe_facts(path, "none").model_dump_json())
    assert contradictions(folder) == [
        f"probe-learns-flags: the probe learnt no flags of convert_checkpoint.py (llama) at {path} "
        "(ImportError: libcuda.so.1: cannot open shared object file)"
    ]


def test_every_committed_recording_agrees_and_the_docs_name_what_no_recording_verified() -> None:
    """A committed recording (tests/gpu/recorded/<image>/) that the code contradicts fails here on any
    machine; an assumption no recording verified must be listed as unverified in docs/testbed.md."""
    recorded = sorted(path for path in RECORD_ROOT.glob("*") if path.is_dir())
    for folder in recorded:
        assert contradictions(folder) == [], folder
    verified = {name for folder in recorded for name, verdict in verdicts(folder).items() if verdict == HOLDS}
    docs = DOCS.read_text().split("### Assumptions no GPU run has verified", 1)
    assert len(docs) == 2, f"{DOCS} lacks its '### Assumptions no GPU run has verified' section"
    unlisted = [a.id for a in ASSUMPTIONS if a.id not in verified and f"`{a.id}`" not in docs[1].split("\n## ", 1)[0]]
    assert unlisted == [], f"list these as unverified in {DOCS}"
