"""``nimflow bootstrap``: everything a Prefect server needs before nimflow's deployments can run.

In order, each step only creating what is missing (so running it twice changes nothing):

1. the work pools that ``prefect.yaml`` names (process type), plus any given with ``--pool``;
2. the per-host GPU limits given with ``--gpu-host NAME=COUNT[@POOL]``: a global concurrency limit
   ``nimflow-gpus-<NAME>`` of COUNT slots each (an existing one is set to COUNT);
3. the per-spec queueing limits ``nimflow-spec-<name>`` (limit 1) of the specs in the specs directory
   (``host_model`` would create them on its first run; made here so they show in the UI at once);
4. the zombie-run automation (Prefect's documented recipe: a flow run silent for three heartbeats is
   marked Crashed), created or updated in place by name; a paused one stays paused;
5. Secret blocks from ``HF_TOKEN``, ``NGC_API_KEY``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` when
   set (see :mod:`nimflow.credentials`; values are never printed);
6. ``prefect --no-prompt deploy --name ...`` in the project directory, for the deployments whose
   fingerprint (:mod:`nimflow.deploy_fingerprint`, stored as the deployment's ``version``) differs from
   the server's: an unchanged one is not redeployed (its scheduled runs, schedules and pause untouched).
   A redeploy re-activates schedules that were paused, so the schedules paused before (by slug) and
   paused deployments are paused again;
7. the checkpoint trigger (:mod:`nimflow.checkpoint_trigger`), an automation nimflow owns on the
   deployment host-on-checkpoint, created or updated in place by name; a paused one stays paused
   (``prefect deploy`` leaves it alone: it is not one of the deployment's own triggers);
8. a check of the server's concurrency lease storage (read from ``/admin/settings``): the default keeps
   leases in the server's memory, so a restart leaks every slot held at the time (docs/fleet.md);
9. per ``--gpu-host``, a reconcile of its own: the deployment ``reconcile-<NAME>``, a copy of prefect.yaml's
   ``reconcile`` on the work queue ``<NAME>`` of the host's pool (``@POOL``, else reconcile's), so each
   host's worker (``--work-queue default --work-queue <NAME>``) checks its own Docker host. An existing
   one is brought in line with ``reconcile`` but its schedules are left alone (a paused one stays paused).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import (
    DeploymentScheduleCreate,
    DeploymentUpdate,
    WorkPoolCreate,
)
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, get_current_settings
from prefect.workers.process import ProcessWorker

from nimflow import bounded_yaml
from nimflow.checkpoint_trigger import (
    CHECKPOINT_AUTOMATION_NAME,
    HOST_ON_CHECKPOINT_DEPLOYMENT,
    HOST_ON_CHECKPOINT_FLOW,
    checkpoint_automation,
)
from nimflow.credentials import save_secrets
from nimflow.errors import ConfigError, PermanentError, Problem, translated_errors
from nimflow.redaction import redact_url
from nimflow.settings import get_settings
from nimflow.spec_concurrency import ensure_limit, gpu_limit_name, spec_limit_name
from nimflow.spec_registry import spec_names

#: How long ``prefect deploy`` may take (it imports every flow it deploys).
DEPLOY_TIMEOUT_SECONDS = 600
#: prefect.yaml's deployment that each ``--gpu-host`` gets a copy of, on a work queue of its own.
RECONCILE_DEPLOYMENT = "reconcile"


@dataclass(frozen=True)
class Step:
    """One item bootstrap looked at: its kind, name, and what happened (created, kept, updated, ...)."""

    kind: str
    name: str
    result: str


@dataclass
class BootstrapReport:
    """What one ``nimflow bootstrap`` did, item by item."""

    steps: list[Step] = field(default_factory=list)

    def add(self, kind: str, name: str, result: str) -> None:
        """Record one item."""
        self.steps.append(Step(kind, name, result))

    def created(self) -> list[Step]:
        """The items this run created or changed (empty when it changed nothing)."""
        return [s for s in self.steps if s.result in ("created", "updated", "deployed")]

    def render(self) -> str:
        """The summary ``nimflow bootstrap`` prints: one line per item."""
        width = max((len(s.kind) for s in self.steps), default=0)
        return "\n".join(f"{s.kind:<{width}}  {s.name}: {s.result}" for s in self.steps)


@dataclass(frozen=True)
class GpuHost:
    """One ``--gpu-host NAME=COUNT[@POOL]``: a host of the fleet, its GPU count, and its work pool if given."""

    name: str
    gpus: int
    #: The work pool its worker polls; None: the pool of prefect.yaml's reconcile deployment.
    pool: str | None = None


def parse_gpu_hosts(values: list[str]) -> dict[str, GpuHost]:
    """``["gpu-a=8", "gpu-c=4@nimflow-a100"]`` -> the hosts by name.

    Raises:
        ConfigError: an item is not ``NAME=COUNT[@POOL]`` with a positive COUNT.
    """
    hosts: dict[str, GpuHost] = {}
    for value in values:
        name, _, rest = value.partition("=")
        count, at, pool = rest.partition("@")
        name, count, pool = name.strip(), count.strip(), pool.strip()
        if not name or not count.isdigit() or int(count) < 1 or (at and not pool):
            raise ConfigError("nimflow bootstrap", [Problem(
                "--gpu-host", f"{value!r} is not NAME=COUNT or NAME=COUNT@POOL (e.g. gpu-a=8, gpu-c=4@nimflow-a100)")])
        hosts[name] = GpuHost(name, int(count), pool or None)
    return hosts


def project_config(project_dir: Path) -> dict[str, Any]:
    """The parsed ``prefect.yaml`` of the project.

    Raises:
        ConfigError: there is no readable prefect.yaml in ``project_dir``.
    """
    path = project_dir / "prefect.yaml"
    if not path.is_file():
        raise ConfigError(str(project_dir),
                          [Problem("prefect.yaml", "not found; run bootstrap from the nimflow checkout (or --project-dir)")])
    return bounded_yaml.load(path.read_text()) or {}


def pools_in(config: dict[str, Any]) -> list[str]:
    """The work pool names the project's deployments use, in order of appearance."""
    names = [((d.get("work_pool") or {}).get("name")) for d in config.get("deployments") or []]
    return list(dict.fromkeys(n for n in names if n))


