"""host_model's parameters: the UI's schema (a dropdown of spec names), and what each parameter changes."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from nimflow.errors import ConfigError
from nimflow.run_parameters import Overrides, apply_run_parameters, resolve_run_spec
from nimflow.spec import parse_spec

REPO_ROOT = Path(__file__).resolve().parents[2]

BASE: dict[str, Any] = {
    "name": "alpha",
    "source": {"repo_id": "org/alpha", "revision": "main"},
    "deploy": {"image": "nvcr.io/nim/meta/llama:1.8.0", "served_model_name": "alpha", "cache_dir": "/opt/nimflow/cache"},
}
FINETUNE: dict[str, Any] = {"path": "s3://ckpts/alpha/step-100/"}

_SCHEMA_SCRIPT = """
import json
from prefect.utilities.callables import parameter_schema
from nimflow.flows.host_model import host_model
print(json.dumps(parameter_schema(host_model).model_dump()))
"""


def _spec(name: str = "alpha", **sections: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data["name"] = name
    data.update(copy.deepcopy(sections))
    return data


def _schema_with_specs_dir(specs_dir: Path) -> dict[str, Any]:
    """Prefect's parameter schema of host_model, imported fresh in a process whose NIMFLOW_SPECS_DIR is ``specs_dir``.

    A subprocess: the dropdown is computed when the flow module is imported, as `prefect deploy` does.
    """
    env = {**os.environ, "NIMFLOW_SPECS_DIR": str(specs_dir), "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", _SCHEMA_SCRIPT], capture_output=True, text=True, env=env,
                            cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- the UI's form ------------------------------------------------------------------------------


def test_the_schema_offers_the_spec_names_with_titles_and_descriptions(tmp_path: Path) -> None:
    for file, name in (("z.yaml", "zeta"), ("a.yaml", "alpha"), ("m.yaml", "mid")):
        (tmp_path / file).write_text(yaml.safe_dump(_spec(name)))

    schema = _schema_with_specs_dir(tmp_path)
    props = schema["properties"]
    assert schema["required"] == ["spec"]
    assert props["spec"]["enum"] == ["alpha", "mid", "zeta"]
    assert props["spec"]["title"] == "Model" and "NIMFLOW_SPECS_DIR" in props["spec"]["description"]
    assert [props[p]["title"] for p in ("revision", "checkpoint_uri")] == ["Revision", "Fine-tuned checkpoint"]
    # A `$ref` property keeps no title of its own (pydantic): the form shows the model's.
    assert props["overrides"].get("title", schema["definitions"]["Overrides"]["title"]) == "Overrides"
    assert all(props[p]["description"] for p in props)
    assert [props[p]["position"] for p in ("spec", "revision", "checkpoint_uri", "overrides")] == [0, 1, 2, 3]

    overrides = schema["definitions"]["Overrides"]["properties"]
    assert set(overrides) == {"rollout_strategy", "verify_deadline_seconds", "force"}
    assert overrides["rollout_strategy"]["enum"] == ["spec", "auto", "blue-green", "recreate"]
    assert overrides["verify_deadline_seconds"]["title"] == "Verify deadline (seconds)"
    assert overrides["force"] == {**overrides["force"], "type": "boolean", "default": False}
    assert all(field["description"] for field in overrides.values())


def _null_choices(schema: object, where: str = "") -> list[str]:
    """Where ``schema`` offers a choice of types with ``null`` (the UI's "None" toggle)."""
    found: list[str] = []
    if isinstance(schema, dict):
        for choice in ("anyOf", "oneOf"):
            if any(option.get("type") == "null" for option in schema.get(choice, [])):
                found.append(where)
        if isinstance(schema.get("type"), list) and "null" in schema["type"]:
            found.append(where)
        for key, value in schema.items():
            found += _null_choices(value, f"{where}/{key}")
    elif isinstance(schema, list):
        for index, value in enumerate(schema):
            found += _null_choices(value, f"{where}/{index}")
    return found


def test_the_form_has_plain_fields_with_defaults_and_no_none_toggles(tmp_path: Path) -> None:
    """The UI renders `str | None` as a choice of types showing `Property is type "None"` (issue 15, item 8).

    Failed on old main: `_null_choices` found /properties/revision, /properties/checkpoint_uri,
    /properties/overrides and the Overrides fields rollout_strategy and verify_deadline_seconds.
    """
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(_spec("alpha")))
    schema = _schema_with_specs_dir(tmp_path)
    assert _null_choices(schema) == []
    props = schema["properties"]
    assert (props["revision"]["type"], props["revision"]["default"]) == ("string", "")
    assert (props["checkpoint_uri"]["type"], props["checkpoint_uri"]["default"]) == ("string", "")
    assert props["overrides"]["default"] == {"rollout_strategy": "spec", "verify_deadline_seconds": 0.0, "force": False}
    overrides = schema["definitions"]["Overrides"]["properties"]
    assert (overrides["rollout_strategy"]["default"], overrides["verify_deadline_seconds"]["default"]) == ("spec", 0.0)


