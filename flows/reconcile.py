"""The ``reconcile`` flow: keep this Docker host's nimflow deployments healthy.

Schedule it on each GPU host (prefect.yaml's ``reconcile`` deployment, every 5 minutes). Every
deployment on the worker's Docker host is checked (after undoing what dead runs left there:
:mod:`nimflow.run_leftovers`); an unhealthy one whose spec still exists is healed
by running ``host_model`` for it again (as a subflow); the findings are a table artifact. Each
deployment serving an engine has its in-use marker in the engine store refreshed, so gc on any host
keeps that engine. The mechanism is in :mod:`nimflow.reconcile`.
"""

from __future__ import annotations

from nimflow.flows.host_model import host_model
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from nimflow.containers import docker_client
from nimflow.deployments_admin import DeploymentStatus, deployment_status
from nimflow.engine_use import record_in_use
from nimflow.errors import ConfigError, NimflowError
from nimflow.reconcile import HealResult, as_table, health_problem, reconcile_deployments, refresh_in_use
from nimflow.run_leftovers import undo_dead_runs
from nimflow.run_names import artifact_key, reconcile_run_name
from nimflow.settings import get_settings
from nimflow.spec_registry import load_named_spec, spec_names

#: The report's key without the host: ``nimflow-reconcile-<host>`` (:func:`report_key`).
ARTIFACT_KEY = "nimflow-reconcile"

#: A backstop for a hung pass. A pass checks each deployment in seconds, but a heal is a host_model run
#: (hours, bounded by its own timeout); one heal fits, and what a cut-short pass left is the next one's.
RECONCILE_TIMEOUT_SECONDS = 12 * 3600


def report_key(host: str) -> str:
    """The reconcile report's artifact key on ``host``: one per host, so hosts do not overwrite each other's."""
    return artifact_key(ARTIFACT_KEY, host)


def _heal(name: str) -> HealResult:
    """Run the rollout for spec ``name`` again, as a subflow of this run."""
    state = host_model(spec=name, return_state=True)
    if not state.is_completed():
        return HealResult(False, f"host_model {state.name}: {state.message or 'no message'}")
    record = state.result()
    return HealResult(True, f"{record['served_model_name']} at {record['endpoint']} ({record['container_id'][:12]})")


def _mark_in_use(status: DeploymentStatus) -> str | None:
    """Refresh the in-use marker of a deployment serving an engine, in its spec's store; why not, or None."""
    try:
        spec = load_named_spec(status.name)
    except ConfigError:
        return None  # no spec: no store known for it (the heal pass reports the deployment)
    if spec.cache is None or status.engine_key is None:
        return None
    return record_in_use(spec.cache, status.engine_key, spec.deploy.cache_dir, status.name, status.active)


def _recheck(name: str) -> str | None:
    """Why deployment ``name`` is unhealthy now, or None when it is healthy."""
    found = [s for s in deployment_status(docker_client()) if s.name == name]
    return health_problem(found[0]) if found else "no containers left"


@flow(name="reconcile", log_prints=False, flow_run_name=reconcile_run_name, timeout_seconds=RECONCILE_TIMEOUT_SECONDS)
def reconcile(heal: bool = True) -> list[dict[str, str]]:
    """Check every nimflow deployment on this Docker host and heal the unhealthy ones; return the table.

    Args:
        heal: off: only report (a dry run).

    Raises:
        NimflowError: a heal failed (after every deployment was looked at and the table was written).
    """
    log = get_run_logger()
    # First what dead runs left (recreate: a stopped backend started again), so it is not "healed" by a new rollout.
    if leftovers := undo_dead_runs(docker_client()):
        log.warning("Left on this host by runs that are over: %s", leftovers.describe())
    statuses = deployment_status(docker_client())
    try:
        known = set(spec_names())
    except ConfigError as exc:
        log.warning("no specs to heal from: %s", exc)
        known = set()
    for problem in refresh_in_use([s for s in statuses if s.name in known], _mark_in_use):
        log.warning("%s", problem)
    findings = reconcile_deployments(statuses, known, _heal if heal else None, _recheck)
    for finding in findings:
        log.info("%s: %s; %s: %s", finding.name, finding.state, finding.action, finding.result)
    table = as_table(findings)
    create_table_artifact(table=table, key=report_key(get_settings().host_name),
                          description="nimflow deployments on this Docker host: health and healing")
    failed = [f for f in findings if f.failed]
    if failed:
        raise NimflowError("reconcile could not heal " + "; ".join(f"{f.name}: {f.result}" for f in failed))
    return table