def require_api_url(command: str = "nimflow bootstrap") -> str:
    """The configured Prefect API URL.

    Raises:
        ConfigError: PREFECT_API_URL is not set (``command`` would otherwise talk to a throwaway server).
    """
    url = PREFECT_API_URL.value()
    if not url:
        raise ConfigError(command, [Problem(
            "PREFECT_API_URL", "not set; point it at your Prefect server (e.g. export PREFECT_API_URL=http://prefect:4200/api)")])
    return str(url)


def ensure_process_pool(client: SyncPrefectClient, name: str) -> str:
    """Create the process work pool ``name`` unless it exists: ``created`` or ``kept``."""
    try:
        client.read_work_pool(name)
        return "kept"
    except ObjectNotFound:
        pass
    template = ProcessWorker.get_default_base_job_template()
    client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))
    return "created"


@dataclass(frozen=True)
class PausedState:
    """What was paused on a deployment before the redeploy: the deployment itself, schedules by slug."""

    deployment_id: UUID
    name: str
    paused: bool
    paused_slugs: frozenset[str]


def existing_deployments(client: SyncPrefectClient, names: list[str]) -> list[Any]:
    """The deployments (of any flow) called one of ``names``."""
    return client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=names)))


def paused_states(deployments: list[Any]) -> list[PausedState]:
    """The paused deployments and paused schedules (by slug) among ``deployments``."""
    states = []
    for deployment in deployments:
        slugs = frozenset(s.slug for s in deployment.schedules if not s.active and s.slug)
        if deployment.paused or slugs:
            states.append(PausedState(deployment.id, deployment.name, bool(deployment.paused), slugs))
    return states


def restore_paused(client: SyncPrefectClient, states: list[PausedState], report: BootstrapReport) -> None:
    """Pause again what the redeploy re-activated; record each item as ``kept paused``."""
    for state in states:
        try:
            deployment = client.read_deployment(state.deployment_id)
        except ObjectNotFound:
            continue  # removed from prefect.yaml and deleted: nothing to keep paused
        if state.paused and not deployment.paused:
            client.pause_deployment(state.deployment_id)
        for schedule in deployment.schedules:
            if schedule.slug in state.paused_slugs and schedule.active:
                client.update_deployment_schedule(state.deployment_id, schedule.id, active=False)
        report_paused(state, report)