def test_none_from_a_python_caller_still_means_not_given() -> None:
    from nimflow.flows.host_model import host_model

    params = host_model.validate_parameters({"spec": "alpha", "revision": None, "checkpoint_uri": None, "overrides": None})
    assert (params["revision"], params["checkpoint_uri"], params["overrides"]) == ("", "", Overrides())
    assert Overrides(rollout_strategy=None, verify_deadline_seconds=None).changes() == {}  # type: ignore[arg-type]
    spec = parse_spec(_spec())
    assert apply_run_parameters(spec, revision="", checkpoint_uri="", overrides=Overrides()) == spec


def test_without_a_specs_directory_there_is_no_dropdown_but_the_flow_imports(tmp_path: Path) -> None:
    props = _schema_with_specs_dir(tmp_path / "missing")["properties"]
    assert "enum" not in props["spec"] and props["spec"]["type"] == "string"


def test_prefect_accepts_a_path_and_builds_the_overrides_model() -> None:
    from nimflow.flows.host_model import host_model

    params = host_model.validate_parameters({"spec": "/tmp/x.yaml", "overrides": {"rollout_strategy": "recreate"}})
    assert params["spec"] == "/tmp/x.yaml"
    assert params["overrides"] == Overrides(rollout_strategy="recreate")
    with pytest.raises(Exception, match="verify_deadline_seconds"):
        host_model.validate_parameters({"spec": "alpha", "overrides": {"verify_deadline_seconds": -1}})


# --- what the parameters change -----------------------------------------------------------------


def test_overrides_replace_their_fields_only() -> None:
    spec = parse_spec(_spec(rollout={"strategy": "blue-green"}, verify={"deadline_seconds": 900}))
    changed = apply_run_parameters(
        spec, overrides=Overrides(rollout_strategy="recreate", verify_deadline_seconds=30, force=True)
    )
    assert (changed.rollout.strategy, changed.verify.deadline_seconds, changed.deploy.force) == ("recreate", 30, True)
    assert changed.verify.prompt == spec.verify.prompt and changed.deploy == spec.deploy.model_copy(update={"force": True})

    kept = apply_run_parameters(spec, overrides=Overrides())
    assert kept == spec


def test_force_off_keeps_a_spec_that_forces() -> None:
    spec = parse_spec(_spec(deploy={**BASE["deploy"], "force": True}))
    assert apply_run_parameters(spec, overrides=Overrides(force=False)).deploy.force is True


def test_overrides_are_checked_by_pydantic() -> None:
    with pytest.raises(ValidationError, match="rollout_strategy"):
        Overrides(rollout_strategy="canary")
    with pytest.raises(ValidationError, match="verify_deadline_seconds"):
        Overrides(verify_deadline_seconds=-1)
    with pytest.raises(ValidationError, match="verify_deadline_seconds"):
        Overrides(verify_deadline_seconds=float("nan"))


def test_revision_replaces_the_source_revision() -> None:
    assert apply_run_parameters(parse_spec(_spec()), revision="abc123").source.revision == "abc123"


def test_revision_without_a_hub_repo_names_the_parameter() -> None:
    spec = parse_spec(_spec(source={"local_dir": "/models/alpha"}))
    with pytest.raises(ConfigError) as info:
        apply_run_parameters(spec, revision="abc")
    assert info.value.problems[0].location == "revision"


def test_a_checkpoint_replaces_finetune_path_with_the_watch_endpoint() -> None:
    spec = parse_spec(_spec(finetune=FINETUNE, watch={"s3_prefix": "s3://ckpts/alpha/", "endpoint_url": "http://minio:9000"}))
    changed = apply_run_parameters(spec, checkpoint_uri="s3://ckpts/alpha/step-200/")
    assert changed.finetune is not None
    assert (changed.finetune.path, changed.finetune.endpoint_url) == ("s3://ckpts/alpha/step-200/", "http://minio:9000")

    elsewhere = apply_run_parameters(spec, checkpoint_uri="hf://org/alpha-ft@v2")
    assert elsewhere.finetune is not None
    assert (elsewhere.finetune.path, elsewhere.finetune.endpoint_url) == ("hf://org/alpha-ft@v2", None)


def test_a_checkpoint_needs_a_finetune_section() -> None:
    with pytest.raises(ConfigError) as info:
        apply_run_parameters(parse_spec(_spec()), checkpoint_uri="s3://ckpts/alpha/step-200/")
    assert info.value.problems[0].location == "checkpoint_uri"
    assert "no `finetune` section" in str(info.value)


