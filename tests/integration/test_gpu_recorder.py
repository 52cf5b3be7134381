"""The GPU suite's recorder, run against the CPU stand-in: it records what `make test-gpu` records on
real hardware, and the stand-in, which must be as strict as the real software, agrees with every
assumption of the code it can answer for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nimflow.trtllm_families import FAMILIES
from tests.gpu.assumptions import HOLDS, NOT_RECORDED, contradictions, converter_output_name
from tests.gpu.recording import record_images

pytestmark = pytest.mark.testbed


def test_the_recorder_records_the_stand_in_and_it_contradicts_no_assumption(
    docker_client: Any, standin_image: str, tmp_path: Path,
) -> None:
    found = record_images(docker_client, standin_image, None, tmp_path, gpus=[])
    assert contradictions(tmp_path) == []
    for name in ("converter-flags", "converter-layout", "trtllm-build-flags", "nim-optimize-flags", "trtllm-version",
                 "manifest-path", "probe-learns-flags"):
        assert found[name] == HOLDS, (name, found[name])
    recorded = sorted(path.name for path in tmp_path.glob("convert-checkpoint-*-help.txt"))
    assert recorded == [f"{converter_output_name(family.name)}.txt" for family in sorted(FAMILIES, key=lambda f: f.name)]
    assert found["models-root"] == NOT_RECORDED  # nothing served: record_endpoint was not called
    facts = json.loads((tmp_path / "nim-image-facts.json").read_text())
    assert facts["tools"]["nim-optimize"] and facts["converters"]
    assert json.loads((tmp_path / "verdicts.json").read_text()) == found
