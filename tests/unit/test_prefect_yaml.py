"""prefect.yaml and the Docker work-pool template, checked against Prefect's own models.

Prefect ignores unknown keys in prefect.yaml (they vanish silently) and drops a triggered run when a
templated parameter meets a missing event field; these tests catch both before anything is deployed.
"""

from __future__ import annotations

import importlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import yaml
from prefect.cli.deploy._models import ConcurrencyLimitSpec, DeploymentConfig, RawScheduleConfig, WorkPoolConfig
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.flows import Flow, load_flow_from_entrypoint
from prefect.utilities.templating import apply_values, find_placeholders

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG: dict[str, Any] = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
DEPLOYMENTS = {d["name"]: d for d in CONFIG["deployments"]}
TOP_LEVEL_KEYS = {"name", "prefect-version", "build", "push", "pull", "definitions", "deployments"}
TEMPLATE = json.loads((REPO_ROOT / "deployments" / "docker-work-pool" / "base-job-template.json").read_text())


def _unknown_keys(data: dict[str, Any], model: Any) -> set[str]:
    fields = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
    return set(data) - fields


def test_top_level_keys_are_prefects() -> None:
    assert set(CONFIG) <= TOP_LEVEL_KEYS


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_deployment_uses_only_keys_prefect_knows(name: str) -> None:
    deployment = DEPLOYMENTS[name]
    assert not _unknown_keys(deployment, DeploymentConfig), "Prefect would ignore these keys silently"
    DeploymentConfig.model_validate(deployment)
    assert not _unknown_keys(deployment.get("work_pool") or {}, WorkPoolConfig)
    if isinstance(deployment.get("concurrency_limit"), dict):
        assert not _unknown_keys(deployment["concurrency_limit"], ConcurrencyLimitSpec)
    for schedule in deployment.get("schedules") or []:
        RawScheduleConfig.model_validate(schedule)  # extra="forbid" in Prefect itself
        assert schedule.get("slug"), "bootstrap keeps paused schedules paused by their slug"
    for trigger in deployment.get("triggers") or []:
        assert trigger["type"] == "event"
        assert not _unknown_keys(trigger, DeploymentEventTrigger)
        DeploymentEventTrigger.model_validate({**trigger, "name": f"{name}__automation_1"})


def test_no_prefect_blocks_anywhere() -> None:
    """`{{ prefect.blocks... }}` in deployment fields is resolved at deploy time and stored in plaintext."""
    assert "prefect.blocks" not in (REPO_ROOT / "prefect.yaml").read_text()
    assert "prefect.blocks" not in json.dumps(TEMPLATE)
    assert "prefect.blocks" not in _checkpoint_automation().model_dump_json()


def _checkpoint_automation() -> Any:
    from nimflow.checkpoint_trigger import checkpoint_automation

    return checkpoint_automation(uuid4())


def test_no_deployment_has_triggers_of_its_own() -> None:
    """`prefect deploy` deletes and recreates a deployment's own triggers on every deploy: events sent
    meanwhile started no run, and a paused trigger came back enabled. The checkpoint trigger is an
    automation bootstrap owns (nimflow/checkpoint_trigger.py). Failed on old main: host-on-checkpoint had
    `triggers:`."""
    assert [name for name, d in DEPLOYMENTS.items() if d.get("triggers")] == []


def test_interval_schedules_have_a_fixed_anchor() -> None:
    """Without `anchor_date` Prefect anchors an interval at the deploy's moment, so every redeploy moved
    the schedule. Failed on old main: no anchor_date (`ValueError: Invalid isoformat string: ''`)."""
    for name, deployment in DEPLOYMENTS.items():
        for schedule in deployment.get("schedules") or []:
            if "interval" in schedule:
                anchor = datetime.fromisoformat(schedule.get("anchor_date") or "")
                assert anchor.tzinfo is not None, f"{name}: {schedule}"


