"""Issue 15, readable runs: every deployment's run form in the Prefect UI has plain fields.

The UI renders a schema node that allows ``null`` (``anyOf: [{...}, {"type": "null"}]``, from a
parameter typed ``X | None``) as a choice of types with a "None" toggle, showing
``Property is type "None"`` while None is chosen. Each flow prefect.yaml deploys is loaded from its
entrypoint, as a worker loads it, and its parameter schema (what ``prefect deploy`` stores) is walked,
definitions included.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from prefect.flows import load_flow_from_entrypoint
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools.validation import is_valid

from tests.unit.test_prefect_yaml import DEPLOYMENTS, REPO_ROOT


def _schema(deployment: str) -> dict[str, Any]:
    path, _, function = DEPLOYMENTS[deployment]["entrypoint"].partition(":")
    flow = load_flow_from_entrypoint(f"{REPO_ROOT / path}:{function}", use_placeholder_flow=False)
    return parameter_schema(flow).model_dump()


def _null_branches(node: Any, where: str = "$") -> Iterator[str]:
    """Where in a JSON schema a value may be ``null``: a ``null`` type, alone, in a type list or as a branch."""
    if isinstance(node, dict):
        kind = node.get("type")
        if kind == "null" or (isinstance(kind, list) and "null" in kind):
            yield where
        for key, value in node.items():
            yield from _null_branches(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _null_branches(item, f"{where}[{index}]")


def test_the_walk_finds_a_null_branch() -> None:
    """The check itself can fail: a ``str | None`` parameter's schema has a null branch."""
    assert list(_null_branches({"properties": {"x": {"anyOf": [{"type": "string"}, {"type": "null"}]}}})) == [
        "$.properties.x.anyOf[1]"]


@pytest.mark.parametrize("deployment", sorted(DEPLOYMENTS))
def test_no_parameter_of_any_deployment_may_be_null(deployment: str) -> None:
    """host-model, host-on-checkpoint, reconcile and checkpoint-watcher: no parameter (nor a field of a
    grouped one, such as host_model's Overrides) renders as a "None" toggle.

    Failed on old main (checked by running this file against main's flows/ and nimflow/run_parameters.py):
    host-on-checkpoint (``$.properties.revision.anyOf[1]``, ``$.properties.checkpoint_uri.anyOf[1]``) and
    checkpoint-watcher (``$.properties.specs.anyOf[1]``) had null branches.
    """
    schema = _schema(deployment)
    assert list(_null_branches(schema)) == []


def test_optional_parameters_default_to_plain_values() -> None:
    """The UI fills the form with these defaults: empty text, an empty list, not null."""
    on_checkpoint = _schema("host-on-checkpoint")["properties"]
    assert (on_checkpoint["revision"]["default"], on_checkpoint["checkpoint_uri"]["default"]) == ("", "")
    watcher = _schema("checkpoint-watcher")["properties"]["specs"]
    assert watcher["type"] == "array" and watcher["items"] == {"type": "string"} and watcher["default"] == []


@pytest.mark.parametrize(("parameters", "valid"), [
    ({"spec": "llama-sft", "revision": "", "checkpoint_uri": ""}, True),  # an event with neither
    ({"spec": "llama-sft", "revision": "", "checkpoint_uri": "s3://b/runs/c1/"}, True),
    ({"spec": "llama-sft", "revision": "x", "checkpoint_uri": " s3://b/runs/c1/"}, False),
    ({"spec": "llama-sft", "revision": "x", "checkpoint_uri": "file:///data"}, False),
    ({"spec": "llama-sft", "revision": "r" * 256, "checkpoint_uri": ""}, False),
])
def test_the_enforced_schema_takes_empty_for_not_given(parameters: dict[str, Any], valid: bool) -> None:
    """The trigger renders a missing event field as "" (`default('')`): the enforced schema takes it, and
    its pattern still refuses a checkpoint that is not an s3:// URI."""
    assert is_valid(parameters, _schema("host-on-checkpoint")) is valid


def test_python_callers_may_still_pass_none() -> None:
    """None ("not given" to a Python caller, or an automation rendered with `default(none)`) becomes the default."""
    from nimflow.flows.host_model import host_on_checkpoint
    from nimflow.flows.watch_checkpoints import watch_checkpoints

    assert host_on_checkpoint.validate_parameters({"spec": "llama-sft", "revision": None, "checkpoint_uri": None}) == {
        "spec": "llama-sft", "revision": "", "checkpoint_uri": ""}
    assert watch_checkpoints.validate_parameters({"specs": None}) == {"specs": ()}
    assert watch_checkpoints.validate_parameters({"specs": ["a", "b"]}) == {"specs": ("a", "b")}