@pytest.mark.parametrize("uri", ["/data/ckpt", "gs://ckpts/alpha/", "s3://Bad_Bucket/x"])
def test_a_checkpoint_must_be_a_valid_s3_or_hf_uri(uri: str) -> None:
    spec = parse_spec(_spec(finetune=FINETUNE))
    with pytest.raises(ConfigError) as info:
        apply_run_parameters(spec, checkpoint_uri=uri)
    assert [p.location for p in info.value.problems] == ["checkpoint_uri"]
    assert uri in str(info.value)


def test_resolve_by_name_or_path_with_the_host_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "any-file-name.yaml"
    path.write_text(yaml.safe_dump(_spec("alpha")))
    monkeypatch.setenv("NIMFLOW_SPECS_DIR", str(tmp_path))
    monkeypatch.setenv("NIMFLOW_GPUS", "2")
    monkeypatch.setenv("NIMFLOW_CACHE_DIR", str(tmp_path / "cache"))

    by_name = resolve_run_spec("alpha", revision="v1")
    assert by_name == resolve_run_spec(str(path), revision="v1")
    assert (by_name.source.revision, by_name.deploy.gpus, by_name.deploy.cache_dir) == ("v1", [2], tmp_path / "cache")
    with pytest.raises(ConfigError, match="no spec named 'beta'"):
        resolve_run_spec("beta")


def test_the_flow_refuses_an_unknown_name_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nimflow.flows.host_model import host_model

    (tmp_path / "a.yaml").write_text(yaml.safe_dump(_spec("alpha")))
    monkeypatch.setenv("NIMFLOW_SPECS_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="the specs there are: alpha"):
        host_model.fn(spec="beta")


# --- deployment runs: parameters from whoever can reach the Prefect API -------------------------

WATCHED: dict[str, Any] = {"finetune": FINETUNE, "watch": {"s3_prefix": "s3://ckpts/alpha/"}}


def test_a_deployment_run_takes_a_checkpoint_under_the_watch_prefix() -> None:
    spec = parse_spec(_spec(**WATCHED))
    changed = apply_run_parameters(spec, checkpoint_uri="s3://ckpts/alpha/step-200/", deployment_run=True)
    assert changed.finetune is not None and changed.finetune.path == "s3://ckpts/alpha/step-200/"


@pytest.mark.parametrize("uri", [
    "s3://other/alpha/step-200/",          # another bucket
    "s3://ckpts/alpha/../beta/step-1/",    # `..` out of the prefix (as a path would read it)
    "s3://ckpts/alpha-evil/step-1/",       # a sibling prefix that starts with the same letters
    "s3://ckpts/alpha/",                   # the prefix itself, not a directory under it
    "s3://ckpts/alpha//step-1/",           # an empty component
    "s3://ckpts/alpha/./step-1/",          # a `.` component: another S3 key than the path it spells
    "hf://org/alpha-ft@v2",                # hub checkpoints come as `revision`, not from a deployment run
])
def test_a_deployment_run_refuses_a_checkpoint_outside_the_watch_prefix(uri: str) -> None:
    spec = parse_spec(_spec(**WATCHED))
    with pytest.raises(ConfigError) as info:
        apply_run_parameters(spec, checkpoint_uri=uri, deployment_run=True)
    assert [p.location for p in info.value.problems] == ["checkpoint_uri"]
    assert repr(uri) in str(info.value) and "s3://ckpts/alpha/" in str(info.value)
    # From the CLI or Python, the same URI is the caller's choice (where it is a valid URI at all).
    if ".." not in uri and "//step" not in uri and "/./" not in uri:
        assert apply_run_parameters(spec, checkpoint_uri=uri).finetune is not None


def test_without_a_watch_prefix_a_deployment_run_takes_no_checkpoint() -> None:
    spec = parse_spec(_spec(finetune=FINETUNE))
    with pytest.raises(ConfigError, match="has no watch.s3_prefix") as info:
        apply_run_parameters(spec, checkpoint_uri="s3://ckpts/alpha/step-200/", deployment_run=True)
    assert info.value.problems[0].location == "checkpoint_uri"


@pytest.mark.parametrize("value", ["/etc/nimflow/evil.yaml", "../configs/demo.yaml", "alpha.yaml", "ALPHA", ""])
def test_a_deployment_run_names_its_spec_never_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(_spec("alpha")))
    monkeypatch.setenv("NIMFLOW_SPECS_DIR", str(tmp_path))
    with pytest.raises(ConfigError) as info:
        resolve_run_spec(value, deployment_run=True)
    assert [p.location for p in info.value.problems] == ["spec"]
    assert "not a spec name" in str(info.value) and "the specs there are: alpha" in str(info.value)
    assert resolve_run_spec("alpha", deployment_run=True).name == "alpha"
    with pytest.raises(ConfigError, match="no spec named 'beta'"):
        resolve_run_spec("beta", deployment_run=True)
