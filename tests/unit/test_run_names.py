"""Readable runs: run names from a run's parameters, artifact keys that Prefect accepts.

Checked against old main: `nimflow.run_names` did not exist (ImportError); the flows had no
`flow_run_name` (Prefect's random `effective-tiger` names) and the progress artifacts were keyed
`nimflow-<stage>` for every model.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prefect.types.names import raise_on_name_alphanumeric_dashes_only

from nimflow.progress import artifacts_for, progress_artifact_key
from nimflow.run_names import artifact_key, model_run_name

SHA = "706dadd1f0c3b8e2a4d5c6b7a8f9e0d1c2b3a4f5"


@pytest.mark.parametrize(("parameters", "name"), [
    ({"spec": "tiny-llama-demo", "revision": SHA}, "tiny-llama-demo@706dadd"),
    ({"spec": "tiny-llama-demo", "revision": "main"}, "tiny-llama-demo@main"),
    ({"spec": "tiny-llama-demo", "revision": "", "checkpoint_uri": ""}, "tiny-llama-demo"),
    ({"spec": "alpha", "revision": None, "checkpoint_uri": "s3://ckpts/alpha/step-200/"}, "alpha+step-200"),
    ({"spec": "alpha", "revision": SHA, "checkpoint_uri": "s3://ckpts/alpha/step-200/"}, "alpha@706dadd+step-200"),
    ({"spec": "/srv/specs/My Model.yaml"}, "My Model"),
    ({"spec": "configs/demo.yml", "revision": "v1.2"}, "demo@v1.2"),
])
def test_a_host_model_run_is_named_after_its_spec_and_revision(parameters: dict, name: str) -> None:
    assert model_run_name(parameters) == name


def test_a_long_revision_is_cut_short() -> None:
    name = model_run_name({"spec": "alpha", "revision": "feature/" + "x" * 200})
    assert name.startswith("alpha@feature/") and len(name) <= len("alpha@") + 40


@pytest.mark.parametrize(("parts", "key"), [
    (("nimflow", "download", "tiny-llama-demo"), "nimflow-download-tiny-llama-demo"),
    (("nimflow-reconcile", "GPU-Host_01.example.com"), "nimflow-reconcile-gpu-host-01-example-com"),
    (("nimflow", "upload", ""), "nimflow-upload"),
])
def test_artifact_keys_are_lowercase_with_dashes(parts: tuple[str, ...], key: str) -> None:
    assert artifact_key(*parts) == key


@given(st.lists(st.text(max_size=80), min_size=1, max_size=4))
def test_any_parts_make_a_key_prefect_accepts(parts: list[str]) -> None:
    key = artifact_key("nimflow", *parts)
    assert raise_on_name_alphanumeric_dashes_only(key) == key
    assert key.startswith("nimflow") and len(key) <= 120 and not key.endswith("-")


def test_progress_artifacts_are_keyed_by_the_spec_of_the_run() -> None:
    assert progress_artifact_key("download") == "nimflow-download"
    with artifacts_for("tiny-llama-demo"):
        assert progress_artifact_key("download") == "nimflow-download-tiny-llama-demo"
        with artifacts_for("other"):  # a heal run inside reconcile: its own spec, then the outer one again
            assert progress_artifact_key("build") == "nimflow-build-other"
        assert progress_artifact_key("upload") == "nimflow-upload-tiny-llama-demo"
    assert progress_artifact_key("restore") == "nimflow-restore"