def report_paused(state: PausedState, report: BootstrapReport) -> None:
    """Record the paused deployment and its paused schedules as ``kept paused``."""
    if state.paused:
        report.add("deployment", state.name, "kept paused")
    for slug in sorted(state.paused_slugs):
        report.add("schedule", f"{state.name}/{slug}", "kept paused")


def host_reconcile_name(host: str) -> str:
    """The name of host ``host``'s own reconcile deployment (its work queue is called ``host``)."""
    return f"{RECONCILE_DEPLOYMENT}-{host}"


def _deployment_limit(deployment: Any) -> int | None:
    """The deployment's concurrency limit (its slots), None without one."""
    return deployment.global_concurrency_limit.limit if deployment.global_concurrency_limit else None


def _as_host_copy(template: Any, host: GpuHost) -> dict[str, Any]:
    """The fields of reconcile's deployment that ``host``'s copy has, on the host's own work queue."""
    limit = _deployment_limit(template)
    return {
        "description": f"{template.description or ''} Runs on host {host.name}'s worker only (work queue {host.name!r}).".strip(),
        "tags": [*template.tags, f"host:{host.name}"],
        "work_pool_name": host.pool or template.work_pool_name,
        "work_queue_name": host.name,
        "entrypoint": template.entrypoint,
        "pull_steps": template.pull_steps,
        "parameter_openapi_schema": template.parameter_openapi_schema,
        "enforce_parameter_schema": template.enforce_parameter_schema,
        "job_variables": template.job_variables,
        "concurrency_limit": limit,
        "concurrency_options": template.concurrency_options if limit else None,
    }


def _differs(current: Any, wanted: dict[str, Any]) -> bool:
    """Whether the deployment ``current`` has another value for any field of ``wanted``."""
    def plain(value: Any) -> Any:
        return value.model_dump(mode="json") if hasattr(value, "model_dump") else value

    def have(key: str) -> Any:
        return _deployment_limit(current) if key == "concurrency_limit" else getattr(current, key)

    return any(plain(have(key)) != plain(value) for key, value in wanted.items())


def ensure_work_queue(client: SyncPrefectClient, pool: str, name: str) -> str:
    """Create the work queue ``name`` in ``pool`` unless it exists: ``created`` or ``kept``."""
    try:
        client.read_work_queue_by_name(name, work_pool_name=pool)
        return "kept"
    except ObjectNotFound:
        pass
    client.create_work_queue(name=name, work_pool_name=pool,
                             description=f"Runs for host {name} only (its reconcile); its worker polls it beside `default`.")
    return "created"


def ensure_host_reconcile(client: SyncPrefectClient, template: Any, host: GpuHost, flow_name: str) -> str:
    """Make ``reconcile-<host>``, a copy of ``template`` (reconcile) on host's work queue: created, updated or kept.

    A new one gets the template's schedules; an existing one keeps its own (paused stays paused) and its
    pause, and is otherwise brought in line with the template.
    """
    name = host_reconcile_name(host.name)
    wanted = _as_host_copy(template, host)
    try:
        current = client.read_deployment_by_name(f"{flow_name}/{name}")
    except ObjectNotFound:
        schedules = [DeploymentScheduleCreate(schedule=s.schedule, active=True, slug=s.slug) for s in template.schedules]
        client.create_deployment(flow_id=template.flow_id, name=name, schedules=schedules, **wanted)
        return "created"
    if not _differs(current, wanted):
        return "kept"
    client.update_deployment(current.id, DeploymentUpdate(**wanted))
    return "updated"


def reconcile_per_host(client: SyncPrefectClient, hosts: list[GpuHost], report: BootstrapReport) -> None:
    """Each host's queue and its own reconcile deployment (see :func:`ensure_host_reconcile`).

    Raises:
        ConfigError: prefect.yaml's reconcile deployment is not on the server (it was not deployed).
    """
    found = existing_deployments(client, [RECONCILE_DEPLOYMENT])
    if not found:
        raise ConfigError("nimflow bootstrap", [Problem(
            "--gpu-host", f"no deployment named {RECONCILE_DEPLOYMENT!r} to copy for each host; is it in prefect.yaml?")])
    template = client.read_deployment(found[0].id)
    flow_name = client.read_flow(template.flow_id).name
    for host in hosts:
        pool = host.pool or template.work_pool_name or "default"
        report.add("work queue", f"{pool}/{host.name}", ensure_work_queue(client, pool, host.name))
        name = host_reconcile_name(host.name)
        report.add("deployment", name, ensure_host_reconcile(client, template, host, flow_name))