def test_every_templated_trigger_parameter_has_a_default() -> None:
    """A missing event field without `| default(...)` drops the run (prefect.md §3.1); no block templates
    (`{% ... %}`), only single expressions, which the server renders to the parameter's type."""
    (action,) = _checkpoint_automation().actions
    checked = 0
    for key, value in (action.parameters or {}).items():
        assert isinstance(value, str) and "{%" not in value, f"{key}: {value}"
        expressions = re.findall(r"\{\{(.*?)\}\}", value)
        assert expressions == [value.strip()[2:-2]], f"{key}: one expression, nothing around it: {value}"
        for expression in expressions:
            assert "| default(" in expression, f"{key} has no default: {value}"
            checked += 1
    assert checked == 3


def test_checkpoint_trigger_parameters_render_from_a_landed_event() -> None:
    """The templates render, as the server renders them, to the flow's parameters, and to safe defaults.

    The server wraps a single-expression parameter as ``{{ expr | tojson }}`` and parses it back
    (``RunDeployment._wrap_v1_template``); rendering is its sandboxed ``render_user_template_sync``.
    """
    from prefect.server.events.actions import RunDeployment
    from prefect.server.events.schemas.events import Event
    from prefect.server.utilities.user_templates import render_user_template_sync

    automation = _checkpoint_automation()
    trigger, (action,) = automation.trigger, automation.actions
    assert trigger.expect == {"nimflow.checkpoint.landed"} and trigger.for_each == {"prefect.resource.id"}
    assert trigger.match.model_dump() == {"prefect.resource.id": "nimflow.source.*", "nimflow.spec": "?*"}
    assert trigger.posture == "Reactive" and trigger.threshold == 1

    def render(event: Event) -> dict[str, Any]:
        rendered = {}
        for key, value in action.parameters.items():
            wrapped = RunDeployment._wrap_v1_template(value)
            rendered[key] = json.loads(render_user_template_sync(wrapped["value"]["template"], {"event": event}))
        return rendered

    now, ids = datetime.now(timezone.utc), (uuid4(), uuid4())
    landed = Event(id=ids[0], occurred=now, event="nimflow.checkpoint.landed",
                   resource={"prefect.resource.id": "nimflow.source.hf.org/repo", "nimflow.spec": "llama-sft"},
                   payload={"spec": "llama-sft", "revision": "abc123"})
    assert render(landed) == {"spec": "llama-sft", "revision": "abc123", "checkpoint_uri": ""}
    bare = Event(id=ids[1], occurred=now, event="nimflow.checkpoint.landed", resource={"prefect.resource.id": "nimflow.source.s3.b/p"})
    assert render(bare) == {"spec": "", "revision": "", "checkpoint_uri": ""}


def _server_trigger(deployment: str) -> Any:
    """The checkpoint automation's trigger as the server holds it (the client's model, as bootstrap sends it,
    read by the server's EventTrigger)."""
    from prefect.server.events.schemas.automations import EventTrigger

    assert deployment == "host-on-checkpoint" and deployment in DEPLOYMENTS
    return EventTrigger.model_validate(_checkpoint_automation().trigger.model_dump(mode="json"))


