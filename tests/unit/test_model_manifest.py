"""Model manifests (guide §1): v1 with NIM's custom YAML tags, v2, and the model-name check."""

from __future__ import annotations

from pathlib import Path

import pytest

from nimflow.errors import ConfigError
from nimflow.model_manifest import check_model_listed, parse_manifest, read_manifest

# Shaped like NVIDIA/k8s-nim-operator internal/nimparser/v1/testdata/manifest_trtllm_v1.yaml.
V1 = """\
03fdb4d11f01be10c31b00e7c0540e2835e89a0079b483ad2dd3c25c8cc29b61:
  model: mistralai/mistral-7b-instruct-v0.3
  release: '1.0.0'
  tags:
    gpu: L40S
    gpu_device: 26b5:10de
    llm_engine: tensorrt_llm
    tp: '8'
  container_url: nvcr.io/nim/mistralai/mistral-7b-instruct-v03:1.0.0
  workspace: !workspace
    components:
    - dst: trtllm_engine
      src:
        files:
          - !name 'LICENSE.txt'
          - !name 'config.json'
1111222233334444555566667777888899990000aaaabbbbccccddddeeeeffff:
  model: mistralai/mistral-7b-instruct-v0.3
  release: '1.0.0'
  tags: {llm_engine: vllm, precision: bf16, tp: '1'}
  workspace: !workspace
    components: []
"""

# Shaped like k8s-nim-operator internal/nimparser/v2/testdata/manifest_v2.yaml, with model tags.
V2 = """\
schema_version: 2.0.0
profile_selection_criteria: default
profiles:
  - id: aaaabbbbccccddddeeeeffff0000111122223333444455556666777788889999
    tags: {llm_engine: vllm, precision: fp16, tp: "1", model: meta/llama-3.1-8b-instruct}
    workspace:
      files:
        weights: {uri: "ngc://org/team/model/weights.bin"}
"""


def test_v1_with_custom_tags() -> None:
    summary = parse_manifest(V1)
    assert (summary.schema, summary.profiles, summary.models) == ("v1", 2, ("mistralai/mistral-7b-instruct-v0.3",))


def test_v2_profiles() -> None:
    summary = parse_manifest(V2)
    assert (summary.schema, summary.profiles, summary.models) == ("v2", 1, ("meta/llama-3.1-8b-instruct",))


def test_model_not_in_manifest_lists_what_it_has() -> None:
    with pytest.raises(ConfigError) as caught:
        check_model_listed(parse_manifest(V1), "meta/llama-3.1-8b-instruct", where="m.yaml")
    [problem] = caught.value.problems
    assert problem.location == "source.model_name"
    assert "'meta/llama-3.1-8b-instruct'" in problem.message and "mistralai/mistral-7b-instruct-v0.3" in problem.message


def test_model_in_manifest_passes() -> None:
    check_model_listed(parse_manifest(V1), "mistralai/mistral-7b-instruct-v0.3", where="m.yaml")


def test_v2_without_model_names_cannot_be_checked_and_passes() -> None:
    summary = parse_manifest("schema_version: 2.0.0\nprofiles:\n  - id: abc\n    tags: {tp: '1'}\n")
    assert summary.models == ()
    check_model_listed(summary, "anything/at-all", where="m.yaml")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("a: [unclosed", "not valid YAML"),
        ("- just\n- a list\n", "not a NIM model manifest"),
        ("schema_version: 2.0.0\n", "no `profiles` list"),
        ("abc:\n  tags: {tp: '1'}\n", "no profile names a `model:`"),
        ("abc: 3\n", "not a v1 NIM model manifest"),
    ],
)
def test_not_a_manifest_names_source_manifest(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_manifest(text, where="m.yaml")
    [problem] = caught.value.problems
    assert problem.location == "source.manifest" and says in problem.message


def test_read_manifest_keeps_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "model_manifest.yaml"
    path.write_text(V1)
    raw, summary = read_manifest(path)
    assert raw == V1.encode() and summary.schema == "v1"


def test_missing_manifest_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        read_manifest(tmp_path / "absent.yaml")