#: The zombie-run automation's name: bootstrap finds it by this name and updates it in place.
ZOMBIE_AUTOMATION_NAME = "nimflow: crash zombie flow runs"
#: How many heartbeat periods a run may stay silent before it is marked Crashed.
MISSED_HEARTBEATS = 3


def zombie_run_automation(heartbeat_seconds: int, *, enabled: bool = True) -> AutomationCore:
    """Prefect's documented "crash zombie flows" automation: a flow run that sent a heartbeat and then
    neither another one nor a final state for ``MISSED_HEARTBEATS`` heartbeat periods is marked Crashed.

    A run whose host died (or whose process was SIGKILLed) otherwise stays Running for good, holding
    its place in the UI and, for nimflow, what it left on its host: a build container, a half-done
    rollout, which the next run there undoes once the run is marked Crashed (:mod:`nimflow.run_leftovers`).
    """
    return AutomationCore(
        name=ZOMBIE_AUTOMATION_NAME,
        description=(f"Created by `nimflow bootstrap`: a flow run silent for {MISSED_HEARTBEATS} heartbeats "
                     f"({heartbeat_seconds}s each, PREFECT_FLOWS_HEARTBEAT_FREQUENCY) is marked Crashed."),
        enabled=enabled,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=MISSED_HEARTBEATS * heartbeat_seconds),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message="Marked Crashed by nimflow's zombie-run automation: no heartbeat")],
    )


def ensure_automation(client: SyncPrefectClient, wanted: AutomationCore) -> str:
    """Create the automation ``wanted`` (found by its name), or bring it in line in place: ``created``,
    ``updated``, ``kept`` or ``kept paused``.

    Updated in place (never deleted and recreated, so no event meets a gap), and one paused by the user
    stays paused: ``wanted.enabled`` only applies to a new one.
    """
    existing = client.read_automations_by_name(wanted.name)
    if not existing:
        client.create_automation(wanted)
        return "created"
    current = existing[0]  # newest first; nimflow only ever makes one
    wanted = wanted.model_copy(update={"enabled": current.enabled})
    same = (current.description == wanted.description
            and current.trigger.model_dump(exclude={"id"}) == wanted.trigger.model_dump(exclude={"id"})
            and [a.model_dump() for a in current.actions] == [a.model_dump() for a in wanted.actions])
    if same:
        return "kept" if current.enabled else "kept paused"
    client.update_automation(current.id, wanted)  # `enabled` is sent as it was: a paused one stays paused
    return "updated"


#: Prefect's default lease storage: leases live in the server process and die with it.
IN_MEMORY_LEASE_STORAGE = "prefect.server.concurrency.lease_storage.memory"
#: The advice bootstrap gives when the lease storage is in memory or cannot be read.
LEASE_STORAGE_ADVICE = ("a server restart leaks the concurrency slots held at the time; set "
                        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect_redis.lease_storage on the server "
                        "(docs/fleet.md, \"Lease storage\"); `nimflow doctor --free` frees leaked slots")


def check_lease_storage(client: SyncPrefectClient) -> tuple[str, str]:
    """The server's concurrency lease storage module and bootstrap's verdict on it: ``(module, result)``.

    Read from the server's ``/admin/settings`` (self-hosted servers show their settings there); a server
    that does not (Prefect Cloud, a proxy that blocks it) gets the advice once, without a verdict.
    """
    try:
        settings = client.request("GET", "/admin/settings").json()
        module = str(settings["server"]["concurrency"]["lease_storage"])
    except (httpx.HTTPStatusError, KeyError, TypeError, ValueError):
        return "(not shown by the server)", f"unknown: {LEASE_STORAGE_ADVICE}"
    if module == IN_MEMORY_LEASE_STORAGE:
        return module, f"warning: in memory: {LEASE_STORAGE_ADVICE}"
    return module, "kept"


def ensure_zombie_run_automation(client: SyncPrefectClient) -> str:
    """Create the zombie-run automation, or bring it in line in place (see :func:`ensure_automation`),
    or ``skipped (...)`` when heartbeats are off."""
    heartbeat_seconds = get_current_settings().flows.heartbeat_frequency
    if heartbeat_seconds is None:
        return "skipped (PREFECT_FLOWS_HEARTBEAT_FREQUENCY is off: flow runs send no heartbeat to watch)"
    return ensure_automation(client, zombie_run_automation(heartbeat_seconds))