@pytest.mark.parametrize(("labels", "starts_a_run"), [
    ({"nimflow.spec": "llama-sft"}, True),
    ({"nimflow.spec": "a"}, True),
    ({}, False),  # no nimflow.spec label: the trigger rendered spec='' and the run failed `no spec named ''`
    ({"nimflow.spec": ""}, False),
    ({"nimflow.spec": "llama-sft", "prefect.resource.id": "prefect.flow-run.1"}, False),  # not a checkpoint source
])
def test_the_checkpoint_trigger_matches_only_events_that_name_a_spec(labels: dict[str, str], starts_a_run: bool) -> None:
    """The server's own matcher (EventTrigger.covers: fnmatch on each label of `match`, a missing label
    never matches) decides which events start a run; no mocks, the trigger as prefect.yaml writes it.

    Failed on old main (match on prefect.resource.id only): the events without `nimflow.spec` and with an
    empty one were covered (`assert True is False` for the `{}` and `{"nimflow.spec": ""}` cases).
    """
    from prefect.server.events.schemas.events import ReceivedEvent

    resource = {"prefect.resource.id": "nimflow.source.hf.org/repo", "prefect.resource.name": "org/repo", **labels}
    event = ReceivedEvent(occurred=datetime.now(timezone.utc), event="nimflow.checkpoint.landed", resource=resource,
                          payload={"spec": "llama-sft", "revision": "abc123"}, id=uuid4())
    trigger = _server_trigger("host-on-checkpoint")
    assert trigger.covers(event) is starts_a_run
    other = event.model_copy(update={"event": "nimflow.checkpoint.seen"})
    assert trigger.covers(other) is False


@pytest.mark.parametrize("name", ["reconcile", "checkpoint-watcher"])
def test_housekeeping_runs_never_overlap_themselves(name: str) -> None:
    """One reconcile pass and one watcher pass at a time, a new one cancelled while one runs (two passes
    of the watcher would announce a checkpoint twice). Failed on old main: no `concurrency_limit` (KeyError)."""
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy, ConcurrencyOptions

    limit = ConcurrencyLimitSpec.model_validate(DEPLOYMENTS[name]["concurrency_limit"])
    assert limit.limit == 1
    # What `prefect deploy` makes of it (cli/deploy/_core.py) must be a strategy the server knows.
    options = ConcurrencyOptions(collision_strategy=limit.collision_strategy)  # type: ignore[arg-type]
    assert options.collision_strategy is ConcurrencyLimitStrategy.CANCEL_NEW


def test_deployments_run_from_the_workers_checkout_not_a_stored_path() -> None:
    """The one pull step enters NIMFLOW_HOME; no absolute path in prefect.yaml. Failed on old main:
    no `pull` section (KeyError), so `prefect deploy` stored the deploying checkout's absolute path."""
    assert CONFIG["pull"] == [{"nimflow.worker_checkout.enter_checkout": {}}]
    assert str(REPO_ROOT) not in (REPO_ROOT / "prefect.yaml").read_text()
    assert all("pull" not in d for d in DEPLOYMENTS.values())  # none overrides it


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_entrypoint_names_a_real_flow(name: str) -> None:
    """Loaded as a worker loads it: the file by its path in the checkout, its imports from nimflow."""
    path, _, function = DEPLOYMENTS[name]["entrypoint"].partition(":")
    assert (REPO_ROOT / path).is_file()
    loaded = load_flow_from_entrypoint(f"{REPO_ROOT / path}:{function}", use_placeholder_flow=False)
    assert isinstance(loaded, Flow)
    # The same flow as the installed package's (nimflow.flows.<module>), which the CLI and tests import.
    module = importlib.import_module("nimflow." + path.removesuffix(".py").replace("/", "."))
    assert loaded.name == getattr(module, function).name


def test_deployments_and_pool() -> None:
    assert set(DEPLOYMENTS) == {"host-model", "host-on-checkpoint", "reconcile", "checkpoint-watcher"}
    assert {d["work_pool"]["name"] for d in DEPLOYMENTS.values()} == {"nimflow-gpu"}
    assert DEPLOYMENTS["host-model"]["enforce_parameter_schema"] is True
    assert DEPLOYMENTS["host-on-checkpoint"]["enforce_parameter_schema"] is True
    assert DEPLOYMENTS["reconcile"]["entrypoint"] == "flows/reconcile.py:reconcile"
    assert DEPLOYMENTS["checkpoint-watcher"]["entrypoint"] == "flows/watch_checkpoints.py:watch_checkpoints"


