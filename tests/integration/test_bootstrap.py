"""``nimflow bootstrap`` against a real Prefect server: idempotent, keeps paused schedules paused,
saves Secret blocks without ever printing their values, and the settings fall back to those blocks."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client

from nimflow.cli import main
from nimflow.credentials import SECRET_BLOCKS
from nimflow.settings import get_settings
from tests.conftest import write_spec
from tests.integration.test_host_model import make_spec

pytestmark = pytest.mark.testbed
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch, prefect_api: str) -> Iterator[dict[str, str]]:
    """Fresh secret values in the environment; their blocks are deleted afterwards (the server is shared)."""
    values = {variable: f"secret-{variable.lower()}-{uuid.uuid4().hex}" for variable in SECRET_BLOCKS.values()}
    for key in ("HUGGING_FACE_HUB_TOKEN", "NGC_CLI_API_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for variable, value in values.items():
        monkeypatch.setenv(variable, value)
    yield values
    with get_client(sync_client=True) as client:
        for block in SECRET_BLOCKS:
            try:
                client.delete_block_document(client.read_block_document_by_name(block, "secret").id)
            except Exception:  # noqa: BLE001 - not created by a failed test
                pass


def _bootstrap(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["bootstrap", *args]) == 0
    out, err = capsys.readouterr()
    return out + err


def _deployment(name: str) -> Any:
    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def test_bootstrap_twice_creates_nothing_the_second_time_and_keeps_paused_schedules_paused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], secrets: dict[str, str],
    standin_image: str, unique: str,
) -> None:
    specs_dir = tmp_path / "specs"
    specs_dir.mkdir()
    spec_name = f"boot-{unique}"
    write_spec(specs_dir / "spec.yaml", make_spec(tmp_path, spec_name, f"org/boot-{unique}", standin_image))
    monkeypatch.setenv("NIMFLOW_SPECS_DIR", str(specs_dir))
    monkeypatch.chdir(REPO_ROOT)
    host = f"gpu-{unique}"

    first = _bootstrap(capsys, "--gpu-host", f"{host}=4")
    assert f"nimflow-gpus-{host}: created" in first
    assert f"nimflow-spec-{spec_name}: created" in first
    for block in SECRET_BLOCKS:
        assert f"{block} (from {SECRET_BLOCKS[block]}): created" in first
    with get_client(sync_client=True) as client:
        assert client.read_work_pool("nimflow-gpu").type == "process"
        assert client.read_global_concurrency_limit_by_name(f"nimflow-gpus-{host}").limit == 4
        assert client.read_global_concurrency_limit_by_name(f"nimflow-spec-{spec_name}").limit == 1
    for name in ("host_model/host-model", "host_model/host-on-checkpoint", "reconcile/reconcile",
                 "watch_checkpoints/checkpoint-watcher"):
        deployment = _deployment(name)
        assert deployment.work_pool_name == "nimflow-gpu"
        # Run from each worker's NIMFLOW_HOME, not from this checkout's path (stored before: set_working_directory).
        assert deployment.pull_steps == [{"nimflow.worker_checkout.enter_checkout": {}}], deployment.pull_steps
    for name in ("reconcile/reconcile", "watch_checkpoints/checkpoint-watcher"):
        deployment = _deployment(name)  # one run at a time, a new one cancelled (none before)
        assert deployment.global_concurrency_limit is not None and deployment.global_concurrency_limit.limit == 1, name
        assert deployment.concurrency_options is not None
        assert deployment.concurrency_options.collision_strategy == "CANCEL_NEW"

    # The host's own reconcile: reconcile's copy on the host's work queue, which only its worker polls.
    # Failed on old main: no deployment reconcile-<host> (ObjectNotFound); one reconcile on the default queue.
    own = _deployment(f"reconcile/reconcile-{host}")
    assert f"reconcile-{host}: created" in first and f"nimflow-gpu/{host}: created" in first
    assert (own.work_pool_name, own.work_queue_name) == ("nimflow-gpu", host)
    assert own.entrypoint == "flows/reconcile.py:reconcile" and own.pull_steps == _deployment("reconcile/reconcile").pull_steps
    assert own.global_concurrency_limit is not None and own.global_concurrency_limit.limit == 1
    assert own.concurrency_options is not None and own.concurrency_options.collision_strategy == "CANCEL_NEW"
    assert [(s.slug, s.active) for s in own.schedules] == [("reconcile-5m", True)]
    with get_client(sync_client=True) as client:
        client.update_deployment_schedule(own.id, own.schedules[0].id, active=False)  # stays paused below

    # An operator pauses the reconcile schedule; a redeploy alone would re-activate it (prefect.md §3.6).
    reconcile = _deployment("reconcile/reconcile")
    (schedule,) = reconcile.schedules
    assert schedule.slug == "reconcile-5m" and schedule.active
    with get_client(sync_client=True) as client:
        client.update_deployment_schedule(reconcile.id, schedule.id, active=False)

    second = _bootstrap(capsys, "--gpu-host", f"{host}=4")
    assert "nothing to create; everything was in place" in second, second
    assert ": created" not in second and ": updated" not in second
    assert "reconcile/reconcile-5m: kept paused" in second
    schedules = {s.slug: s.active for s in _deployment("reconcile/reconcile").schedules}
    assert schedules == {"reconcile-5m": False}
    assert {s.slug: s.active for s in _deployment("watch_checkpoints/checkpoint-watcher").schedules} == {"watch-2m": True}
    assert f"reconcile-{host}: kept" in second and f"nimflow-gpu/{host}: kept" in second
    assert {s.slug: s.active for s in _deployment(f"reconcile/reconcile-{host}").schedules} == {"reconcile-5m": False}

    # The secret values never appear in what bootstrap printed.
    for value in secrets.values():
        assert value not in first and value not in second


def test_secret_blocks_are_loadable_and_settings_fall_back_to_them(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], secrets: dict[str, str]
) -> None:
    monkeypatch.chdir(REPO_ROOT)
    out = _bootstrap(capsys, "--no-deploy")
    for block, variable in SECRET_BLOCKS.items():
        assert Secret.load(block).get() == secrets[variable]
        assert secrets[variable] not in out

    # A worker without the variables gets the values from the blocks.
    for variable in SECRET_BLOCKS.values():
        monkeypatch.delenv(variable)
    settings = get_settings()
    assert settings.hf_token_value() == secrets["HF_TOKEN"]
    assert settings.container_secrets() == {"NGC_API_KEY": secrets["NGC_API_KEY"], "HF_TOKEN": secrets["HF_TOKEN"]}
    assert settings.aws_credentials() == {"aws_access_key_id": secrets["AWS_ACCESS_KEY_ID"],
                                          "aws_secret_access_key": secrets["AWS_SECRET_ACCESS_KEY"]}
    # The environment wins over a block.
    monkeypatch.setenv("HF_TOKEN", "from-the-environment")
    assert get_settings().hf_token_value() == "from-the-environment"


def test_bootstrap_without_an_api_url_says_so(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path)  # no profile with a URL either
    result = subprocess.run([sys.executable, "-m", "nimflow.cli", "bootstrap"], capture_output=True, text=True,
                            env=env, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "nimflow bootstrap: PREFECT_API_URL: not set; point it at your Prefect server (e.g. export PREFECT_API_URL=http://prefect:4200/api)"
    ]


def test_bootstrap_creates_the_zombie_run_automation_once_and_keeps_it_paused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], prefect_api: str,
) -> None:
    """Prefect's documented zombie-run automation (no heartbeat -> Crashed) is created once, repaired in
    place when changed by hand, and a pause by the user survives later bootstraps.

    On old main (checked with nimflow/bootstrap.py of main) bootstrap made no automation: its output had
    no ``nimflow: crash zombie flow runs: created`` line.
    """
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, Posture
    from prefect.settings import get_current_settings

    from nimflow.bootstrap import MISSED_HEARTBEATS, ZOMBIE_AUTOMATION_NAME

    monkeypatch.chdir(REPO_ROOT)
    heartbeat_seconds = get_current_settings().flows.heartbeat_frequency
    assert heartbeat_seconds  # heartbeats are on by default
    with get_client(sync_client=True) as client:  # the server is shared: start from none
        for automation in client.read_automations_by_name(ZOMBIE_AUTOMATION_NAME):
            client.delete_automation(automation.id)

    def automations() -> list[Any]:
        with get_client(sync_client=True) as client:
            return client.read_automations_by_name(ZOMBIE_AUTOMATION_NAME)

    first = _bootstrap(capsys, "--no-deploy")
    assert f"{ZOMBIE_AUTOMATION_NAME}: created" in first, first
    (automation,) = automations()
    trigger = automation.trigger
    assert automation.enabled and trigger.posture == Posture.Proactive and trigger.after == {"prefect.flow-run.heartbeat"}
    assert trigger.within.total_seconds() == MISSED_HEARTBEATS * heartbeat_seconds and trigger.for_each == {"prefect.resource.id"}
    assert {"prefect.flow-run.Completed", "prefect.flow-run.Crashed"} <= trigger.expect
    (action,) = automation.actions
    assert isinstance(action, ChangeFlowRunState) and action.state.value == "CRASHED"

    assert f"{ZOMBIE_AUTOMATION_NAME}: kept" in _bootstrap(capsys, "--no-deploy")

    # The user pauses it and someone edits its window by hand: bootstrap repairs it in place, still paused.
    edited = AutomationCore(name=automation.name, description=automation.description, enabled=False,
                            trigger=trigger.model_copy(update={"within": trigger.within * 10}), actions=automation.actions)
    with get_client(sync_client=True) as client:
        client.update_automation(automation.id, edited)
    assert f"{ZOMBIE_AUTOMATION_NAME}: updated" in _bootstrap(capsys, "--no-deploy")
    assert f"{ZOMBIE_AUTOMATION_NAME}: kept paused" in _bootstrap(capsys, "--no-deploy")
    (after,) = automations()
    assert after.id == automation.id and not after.enabled
    assert after.trigger.within.total_seconds() == MISSED_HEARTBEATS * heartbeat_seconds


def _checkpoint_triggers(client: Any) -> list[Any]:
    """Every automation that runs host-on-checkpoint (prefect.yaml's own trigger on old main, nimflow's now)."""
    target = client.read_deployment_by_name("host_model/host-on-checkpoint").id
    return [a for a in client.read_automations() if any(getattr(x, "deployment_id", None) == target for x in a.actions)]


def test_a_paused_automation_schedule_and_deployment_stay_paused_across_two_bootstraps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], prefect_api: str,
) -> None:
    """Issue 15 acceptance (b). The first bootstrap after the pauses redeploys every deployment (their stored
    fingerprints are made stale, as after a change to prefect.yaml), the second finds them unchanged.

    Failed on old main (this test with bootstrap.py and prefect.yaml of main): after the first bootstrap
    the checkpoint trigger was enabled again (`prefect deploy` deletes and recreates a deployment's own
    triggers: `assert [True] == [False]`), while bootstrap printed nothing about it.
    """
    from nimflow.checkpoint_trigger import CHECKPOINT_AUTOMATION_NAME

    monkeypatch.setenv("NIMFLOW_SPECS_DIR", str(tmp_path))  # no specs: nothing but the deployments matters here
    monkeypatch.chdir(REPO_ROOT)
    _bootstrap(capsys)
    watcher, host_model = _deployment("watch_checkpoints/checkpoint-watcher"), _deployment("host_model/host-model")
    (schedule,) = watcher.schedules
    with get_client(sync_client=True) as client:
        (trigger,) = _checkpoint_triggers(client)
        client.pause_automation(trigger.id)
        client.update_deployment_schedule(watcher.id, schedule.id, active=False)
        client.pause_deployment(host_model.id)
    try:
        for attempt in ("redeploy", "unchanged"):
            if attempt == "redeploy":
                from prefect.client.schemas.actions import DeploymentUpdate

                with get_client(sync_client=True) as client:
                    for name in ("watch_checkpoints/checkpoint-watcher", "host_model/host-model", "host_model/host-on-checkpoint"):
                        client.update_deployment(_deployment(name).id, DeploymentUpdate(version="stale"))
            out = _bootstrap(capsys)
            with get_client(sync_client=True) as client:
                assert [a.enabled for a in _checkpoint_triggers(client)] == [False], (attempt, out)
            assert {s.slug: s.active for s in _deployment("watch_checkpoints/checkpoint-watcher").schedules} == {"watch-2m": False}
            assert _deployment("host_model/host-model").paused, (attempt, out)
            assert f"{CHECKPOINT_AUTOMATION_NAME}: kept paused" in out, out
            assert "checkpoint-watcher/watch-2m: kept paused" in out and "host-model: kept paused" in out, out
            expected = "deployed" if attempt == "redeploy" else "unchanged"
            assert f"host-on-checkpoint: {expected}" in out and f"host-model: {expected}" in out, out
            # The interval schedules keep prefect.yaml's fixed anchor, whenever they were deployed.
            anchors = [s.schedule.anchor_date for s in _deployment("watch_checkpoints/checkpoint-watcher").schedules]
            assert anchors == [datetime(2026, 1, 1, tzinfo=timezone.utc)], anchors
        with get_client(sync_client=True) as client:
            (after,) = _checkpoint_triggers(client)
        assert after.id == trigger.id  # the same automation all along: updated in place, never recreated
    finally:
        with get_client(sync_client=True) as client:
            for automation in _checkpoint_triggers(client):
                client.resume_automation(automation.id)
            client.update_deployment_schedule(watcher.id, schedule.id, active=True)
            client.resume_deployment(host_model.id)