def ensure_checkpoint_automation(client: SyncPrefectClient) -> str:
    """Create the checkpoint trigger (:mod:`nimflow.checkpoint_trigger`) on the deployment host-on-checkpoint,
    or bring it in line in place (see :func:`ensure_automation`); ``skipped (...)`` without that deployment."""
    name = f"{HOST_ON_CHECKPOINT_FLOW}/{HOST_ON_CHECKPOINT_DEPLOYMENT}"
    try:
        deployment = client.read_deployment_by_name(name)
    except ObjectNotFound:
        return f"skipped (no deployment {name} to run; run bootstrap without --no-deploy)"
    return ensure_automation(client, checkpoint_automation(deployment.id))


def run_prefect_deploy(project_dir: Path, api_url: str, names: list[str]) -> str:
    """``prefect --no-prompt deploy --name A --name B ...`` in ``project_dir``; return its output.

    Raises:
        PermanentError: it failed (its last output lines are in the message).
    """
    prefect = Path(sys.executable).with_name("prefect")
    command = [str(prefect) if prefect.exists() else "prefect", "--no-prompt", "deploy"]
    for name in names:
        command += ["--name", name]
    result = subprocess.run(command, cwd=project_dir, env=deploy_environment(api_url), capture_output=True, text=True,
                            timeout=DEPLOY_TIMEOUT_SECONDS)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise PermanentError(f"`{' '.join(command[1:])}` failed (exit {result.returncode}) in {project_dir}:\n{tail}")
    return output


@dataclass(frozen=True)
class PlannedDeployment:
    """One deployment of prefect.yaml: its flow, the fingerprint of what a deploy would store, the server's copy."""

    name: str
    flow_name: str
    fingerprint: str
    current: Any  # the deployment on the server, None when missing

    @property
    def result(self) -> str:
        """What bootstrap does with it: ``unchanged`` (the server holds this fingerprint), ``deployed`` or ``created``."""
        if self.current is None:
            return "created"
        return "unchanged" if self.current.version == self.fingerprint else "deployed"


def deploy_environment(api_url: str) -> dict[str, str]:
    """The environment of bootstrap's children (``prefect deploy``, the fingerprints): this process's (specs
    dir, secrets for nothing but their imports) with the API URL made explicit, since it may come from a
    Prefect profile or a test's settings."""
    return {**os.environ, "PREFECT_API_URL": api_url, "COLUMNS": "200"}


def plan_deployments(client: SyncPrefectClient, project_dir: Path, api_url: str) -> list[PlannedDeployment]:
    """Each deployment of prefect.yaml with its fingerprint and the server's copy of it.

    The fingerprints are computed in a child process that sees what ``prefect deploy`` sees (a fresh
    import of the flows, in ``project_dir``, with its environment).

    Raises:
        PermanentError: an entrypoint cannot be loaded (``prefect deploy`` would fail on it too).
    """
    command = [sys.executable, "-m", "nimflow.deploy_fingerprint", str(project_dir)]
    result = subprocess.run(command, cwd=project_dir, env=deploy_environment(api_url), capture_output=True, text=True,
                            timeout=DEPLOY_TIMEOUT_SECONDS)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise PermanentError(f"cannot load the flows of {project_dir / 'prefect.yaml'} to fingerprint its deployments "
                             f"(exit {result.returncode}); fix the flow or the entry:\n{tail}")
    planned = []
    for name, (flow_name, fingerprint) in json.loads(result.stdout.strip().splitlines()[-1]).items():
        try:
            current = client.read_deployment_by_name(f"{flow_name}/{name}")
        except ObjectNotFound:
            current = None
        planned.append(PlannedDeployment(name, flow_name, fingerprint, current))
    return planned


def record_fingerprints(client: SyncPrefectClient, deployed: list[PlannedDeployment]) -> None:
    """Store each deployed one's fingerprint as its ``version`` (the next bootstrap compares against it).

    Set after the deploy, not with ``--version`` (one value for every deployment of a call); a bootstrap
    that dies in between only deploys them again next time.
    """
    for planned in deployed:
        deployment = client.read_deployment_by_name(f"{planned.flow_name}/{planned.name}")
        client.update_deployment(deployment.id, DeploymentUpdate(version=planned.fingerprint))