def test_docker_template_variables_are_all_used_and_defined() -> None:
    used = {p.name for p in find_placeholders(TEMPLATE["job_configuration"])}
    defined = set(TEMPLATE["variables"]["properties"])
    assert used == defined


def test_docker_template_renders_gpus_cache_and_specs() -> None:
    rendered = apply_values(TEMPLATE["job_configuration"], {
        "image": "nimflow:1", "cache_dir": "/data/nim", "gpu_ids": "0,1", "specs_dir": "/etc/nimflow/specs",
        "checkout_dir": TEMPLATE["variables"]["properties"]["checkout_dir"]["default"],
    })
    assert rendered["env"] == {"NIMFLOW_CACHE_DIR": "/data/nim", "NIMFLOW_GPUS": "0,1", "NIMFLOW_SPECS_DIR": "/etc/nimflow/specs",
                               "NIMFLOW_HOME": "/opt/nimflow"}  # the pull step's checkout
    assert "/data/nim:/data/nim" in rendered["volumes"] and "/var/run/docker.sock:/var/run/docker.sock" in rendered["volumes"]
    assert rendered["container_create_kwargs"]["device_requests"] == [{"count": -1, "capabilities": [["gpu"]]}]
    assert "command" not in rendered  # unset: the worker's default command


@pytest.mark.parametrize(("parameters", "valid"), [
    ({"spec": "llama-sft", "revision": "a" * 40, "checkpoint_uri": ""}, True),
    ({"spec": "llama-sft", "revision": "", "checkpoint_uri": "s3://b/runs/c1/"}, True),
    ({"spec": "a-spec-added-after-deploy", "revision": "", "checkpoint_uri": ""}, True),
    ({"spec": "/etc/nimflow/evil.yaml", "revision": "", "checkpoint_uri": ""}, False),
    ({"spec": "../configs/demo.yaml", "revision": "", "checkpoint_uri": ""}, False),
    ({"spec": "", "revision": "", "checkpoint_uri": ""}, False),  # an event without nimflow.spec
    ({"spec": "llama-sft", "revision": "", "checkpoint_uri": "/data/ckpt"}, False),
    ({"spec": "llama-sft", "revision": "", "checkpoint_uri": "hf://org/x@v1"}, False),
])
def test_the_trigger_deployments_schema_is_enforceable_without_a_list_of_specs(parameters: dict[str, Any], valid: bool) -> None:
    """The server validates a trigger's rendered parameters against the deployment's schema (enforced):
    a spec *name* of any spec, never a path; a checkpoint only as an s3:// URI."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import is_valid

    path, _, function = DEPLOYMENTS["host-on-checkpoint"]["entrypoint"].partition(":")
    flow = load_flow_from_entrypoint(f"{REPO_ROOT / path}:{function}", use_placeholder_flow=False)
    schema = parameter_schema(flow).model_dump()
    assert "enum" not in schema["properties"]["spec"]  # no list of names frozen at deploy time
    from nimflow.checkpoint_trigger import PARAMETER_TEMPLATES

    assert set(schema["properties"]) == set(PARAMETER_TEMPLATES)
    assert is_valid(parameters, schema) is valid


def _run_pull_steps() -> dict[str, Any]:
    """prefect.yaml's pull steps through Prefect's own step runner, as a flow-run process runs them.

    The runner opens an API client for the blocks and variables a step's inputs could name; ours name
    none, so it is pointed at a closed port (without an API URL it would start a temporary server).
    """
    import asyncio

    from prefect.deployments.steps.core import run_steps
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from nimflow.testbed.services import free_port

    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        return asyncio.run(run_steps(CONFIG["pull"]))


def test_the_pull_step_enters_the_checkout_named_by_nimflow_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker anywhere runs the flows from its own checkout; Prefect then loads `flows/...` from there."""
    monkeypatch.chdir(tmp_path)  # a process worker starts flow runs in a directory of its own
    monkeypatch.setenv("NIMFLOW_HOME", str(REPO_ROOT))
    output = _run_pull_steps()
    assert output["directory"] == str(REPO_ROOT.resolve())
    assert Path.cwd() == REPO_ROOT.resolve()
    assert (Path.cwd() / DEPLOYMENTS["host-model"]["entrypoint"].partition(":")[0]).is_file()