def bootstrap(
    project_dir: Path, *, extra_pools: list[str] | None = None, gpu_hosts: dict[str, GpuHost] | None = None, deploy: bool = True
) -> BootstrapReport:
    """Create what is missing on the Prefect server and (re)deploy the project; return what was done.

    Args:
        project_dir: the directory holding prefect.yaml (the checkout the workers run flows from).
        extra_pools: process work pools to create besides those prefect.yaml names.
        gpu_hosts: the fleet's hosts by name (:func:`parse_gpu_hosts`): GPU limits, and each a reconcile.
        deploy: deploy what changed (off: only pools, limits, automations and blocks).

    Raises:
        ConfigError: PREFECT_API_URL is unset, or prefect.yaml is missing.
        PermanentError: ``prefect deploy`` failed.
        NimflowError: the Prefect API could not be reached or refused a request.
    """
    api_url = require_api_url()
    project_dir = project_dir.resolve()
    config = project_config(project_dir)
    report = BootstrapReport()
    deployment_names = [d["name"] for d in config.get("deployments") or [] if d.get("name")]
    with translated_errors(f"bootstrapping the Prefect server at {redact_url(api_url)}"), get_client(sync_client=True) as client:
        for pool in dict.fromkeys([*pools_in(config), *(extra_pools or [])]):
            report.add("work pool", pool, ensure_process_pool(client, pool))
        for host in (gpu_hosts or {}).values():
            report.add("gpu limit", gpu_limit_name(host.name), ensure_limit(client, gpu_limit_name(host.name), host.gpus, update=True))
        for pool in dict.fromkeys(h.pool for h in (gpu_hosts or {}).values() if h.pool):
            report.add("work pool", pool, ensure_process_pool(client, pool))
        try:
            names = spec_names()
        except ConfigError as exc:
            report.add("spec limits", str(get_settings().specs_dir), f"skipped ({exc})")
            names = []
        for name in names:
            report.add("spec limit", spec_limit_name(name), ensure_limit(client, spec_limit_name(name), 1, update=False))
        report.add("automation", ZOMBIE_AUTOMATION_NAME, ensure_zombie_run_automation(client))
        report.add("lease storage", *check_lease_storage(client))
    settings = get_settings()
    with translated_errors("saving Secret blocks"):
        saved = save_secrets({
            "HF_TOKEN": settings.hf_token, "NGC_API_KEY": settings.ngc_api_key,
            "AWS_ACCESS_KEY_ID": settings.aws_access_key_id, "AWS_SECRET_ACCESS_KEY": settings.aws_secret_access_key,
        })
    for item in saved:
        report.add("secret block", f"{item.block} (from {item.variable})", item.result)
    if not deploy:
        with translated_errors("making the checkpoint trigger"), get_client(sync_client=True) as client:
            report.add("automation", CHECKPOINT_AUTOMATION_NAME, ensure_checkpoint_automation(client))
        return report
    with translated_errors("reading deployments"), get_client(sync_client=True) as client:
        planned = plan_deployments(client, project_dir, api_url)
    changed = [p for p in planned if p.result != "unchanged"]
    # Only what is redeployed can be re-activated by it (prefect deploy re-activates paused schedules).
    before = paused_states([p.current for p in changed if p.current is not None])
    try:
        if changed:
            run_prefect_deploy(project_dir, api_url, [p.name for p in changed])
            with translated_errors("recording the deployments' fingerprints"), get_client(sync_client=True) as client:
                record_fingerprints(client, changed)
        for deployment in planned:
            report.add("deployment", deployment.name, deployment.result)
    finally:
        with translated_errors("pausing schedules again"), get_client(sync_client=True) as client:
            restore_paused(client, before, report)
            for state in paused_states([p.current for p in planned if p.result == "unchanged"]):
                report_paused(state, report)
    with translated_errors("making the checkpoint trigger"), get_client(sync_client=True) as client:
        report.add("automation", CHECKPOINT_AUTOMATION_NAME, ensure_checkpoint_automation(client))
    if gpu_hosts and RECONCILE_DEPLOYMENT in deployment_names:
        with translated_errors("making each host's reconcile"), get_client(sync_client=True) as client:
            reconcile_per_host(client, list(gpu_hosts.values()), report)
    return report