@pytest.mark.parametrize("home", [None, "", "not-a-checkout"])
def test_the_pull_step_fails_naming_nimflow_home_when_it_is_not_a_checkout(
    home: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clear failure before any flow code runs, never a run in whatever directory the worker chose."""
    from prefect.deployments.steps.core import StepExecutionError

    from nimflow.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    if home is None:
        monkeypatch.delenv("NIMFLOW_HOME", raising=False)
    else:
        (tmp_path / "not-a-checkout").mkdir()
        monkeypatch.setenv("NIMFLOW_HOME", home and str(tmp_path / home))
    with pytest.raises(StepExecutionError) as failed:
        _run_pull_steps()
    cause = failed.value.__cause__
    assert isinstance(cause, ConfigError), cause  # Prefect logs str(cause) to the flow run
    assert "NIMFLOW_HOME" in str(cause)
    assert ("not set" in str(cause)) if not home else ("is not a nimflow checkout (no prefect.yaml, flows there)" in str(cause))
    assert Path.cwd() == tmp_path.resolve()


def test_gpu_hosts_name_their_count_and_optionally_their_pool() -> None:
    """`--gpu-host NAME=COUNT[@POOL]`: the pool a host's own reconcile goes to (a pool per GPU type)."""
    from nimflow.bootstrap import GpuHost, host_reconcile_name, parse_gpu_hosts
    from nimflow.errors import ConfigError

    hosts = parse_gpu_hosts(["gpu-a=8", " gpu-c = 4 @ nimflow-a100 "])
    assert hosts == {"gpu-a": GpuHost("gpu-a", 8), "gpu-c": GpuHost("gpu-c", 4, "nimflow-a100")}
    assert host_reconcile_name("gpu-a") == "reconcile-gpu-a" and "reconcile" in DEPLOYMENTS
    for bad in ("gpu-a", "gpu-a=0", "=4", "gpu-a=4@", "gpu-a=x@pool"):
        with pytest.raises(ConfigError, match="NAME=COUNT"):
            parse_gpu_hosts([bad])


def _fingerprints(specs_dir: Path) -> dict[str, list[str]]:
    """`python -m nimflow.deploy_fingerprint`, as bootstrap runs it (a fresh process, like `prefect deploy`)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NIMFLOW_SPECS_DIR": str(specs_dir)}
    result = subprocess.run([sys.executable, "-m", "nimflow.deploy_fingerprint", str(REPO_ROOT)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_deployments_fingerprint_changes_with_what_a_deploy_stores_and_only_then(tmp_path: Path) -> None:
    """bootstrap redeploys a deployment only when its fingerprint changed. host-model's stored schema lists
    the specs directory's spec names, so a new spec changes host-model's fingerprint and no other's."""
    import shutil

    (tmp_path / "specs").mkdir()
    first = _fingerprints(tmp_path / "specs")
    assert set(first) == set(DEPLOYMENTS)
    assert first["host-model"][0] == "host_model" and first["reconcile"][0] == "reconcile"
    assert all(fingerprint.startswith("nimflow:") for _, fingerprint in first.values())
    assert len({fingerprint for _, fingerprint in first.values()}) == len(first)
    assert _fingerprints(tmp_path / "specs") == first  # nothing changed: the same, so nothing is redeployed

    shutil.copy(next(iter(sorted((REPO_ROOT / "configs").glob("*.yaml")))), tmp_path / "specs")
    second = _fingerprints(tmp_path / "specs")
    assert [name for name in first if first[name] != second[name]] == ["host-model"]
